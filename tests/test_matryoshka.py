"""Matryoshka (train.matryoshka_dims, losses/matryoshka.py): the objective summed over embedding prefixes, the same
with and without GradCache; `eval --dims` scores each prefix renormalised; `report` plots score against size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from slmembed import train as train_mod
from slmembed.cli import main
from slmembed.config import Recipe
from slmembed.data.sts import load_sts
from slmembed.evaluate import evaluate, score, unique_sentences
from slmembed.loading import load_embedder
from slmembed.losses.infonce import info_nce
from slmembed.losses.matryoshka import matryoshka
from slmembed.losses.symmetric import symmetric_info_nce
from slmembed.report import report


@pytest.mark.parametrize("objective", [info_nce, symmetric_info_nce])
def test_loss_is_the_weighted_sum_over_prefixes(objective) -> None:
    torch.manual_seed(0)
    a, p, n = (torch.randn(6, 16, requires_grad=True) for _ in range(3))
    mask = torch.tensor([True, True, False, True, True, True])
    got = matryoshka(objective, [4, 8], [1.0, 0.5])(a, p, n, 0.05, negative_mask=mask)
    expected = (objective(a, p, n, 0.05, negative_mask=mask) + objective(a[:, :4], p[:, :4], n[:, :4], 0.05,
                negative_mask=mask) + 0.5 * objective(a[:, :8], p[:, :8], n[:, :8], 0.05, negative_mask=mask))
    torch.testing.assert_close(got, expected)
    got.backward()
    assert a.grad[:, 8:].abs().sum() > 0 and a.grad[:, :4].abs().sum() > 0
    without = matryoshka(objective, [4])(a, p, None, 0.05)  # in-batch negatives only
    torch.testing.assert_close(without, objective(a, p, None, 0.05) + objective(a[:, :4], p[:, :4], None, 0.05))


def _recipe(tiny_models, **train) -> Recipe:
    recipe = Recipe()
    recipe.model.name, recipe.model.max_length = str(tiny_models["llama"]), 32
    recipe.data.sources, recipe.data.max_triplets = ["cad_snli"], 64
    recipe.lora.dropout = 0.0
    for key, value in {"batch_size": 8, "max_steps": 4, "warmup_steps": 1, "lr": 5e-3, "bf16": False,
                       "log_every": 1, "matryoshka_dims": [8, 16], "matryoshka_weights": [1.0, 0.5], **train}.items():
        setattr(recipe.train, key, value)
    return recipe


def test_training_with_gradcache_equals_without(tmp_path, tiny_models, data_dir) -> None:
    runs = {}
    for cached in (False, True):
        run = tmp_path / f"cached-{cached}"
        train_mod.train(_recipe(tiny_models, grad_cache=cached, chunk_tokens=64), run, data_dir=data_dir,
                        progress=False)
        runs[cached] = run
    logs = [[json.loads(x)["loss"] for x in (r / "train_log.jsonl").read_text().splitlines()] for r in runs.values()]
    assert logs[0] == pytest.approx(logs[1], rel=1e-4)
    a, b = (load_file(r / "adapter/adapter_model.safetensors") for r in runs.values())
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    plain = tmp_path / "plain"
    train_mod.train(_recipe(tiny_models, matryoshka_dims=None, matryoshka_weights=None), plain, data_dir=data_dir,
                    progress=False)
    first = json.loads((plain / "train_log.jsonl").read_text().splitlines()[0])["loss"]
    assert logs[0][0] > first * 1.5  # full size plus two prefixes: about 2.5x the plain first loss


def test_dims_above_the_model_size_are_refused(tmp_path, tiny_models, data_dir, capsys) -> None:
    (tmp_path / "r.yaml").write_text(_recipe(tiny_models, matryoshka_dims=[8, 32]).to_yaml())
    assert main(["train", "--recipe", str(tmp_path / "r.yaml"), "--output", str(tmp_path / "run"),
                 "--data-dir", str(data_dir), "--device", "cpu"]) == 2
    assert "32 is not below the model's embedding size 32" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_models["llama"]), "--tasks", "SICK-R", "--dims", "64", "--device", "cpu",
                 "--data-dir", str(data_dir)]) == 2
    assert "--dims 64 is above the model's embedding size 32" in capsys.readouterr().err


def test_eval_dims_and_the_report_plot(tmp_path, tiny_models, data_dir) -> None:
    embedder = load_embedder(str(tiny_models["llama"]), device=torch.device("cpu"), dtype=torch.float32)
    sets = {"SICK-R": load_sts("SICK-R", data_dir)}
    result = evaluate(embedder, sets, dims=(8, 16))
    assert list(result["dims"]) == ["8", "16", "32"] and result["dims"]["32"]["average"] == result["average"]
    texts = unique_sentences(sets)
    cut = embedder.encode(texts)[:, :8]
    cut = cut / np.linalg.norm(cut, axis=1, keepdims=True)
    assert result["dims"]["8"]["scores"] == score(sets, dict(zip(texts, cut, strict=True)))
    for name in ("matryoshka", "plain"):  # two runs' eval.json, as `slmembed eval --dims --output RUN/eval.json`
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps(result))
    text = report(tmp_path).read_text()
    assert "## Score against embedding size" in text and "| matryoshka | " in text
    assert (tmp_path / "dims.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
