"""``slmembed soup`` (soup.py): the uniform soup computes with the mean of its members' merged weights (LoRA) or state
dicts (full), as a model built from those means in the test computes; the greedy soup keeps a member only when the
dev score does not drop, with the scores of reference models; members that differ are refused, one line and exit 2,
before any model loads; the soup is a run folder that load_embedder, eval and export load."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from test_train import _tiny_recipe

from slmembed import models, tuning
from slmembed import soup as soup_mod
from slmembed.cli import main
from slmembed.config import Recipe
from slmembed.data.sts import load_sts
from slmembed.embedder import Embedder
from slmembed.evaluate import evaluate
from slmembed.loading import load_embedder
from slmembed.run import EmbedInfo, RunDir
from slmembed.soup import choose_greedy, soup
from slmembed.spec import EmbedSpec
from slmembed.train import train

CPU = torch.device("cpu")
TEXTS = ["A man is playing a guitar.", "Two dogs run along the beach in the sun.", "x", "The stock market fell."]
DEV_PAIRS = 200


def make_run(folder: Path, base: Path, *, finetune: str = "lora", seed: int = 0, scale: float = 0.1,
             average_of: int = 1, **model: object) -> Path:
    """A finished training run folder as train writes it, over the model folder ``base``, whose trained weights are
    the untrained ones plus Gaussian noise of std ``scale`` (LoRA: its B starts at 0, so every update is noise);
    ``average_of`` > 1: the run kept the average of that many such states, as selection.py keeps an average of dev
    snapshots (LoRA: of rank ``average_of * r``)."""
    recipe = Recipe()
    recipe.model.name, recipe.model.max_length = str(base), 32
    for key, value in model.items():
        setattr(recipe.model, key, value)
    recipe.train.finetune, recipe.train.bf16, recipe.train.seed = finetune, False, seed
    net, tokenizer = models.load(str(base))
    net = tuning.prepare(net, recipe)
    generator = torch.Generator().manual_seed(seed)
    states = [{k: v + scale * torch.randn(v.shape, generator=generator) for k, v in tuning.state(net, recipe).items()}
              for _ in range(average_of)]
    tuning.average(net, states, recipe) if average_of > 1 else tuning.load_state(net, states[0], recipe)
    final = RunDir(folder).weights_folder(recipe.train.finetune)
    final.mkdir(parents=True)
    tuning.save_final(net, tokenizer, final, recipe)
    (folder / "recipe.yaml").write_text(recipe.to_yaml())
    (folder / "embed.json").write_text(json.dumps({"model": str(base), "spec": EmbedSpec.of(recipe.model).__dict__,
                                                  "finetune": finetune}))
    (folder / "summary.json").write_text(json.dumps({"steps": 1, "batch_size": 8, "finetune": finetune}))
    return folder


def merged_weights(run: Path) -> dict[str, torch.Tensor]:
    """The backbone weights a run computes with, from its files alone: its model, or the base model's weights plus
    ``alpha / r * B @ A`` for each adapted one."""
    if (run / "model").is_dir():
        return load_file(run / "model" / "model.safetensors")
    base = Path(json.loads((run / "embed.json").read_text())["model"])
    weights = {k.removeprefix("model."): v for k, v in load_file(base / "model.safetensors").items()
               if k.startswith("model.")}
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    for key, a in adapter.items():
        if ".lora_A." in key:
            target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            b = adapter[key.replace(".lora_A.", ".lora_B.")]
            weights[target] = weights[target] + config["lora_alpha"] / config["r"] * b @ a
    return weights


def reference(runs: list[Path]) -> Embedder:
    """A plain model (no adapter) whose weights are the mean of the runs' merged weights, in float32."""
    merged = [merged_weights(r) for r in runs]
    base = Path(json.loads((runs[0] / "embed.json").read_text())["model"])
    net, tokenizer = models.load(str(base))
    net.load_state_dict({k: sum(m[k] for m in merged) / len(merged) for k in merged[0]})
    spec = EmbedSpec(**json.loads((runs[0] / "embed.json").read_text())["spec"])
    return Embedder(net.eval(), tokenizer, spec)


