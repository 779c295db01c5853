"""The evaluator: Spearman of cosine against a direct computation, and agreement with MTEB's published scores."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from slmembed.data.sts import SEVEN, TASKS, StsSet
from slmembed.evaluate import evaluate, score, spearman
from slmembed.loading import load_embedder
from slmembed.tables import table

REFERENCE = json.loads((Path(__file__).parents[1] / "src/slmembed/data/mteb_reference.json").read_text())


def test_score_is_spearman_of_cosine() -> None:
    rng = np.random.default_rng(0)
    texts = [f"t{i}" for i in range(20)]
    vecs = {t: v / np.linalg.norm(v) for t, v in zip(texts, rng.normal(size=(20, 4)), strict=True)}
    sts = StsSet("toy", texts[:10], texts[10:], list(rng.uniform(0, 5, 10)))
    cos = [float(vecs[a] @ vecs[b]) for a, b in zip(sts.sentences1, sts.sentences2, strict=True)]
    assert score({"toy": sts}, vecs)["toy"] == pytest.approx(spearmanr(cos, sts.scores).statistic * 100, abs=0.005)


@pytest.mark.parametrize("case", ["float32 ties", "gold ties", "many ties", "two", "one", "constant", "nan"])
def test_spearman_is_scipys_to_the_bit(case: str) -> None:
    """The hand-written Spearman gives scipy.stats.spearmanr's statistic exactly, ties, NaN and constant inputs
    included (scipy warns for a constant input and returns NaN; ours returns NaN quietly)."""
    rng = np.random.default_rng(len(case))
    x = rng.normal(size=500).astype(np.float32).round(1)  # float32 similarities with ties, as ``score`` passes them
    y = list(rng.integers(0, 6, 500) / 1.0 if case != "float32 ties" else rng.uniform(0, 5, 500))
    if case == "many ties":
        x = rng.integers(0, 3, 500).astype(np.float32)
    elif case in ("two", "one"):
        x, y = x[: 2 if case == "two" else 1], y[: 2 if case == "two" else 1]
    elif case == "constant":
        x = np.full(500, 0.5, dtype=np.float32)
    elif case == "nan":
        x[7] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = spearmanr(x, y).statistic
    np.testing.assert_equal(spearman(x, y), expected)
    assert (np.isnan(expected)) == (case in ("one", "constant", "nan"))


def test_table_has_average_and_diff() -> None:
    text = table({"m": {"A": 80.0, "B": 70.0}}, reference={"A": 79.5, "B": 70.0})
    assert "| average | 75.00 | 74.75 | 0.25 |" in text
    assert "seven-set" not in text  # only a table of all seven sets has that row


def test_seven_set_average_leaves_out_sts17_and_biosses() -> None:
    scores = {t: float(i) for i, t in enumerate(TASKS)}  # STS17 = 5, BIOSSES = 7
    seven = (0 + 1 + 2 + 3 + 4 + 6 + 8) / 7
    assert set(SEVEN) == set(TASKS) - {"STS17", "BIOSSES"}
    assert f"| seven-set average | {seven:.2f} |" in table({"m": scores})
    assert f"| average | {sum(range(9)) / 9:.2f} |" in table({"m": scores})


def test_all_minilm_l6_v2_agrees_with_mteb_on_all_nine_sets() -> None:
    """MTEB's published cosine Spearman for all-MiniLM-L6-v2; BIOSSES differs by 0.39 (see results/eval/README.md)."""
    result = evaluate(load_embedder("all-minilm-l6-v2", device=torch.device("cpu"), dtype=torch.float32))
    assert list(result["scores"]) == list(TASKS)
    for task in TASKS:
        assert result["scores"][task] == pytest.approx(REFERENCE["scores"][task], abs=0.5), task
    assert sum(abs(result["scores"][t] - REFERENCE["scores"][t]) < 0.02 for t in TASKS) == 8
    assert result["average_7"] == pytest.approx(np.mean([result["scores"][t] for t in SEVEN]), abs=0.005)
    assert result["average_7"] == pytest.approx(np.mean([REFERENCE["scores"][t] for t in SEVEN]), abs=0.1)
