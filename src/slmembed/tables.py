"""Score tables and averages, with no torch: ``eval``, ``reproduce`` and ``report`` print the same table."""

from __future__ import annotations

import numpy as np

from slmembed.data.sts import SEVEN


def average(scores: dict[str, float]) -> float:
    """The mean of ``scores`` (task -> Spearman x100), to two decimals."""
    return round(float(np.mean(list(scores.values()))), 2)


def averages(scores: dict[str, float]) -> dict[str, float]:
    """``{"average": ...}`` over every set, plus ``"average_7"`` (the seven-set protocol, data.sts.SEVEN) when
    ``scores`` holds all seven of those sets."""
    out = {"average": average(scores)}
    if set(SEVEN) <= set(scores):
        out["average_7"] = average({t: scores[t] for t in SEVEN})
    return out


def table(rows: dict[str, dict[str, float]], reference: dict[str, float] | None = None) -> str:
    """A markdown table: one column per result (``rows`` maps a label to its scores), tasks as rows, then the
    average (and the seven-set average when every column has those sets)."""
    labels = list(rows) + (["reference", "diff"] if reference else [])
    tasks = list(next(iter(rows.values())))
    lines = ["| task | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    summaries = ["average"] + (["average_7"] if all(set(SEVEN) <= set(r) for r in rows.values()) else [])
    for task in [*tasks, *summaries]:
        cells = [averages(rows[k])[task] if task in summaries else rows[k].get(task, float("nan")) for k in rows]
        if reference:
            ref = averages(reference)[task] if task in summaries else reference.get(task)
            cells += [ref, cells[0] - ref]
        label = "seven-set average" if task == "average_7" else task
        lines.append(f"| {label} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines)
