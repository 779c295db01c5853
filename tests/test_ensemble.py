"""Ensembles (ensemble.py): the cosine of two ensemble vectors is the mean of the members' cosines (numpy reference),
an ensemble of one scores as its member, and ``slmembed eval`` with several runs scores the mean of their cosines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from test_soup import TEXTS, make_run

from slmembed.cli import main
from slmembed.data.sts import load_all
from slmembed.ensemble import Ensemble
from slmembed.evaluate import evaluate
from slmembed.loading import load_embedder

CPU = torch.device("cpu")


def _cosines(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity, normalising in float64."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    return (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))


@pytest.fixture(scope="module")
def pair(tiny_models):
    """Two members of different backbones and poolings."""
    return (load_embedder(str(tiny_models["llama"]), device=CPU, dtype=torch.float32, pooling="mean"),
            load_embedder(str(tiny_models["gemma"]), device=CPU, dtype=torch.float32))


def test_ensemble_cosine_is_the_mean_of_the_members_cosines(pair) -> None:
    vectors = Ensemble(pair, ["llama", "gemma"]).encode(TEXTS, batch_size=2)
    members = [m.encode(TEXTS) for m in pair]
    assert vectors.shape == (len(TEXTS), sum(v.shape[1] for v in members)) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    i, j = np.triu_indices(len(TEXTS), 1)
    expected = np.mean([_cosines(v[i], v[j]) for v in members], axis=0)
    np.testing.assert_allclose(_cosines(vectors[i], vectors[j]), expected, atol=1e-6)
    assert np.abs(expected - _cosines(members[0][i], members[0][j])).max() > 1e-3  # not one member's alone


def test_an_ensemble_of_one_scores_as_its_member(pair, data_dir) -> None:
    sets = load_all(["STS17", "BIOSSES"], data_dir)
    assert evaluate(Ensemble(pair[:1], ["llama"]), sets) == evaluate(pair[0], sets)


def test_eval_of_several_runs_scores_the_mean_of_their_cosines(tmp_path, tiny_models, data_dir, capsys) -> None:
    runs = [make_run(tmp_path / "llama-lora", tiny_models["llama"], pooling="mean", attention="bidirectional"),
            make_run(tmp_path / "gemma-full", tiny_models["gemma"], finetune="full", scale=0.01)]
    out = tmp_path / "eval.json"
    capsys.readouterr()
    assert main(["eval", "--run", str(runs[0]), "--run", str(runs[1]), "--tasks", "STS17", "BIOSSES",
                 "--data-dir", str(data_dir), "--device", "cpu", "--dtype", "float32", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    label = f"{runs[0]} + {runs[1]}"
    assert result["model"] == label and f"| task | {label} |" in capsys.readouterr().out
    assert result["adapter"] == [str(r) for r in runs] and [m["run"] for m in result["members"]] == result["adapter"]
    assert [m["spec"] for m in result["members"]] == [json.loads((r / "embed.json").read_text())["spec"] for r in runs]
    members = [load_embedder(None, adapter=r, device=CPU, dtype=torch.float32) for r in runs]
    for name, sts in load_all(["STS17", "BIOSSES"], data_dir).items():
        similarity = np.mean([_cosines(m.encode(sts.sentences1), m.encode(sts.sentences2)) for m in members], axis=0)
        assert result["scores"][name] == pytest.approx(spearmanr(similarity, sts.scores).statistic * 100, abs=0.01)


def test_eval_refuses_prefix_sizes_of_an_ensemble(tmp_path, capsys) -> None:
    assert main(["eval", "--run", str(tmp_path / "a"), "--run", str(tmp_path / "b"), "--dims", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slmembed: error: --dims") and "\n" not in err
