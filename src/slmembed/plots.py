"""The PNG charts of reproduce results and reports: matplotlib off-screen, files written atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from slmembed.atomic import atomic_path


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    pyplot().close(fig)


def before_after_bars(path: Path, labels: Sequence[str], before: Sequence[float], after: Sequence[float], *,
                      title: str, ylabel: str, marks: Sequence[Sequence[float]] = ()) -> None:
    """One pair of bars (before, after) per label, the after value written above its bar; ``marks`` (the runs an
    after of several is made of, one value per label each) as dots on the after bars."""
    plt = pyplot()
    many = len(labels) > 12  # an ablation of dozens of runs: a wider figure, labels upright enough to read
    longest = max((len(label) for label in labels), default=0)
    fig, ax = plt.subplots(figsize=(max(10.0, 0.36 * len(labels)), 4.2 + (0.055 * longest if many else 0)))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], before, width=0.4, label="before", color="#9aa5b1")
    ax.bar([i + 0.2 for i in x], after, width=0.4, label="after", color="#1f6feb")
    for k, values in enumerate(marks):
        ax.plot([i + 0.2 for i in x], values, "o", color="#f0883e", markersize=3, label="its runs" if k == 0 else None)
    for i, v in zip(x, after, strict=True):
        ax.text(i + 0.2, v + 1, f"{v:.1f}", ha="center", fontsize=7 if many else 8, rotation=90 if many else 0)
    ax.set_xticks(list(x), labels, rotation=70 if many else 25, ha="right", fontsize=8)
    ax.set(ylabel=ylabel, title=title, ylim=(min(0, *before, *after) - 5, 100))
    ax.legend()
    fig.tight_layout()
    save(fig, path)


def scores(path: Path, name: str, before: dict, after: dict, members: Sequence[dict] = ()) -> None:
    """Grouped bars of the nine scores (and the average) before and after training; ``members``: the results of the
    runs a soup averaged, as dots on the after bars."""
    before_after_bars(path, [*before["scores"], "average"], [*before["scores"].values(), before["average"]],
                      [*after["scores"].values(), after["average"]], ylabel="Spearman x100 (cosine)",
                      title=f"{name}: STS before and after contrastive fine-tuning",
                      marks=[[*(m["scores"][t] for t in before["scores"]), m["average"]] for m in members])