@pytest.fixture
def small_dev(monkeypatch):
    """STSBenchmark dev as soup.py reads it, cut to its first DEV_PAIRS pairs: the choice's many scores, quickly."""

    def load(task, data_dir=None, split="test"):
        full = load_sts(task, data_dir, split=split)
        return dataclasses.replace(full, sentences1=full.sentences1[:DEV_PAIRS], sentences2=full.sentences2[:DEV_PAIRS],
                                   scores=full.scores[:DEV_PAIRS])

    monkeypatch.setattr(soup_mod, "load_sts", load)
    return load


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_uniform_soup_computes_with_the_mean_of_the_members_weights(tmp_path, tiny_models, data_dir, small_dev,
                                                                    finetune) -> None:
    # LoRA runs as SmolLM2's best recipe trains them (mean pooling, bidirectional), full ones as Gemma-3's; the
    # second run kept an average of two dev snapshots (a LoRA adapter of twice the rank).
    shape = {"pooling": "mean", "attention": "bidirectional"} if finetune == "lora" else {}
    runs = [make_run(tmp_path / f"run{s}", tiny_models["llama"], finetune=finetune, seed=s, scale=0.05,
                     average_of=1 + (s == 1), **shape) for s in range(3)]
    result = soup(runs, tmp_path / "soup", tasks=["STS17"], data_dir=data_dir, device="cpu")
    got = load_embedder(None, adapter=tmp_path / "soup", device=CPU, dtype=torch.float32).encode(TEXTS)
    np.testing.assert_allclose(got, reference(runs).encode(TEXTS), atol=2e-5)
    for member in runs:  # and it is none of them
        assert np.abs(got - reference([member]).encode(TEXTS)).max() > 1e-2
    summary = json.loads((tmp_path / "soup/summary.json").read_text())
    assert summary["soup"]["members"] == [str(r) for r in runs] and summary["soup"]["greedy"] is False
    assert summary["steps"] == 1 and summary["finetune"] == finetune
    assert json.loads((tmp_path / "soup/soup.json").read_text()) == result
    assert set(result["scores"]) == {"STS17"} and len(result["soup"]["candidates"]) == 3
    assert EmbedInfo.read(tmp_path / "soup") == EmbedInfo.read(runs[0])
    if finetune == "lora":  # ranks 8 + 16 + 8, at the runs' scale alpha / r = 32 / 8
        config = json.loads((tmp_path / "soup/adapter/adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) == (32, 128)
    else:
        assert (tmp_path / "soup/model/model.safetensors").is_file() and not (tmp_path / "soup/adapter").exists()


def test_greedy_rule_adds_members_best_first_while_the_score_does_not_drop() -> None:
    member_dev = [70.0, 80.0, 75.0, 60.0, float("nan")]
    soups = {(1, 2): 80.0, (1, 2, 0): 79.99, (1, 2, 3): 81.5, (1, 2, 3, 4): 81.5}
    asked = []
    chosen, steps = choose_greedy(member_dev, lambda ids: asked.append(ids) or soups[tuple(ids)])
    assert chosen == [1, 2, 3, 4]  # a tie does not drop; a NaN member (constant similarities) is tried last
    assert asked == [[1, 2], [1, 2, 0], [1, 2, 3], [1, 2, 3, 4]]
    assert [(s["tried"], s["stsb_dev"], s["kept"]) for s in steps] == [
        ([1], 80.0, True), ([1, 2], 80.0, True), ([1, 2, 0], 79.99, False), ([1, 2, 3], 81.5, True),
        ([1, 2, 3, 4], 81.5, True)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models, data_dir) -> list[Path]:
    """Two training runs of the tiny Llama, seeds 1 and 2 (a few steps: STSBenchmark dev well above the base's)."""
    folder = tmp_path_factory.mktemp("trained")
    for seed in (1, 2):
        train(_tiny_recipe(tiny_models, max_steps=4, seed=seed, lr=5e-3), folder / f"seed{seed}", data_dir=data_dir,
              progress=False)
    return [folder / "seed1", folder / "seed2"]


def test_greedy_soup_leaves_out_a_bad_member_as_reference_scores_say(tmp_path, tiny_models, data_dir, small_dev,
                                                                     trained) -> None:
    bad = make_run(tmp_path / "bad", tiny_models["llama"], seed=3, scale=1.0)  # a noise update far above the weights
    runs = [trained[0], bad, trained[1]]
    result = soup(runs, tmp_path / "soup", greedy=True, tasks=["STS17"], data_dir=data_dir, device="cpu")
    record = result["soup"]
    # The rule, applied in the test to dev scores of reference models built from the members' merged weights.
    dev = {"dev": small_dev("STSBenchmark", data_dir, split="dev")}

    def score(members: list[Path]) -> float:
        return evaluate(reference(members), dev)["average"]

    member_dev = [score([r]) for r in runs]
    assert [c["stsb_dev"] for c in record["candidates"]] == pytest.approx(member_dev, abs=0.02)
    order = sorted(range(3), key=lambda i: -member_dev[i])
    assert runs[order[-1]] == bad  # the setup: the noisy member scores lowest
    kept, best = [runs[order[0]]], member_dev[order[0]]
    for step, i in zip(record["steps"][1:], order[1:], strict=True):
        value = score([*kept, runs[i]])
        assert step["tried"] == [str(r) for r in [*kept, runs[i]]]
        assert step["stsb_dev"] == pytest.approx(value, abs=0.02)
        assert step["kept"] is (value >= best)
        if value >= best:
            kept, best = [*kept, runs[i]], value
    assert record["members"] == [str(r) for r in kept] and str(bad) not in record["members"]
    # The soup's own dev score: of the written folder, as eval loads it (in the device's default dtype).
    assert record["dev"] == evaluate(load_embedder(None, adapter=tmp_path / "soup", device=CPU), dev)["average"]


def _edit(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


MISMATCHES = {  # how the second run is made to differ -> what the error names
    "spec": (lambda run, base: _edit(run / "embed.json", spec={**EmbedSpec().__dict__, "max_length": 32,
                                                                 "pooling": "mean"}), "spec.pooling is \"mean\""),
    "model": (lambda run, base: _edit(run / "embed.json", model="smollm2-135m"), "model is \"smollm2-135m\""),
    "rank": (lambda run, base: (run / "recipe.yaml").write_text((run / "recipe.yaml").read_text().replace(
        "r: 8", "r: 16")), "lora.r is 16"),
    "scale": (lambda run, base: _edit(run / "adapter/adapter_config.json", lora_alpha=16), "lora.scale is 2.0"),
    "targets": (lambda run, base: _edit(run / "adapter/adapter_config.json", target_modules=["q_proj"]),
                "lora.targets is [\"q_proj\"]"),
    "layers": (lambda run, base: _edit(run / "adapter/adapter_config.json", layers_to_transform=[1]),
               "lora.layers is [1]"),
    "finetune": (lambda run, base: (shutil.rmtree(run), make_run(run, base, finetune="full")),
                 "train.finetune is \"full\""),
    "unfinished": (lambda run, base: (run / "summary.json").unlink(), "not a finished training run"),
    "soup": (lambda run, base: _edit(run / "summary.json", soup={}), "is a soup, not a training run"),
}


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_models) -> list[Path]:
    """Two LoRA runs of the tiny Llama that soup together, to be copied and changed."""
    folder = tmp_path_factory.mktemp("lora-runs")
    return [make_run(folder / "a", tiny_models["llama"]), make_run(folder / "b", tiny_models["llama"], seed=1)]


@pytest.mark.parametrize("case", MISMATCHES)
def test_members_that_differ_are_refused_before_any_model_loads(tmp_path, tiny_models, data_dir, lora_runs, capsys,
                                                                monkeypatch, case) -> None:
    base = tiny_models["llama"]
    first, second = (Path(shutil.copytree(run, tmp_path / run.name)) for run in lora_runs)
    change, message = MISMATCHES[case]
    change(second, base)
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("a model loaded"))
    out = tmp_path / "soup"
    capsys.readouterr()  # the loading bars of make_run
    assert main(["soup", "--run", str(first), "--run", str(second), "--output", str(out), "--data-dir",
                 str(data_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slmembed: error:") and "\n" not in err and message in err, err
    assert str(second) in err and not out.exists()


@pytest.mark.parametrize("runs, message", [(["a"], "two or more runs"), (["a", "a"], "given twice"),
                                           (["a", "missing"], "no such run folder")])
def test_soup_needs_two_distinct_runs(tmp_path, lora_runs, capsys, runs, message) -> None:
    shutil.copytree(lora_runs[0], tmp_path / "a")
    args = [a for r in runs for a in ("--run", str(tmp_path / r))]
    capsys.readouterr()
    assert main(["soup", *args, "--output", str(tmp_path / "soup")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


def test_soup_of_trained_runs_loads_like_a_run_in_eval_and_export(tmp_path, data_dir, small_dev, trained,
                                                                  capsys) -> None:
    runs = trained
    out = tmp_path / "soup"
    args = ["soup", "--run", str(runs[0]), "--run", str(runs[1]), "--output", str(out), "--tasks", "STS17",
            "--data-dir", str(data_dir), "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "soup.json").read_text())
    assert f"member {runs[0]}: {result['soup']['candidates'][0]['stsb_dev']:.2f}" in printed and "| STS17 |" in printed
    assert result["run"]["command"].startswith("slmembed soup --run")
    # eval scores it as the soup scored itself; export writes it as a model.
    assert main(["eval", "--run", str(out), "--tasks", "STS17", "--data-dir", str(data_dir), "--device", "cpu",
                 "--output", str(out / "eval.json")]) == 0
    assert json.loads((out / "eval.json").read_text())["scores"] == result["scores"]
    assert main(["export", "--run", str(out), "--output", str(tmp_path / "export"), "--format", "hf"]) == 0
    expected = reference(runs).encode(TEXTS)
    exported = load_embedder(str(tmp_path / "export"), device=CPU, dtype=torch.float32).encode(TEXTS)
    assert float((exported * expected).sum(1).min()) > 0.9999
    # and as a sentence-transformers folder, which sentence-transformers loads with the same vectors.
    assert main(["export", "--run", str(out), "--output", str(tmp_path / "st"), "--format", "st",
                 "--dtype", "float32"]) == 0
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu", local_files_only=True)
    assert float((st.encode(TEXTS, normalize_embeddings=True) * expected).sum(1).min()) > 0.9999
    # An earlier soup is replaced only with --force, and never what soup did not write.
    capsys.readouterr()
    assert main(args) == 2 and "pass --force" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine\n")
    assert main([*args, "--force"]) == 2 and "notes.txt" in capsys.readouterr().err
    (out / "notes.txt").unlink()
    assert main([*args, "--force"]) == 0 and not (out / "eval.json").exists()
