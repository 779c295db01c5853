"""MTEB-style STS evaluation: Spearman correlation (x100) between cosine similarity and the gold scores.

Every unique sentence across the chosen tasks is encoded exactly once per run. Compact vectors (quantize.py) are
scored from the same encoding: each precision's vectors, compared as a vector store would compare them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from slmembed import quantize
from slmembed.data.sts import TASKS, StsSet, load_all
from slmembed.embedder import Embedder, batching
from slmembed.errors import SlmembedError
from slmembed.tables import average, averages


def score(sets: dict[str, StsSet], vectors: dict[str, np.ndarray], precision: str = "float32") -> dict[str, float]:
    """Spearman x100 of the pairs' similarity against gold, per set; ``vectors`` maps text -> its vector at
    ``precision`` (float32: a unit vector, compared by cosine; others: quantize.pair_similarity)."""
    out = {}
    for name, sts in sets.items():
        a = np.stack([vectors[s] for s in sts.sentences1])
        b = np.stack([vectors[s] for s in sts.sentences2])
        similarity = (a * b).sum(1) if precision == "float32" else quantize.pair_similarity(a, b, precision)
        out[name] = round(spearman(similarity, sts.scores) * 100, 2)
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: the Pearson correlation (``np.corrcoef``) of the two samples' ranks, tied values
    given their average rank; NaN where either sample is constant or holds a NaN, or has under two values.

    ``scipy.stats.spearmanr(x, y).statistic``, computed in the same steps, so to the same bits. Written here because
    importing ``scipy.stats`` costs each evaluation 0.3 s of its start, more than scoring the nine sets.
    """
    data = np.column_stack((x, y)).astype(np.float64)
    if len(data) < 2 or np.isnan(data).any() or (data == data[0]).all(axis=0).any():
        return float("nan")
    return float(np.corrcoef(np.column_stack([_ranks(column) for column in data.T]), rowvar=False)[1, 0])


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..N of ``values`` in ascending order, each run of ties given the mean of the ranks it spans."""
    order = np.argsort(values)
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # where each run of equal values begins
    counts = np.diff(starts, append=len(values))
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(starts + (counts + 1) / 2, counts)
    return ranks


def unique_sentences(sets: dict[str, StsSet]) -> list[str]:
    """Every sentence of ``sets`` once, sorted."""
    return sorted({s for sts in sets.values() for s in (*sts.sentences1, *sts.sentences2)})


def evaluate(embedder: Embedder, sets: dict[str, StsSet] | None = None, batch_size: int | None = None,
             progress: bool = False, precisions: tuple[str, ...] = (), calibration: list[str] | None = None,
             dims: tuple[int, ...] = ()) -> dict:
    """Encode the unique sentences of ``sets`` (default: all nine from the data directory) once; score each set.

    Batches are formed as ``batching`` says. Each of ``precisions`` other than float32 is scored too, under
    ``"precisions"``, with its drop from float32; int8 and uint8 take their ranges from the embeddings of the
    ``calibration`` texts (required for them: never the sets' own sentences). Each prefix size in ``dims`` is
    scored too, under ``"dims"`` (the first d coordinates, renormalised; the full size included), as a Matryoshka
    model would be used.
    """
    sets = sets if sets is not None else load_all(TASKS)
    if dims and max(dims) > (size := embedder.encode(["size"]).shape[1]):  # before the long encode
        raise SlmembedError(f"--dims {max(dims)} is above the model's embedding size {size}")
    texts = unique_sentences(sets)
    batch_size, max_tokens = batching(embedder, batch_size)
    vecs = embedder.encode(texts, batch_size=batch_size, max_tokens=max_tokens, progress=progress)
    scores = score(sets, dict(zip(texts, vecs, strict=True)))
    result = {"scores": scores, **averages(scores), "sentences": len(texts)}
    if dims:
        result["dims"] = {}
        for d in sorted({*dims, vecs.shape[1]}):
            d_scores = score(sets, dict(zip(texts, quantize.prefix(vecs, d), strict=True)))
            result["dims"][str(d)] = {"scores": d_scores, **averages(d_scores)}
    compact = [p for p in precisions if p != "float32"]
    if not compact:
        return result
    bounds = None
    if any(p in quantize.CALIBRATED for p in compact):
        if not calibration:
            raise ValueError("int8 and uint8 need calibration texts")
        bounds = quantize.ranges(embedder.encode(calibration, batch_size=batch_size, max_tokens=max_tokens))
    result["precisions"] = {}
    for precision in compact:
        p_scores = score(sets, dict(zip(texts, quantize.quantize(vecs, precision, bounds), strict=True)), precision)
        result["precisions"][precision] = {"scores": p_scores, **averages(p_scores),
                                           "drop": round(result["average"] - average(p_scores), 2)}
    return result
