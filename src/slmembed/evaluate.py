"""MTEB-style STS evaluation: Spearman correlation (x100) between cosine similarity and the gold scores.

Every unique sentence across the chosen tasks is encoded exactly once per run.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

from slmembed.data.sts import TASKS, StsSet, load_all
from slmembed.embedder import Embedder


def score(sets: dict[str, StsSet], vectors: dict[str, np.ndarray]) -> dict[str, float]:
    """Spearman x100 of cosine(sentence1, sentence2) against gold, per set; ``vectors`` maps text -> unit vector."""
    out = {}
    for name, sts in sets.items():
        a = np.stack([vectors[s] for s in sts.sentences1])
        b = np.stack([vectors[s] for s in sts.sentences2])
        out[name] = round(float(spearmanr((a * b).sum(1), sts.scores).statistic) * 100, 2)
    return out


def unique_sentences(sets: dict[str, StsSet]) -> list[str]:
    """Every sentence of ``sets`` once, sorted."""
    return sorted({s for sts in sets.values() for s in (*sts.sentences1, *sts.sentences2)})


def batching(embedder: Embedder, batch_size: int | None = None) -> tuple[int, int]:
    """Sentences and tokens (padded, or real when packed) per batch: ``batch_size`` (default 1024 on a GPU, 64 on the
    CPU) and 32 tokens per sentence on average, so that batches of long sentences do not blow up memory."""
    batch_size = batch_size or (1024 if embedder.device.type == "cuda" else 64)
    return batch_size, 32 * batch_size


def evaluate(embedder: Embedder, sets: dict[str, StsSet] | None = None, batch_size: int | None = None,
             progress: bool = False) -> dict:
    """Encode the unique sentences of ``sets`` (default: all nine from the data directory) once; score each set.

    Batches are formed as ``batching`` says.
    """
    sets = sets if sets is not None else load_all(TASKS)
    texts = unique_sentences(sets)
    batch_size, max_tokens = batching(embedder, batch_size)
    vecs = embedder.encode(texts, batch_size=batch_size, max_tokens=max_tokens, progress=progress)
    scores = score(sets, dict(zip(texts, vecs)))
    return {"scores": scores, "average": round(float(np.mean(list(scores.values()))), 2),
            "sentences": len(texts)}


def table(rows: dict[str, dict[str, float]], reference: dict[str, float] | None = None) -> str:
    """A markdown table: one column per result (``rows`` maps a label to its scores), tasks as rows, then average."""
    labels = list(rows) + (["reference", "diff"] if reference else [])
    tasks = list(next(iter(rows.values())))
    lines = ["| task | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for task in [*tasks, "average"]:
        cells = [rows[k].get(task, float("nan")) if task != "average" else float(np.mean(list(rows[k].values())))
                 for k in rows]
        if reference:
            ref = reference.get(task) if task != "average" else float(np.mean([reference[t] for t in tasks]))
            cells += [ref, cells[0] - ref]
        lines.append(f"| {task} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines)
