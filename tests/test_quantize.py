"""Compact vectors: quantize.py gives sentence-transformers' int8/uint8/binary/ubinary vectors, compares them as a
vector store would, and `eval --precision` scores them from one encoding, with int8 ranges from STSBenchmark dev."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sentence_transformers.util.quantization import quantize_embeddings

from slmembed import quantize
from slmembed.cli import main
from slmembed.data.sts import load_sts
from slmembed.evaluate import evaluate, unique_sentences
from slmembed.loading import load_embedder

RNG = np.random.default_rng(0)
EMB = RNG.standard_normal((50, 20)).astype(np.float32)
CAL = RNG.standard_normal((200, 20)).astype(np.float32)


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_vectors_are_sentence_transformers_own(precision) -> None:
    reference = quantize_embeddings(EMB, precision, calibration_embeddings=CAL)
    ours = quantize.quantize(EMB, precision, quantize.ranges(CAL))
    assert ours.dtype == reference.dtype and ours.shape == reference.shape
    np.testing.assert_array_equal(ours, reference)
    if precision.endswith("binary"):
        assert ours.shape == (50, 3)  # 20 bits packed into 3 bytes
        np.testing.assert_array_equal(quantize.bits(ours, precision)[:, :20], EMB > 0)


def test_int8_needs_ranges_and_ranges_need_two_embeddings() -> None:
    with pytest.raises(ValueError, match="int8 needs calibration ranges"):
        quantize.quantize(EMB, "int8")
    with pytest.raises(ValueError, match="at least two"):
        quantize.ranges(EMB[:1])


def test_pair_similarity_is_cosine_of_the_integers_or_minus_hamming() -> None:
    a, b = EMB[:25], EMB[25:]
    qa, qb = (quantize.quantize(x, "int8", quantize.ranges(CAL)) for x in (a, b))
    fa, fb = qa.astype(np.float64), qb.astype(np.float64)
    expected = [x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(fa, fb, strict=True)]
    np.testing.assert_allclose(quantize.pair_similarity(qa, qb, "int8"), expected, rtol=1e-5)
    for precision in ("binary", "ubinary"):
        got = quantize.pair_similarity(quantize.quantize(a, precision), quantize.quantize(b, precision), precision)
        np.testing.assert_array_equal(got, -((a > 0) != (b > 0)).sum(1))


def test_eval_scores_each_precision_from_one_encoding(tiny_models, data_dir, tmp_path, capsys) -> None:
    embedder = load_embedder(str(tiny_models["llama"]), device=torch.device("cpu"), dtype=torch.float32)
    sets = {"SICK-R": load_sts("SICK-R", data_dir)}
    calibration = unique_sentences({"dev": load_sts("STSBenchmark", data_dir, split="dev")})
    result = evaluate(embedder, sets, precisions=("float32", "int8", "binary"), calibration=calibration)
    assert list(result["precisions"]) == ["int8", "binary"]  # float32 is the main score
    texts = unique_sentences(sets)
    vectors = embedder.encode(texts)
    quantized = quantize_embeddings(vectors, "int8", calibration_embeddings=embedder.encode(calibration))
    int8 = dict(zip(texts, quantized, strict=True))
    sick = sets["SICK-R"]
    a = np.stack([int8[s] for s in sick.sentences1]).astype(np.float64)
    b = np.stack([int8[s] for s in sick.sentences2]).astype(np.float64)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    expected = round(float(spearmanr(cosine, sick.scores).statistic) * 100, 2)
    assert result["precisions"]["int8"]["scores"]["SICK-R"] == pytest.approx(expected, abs=0.011)
    for precision in ("int8", "binary"):
        entry = result["precisions"][precision]
        assert entry["drop"] == pytest.approx(result["average"] - entry["average"], abs=0.011)
    with pytest.raises(ValueError, match="need calibration texts"):
        evaluate(embedder, sets, precisions=("uint8",))

    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_models["llama"]), "--tasks", "SICK-R", "--precision", "int8", "binary",
                 "--dtype", "float32", "--device", "cpu", "--data-dir", str(data_dir), "--output", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["calibration"] == f"STSBenchmark dev ({len(calibration)} sentences)"
    assert saved["precisions"]["int8"]["scores"] == result["precisions"]["int8"]["scores"]
    assert "| SICK-R |" in capsys.readouterr().out
