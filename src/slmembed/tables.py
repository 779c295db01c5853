"""Score tables in markdown, with no torch: ``eval``, ``reproduce`` and ``report`` print the same table."""

from __future__ import annotations

import numpy as np


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
