"""A markdown report with PNG plots for a training run, a reproduce result, or a folder of several of them.

What a folder holds decides what the report shows:

* a training run's log (``run.RunDir.log``): training loss and learning rate against step (``train.png``), and the
  STSBenchmark dev scores logged on the way, if any.
* a reproduce JSON (``NAME.json`` with ``before`` and ``after``): the nine-set scores before and after as grouped
  bars (``scores.png``) and a table; or an ``eval.json``: the scores as a table.
* subfolders with reproduce JSONs (e.g. ``results/reproduce``): the ablation table (one row per run: recipe
  differences, average before and after, STSBenchmark dev), per-task scores, the averages as bars
  (``ablation.png``) and the runs' loss curves together (``losses.png``).
* an ``eval.json`` with prefix sizes (``slmembed eval --dims``), in the folder or its subfolders: the nine-set
  average against embedding size, one line per run (``dims.png``), e.g. a Matryoshka run against a plain one.

Everything is written to ``report.md`` and the PNGs beside it (the folder itself unless another output is given).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from slmembed import outputs, plots
from slmembed.atomic import write_text
from slmembed.config import NOT_RESULT, Recipe, flat
from slmembed.data.jsonl import json_lines
from slmembed.errors import DataError, SlmembedError
from slmembed.plots import before_after_bars, pyplot, save
from slmembed.run import RunDir
from slmembed.tables import averages, table

FILES = ("report.md", "train.png", "scores.png", "ablation.png", "losses.png", "dims.png")  # all a report may write
SIGNATURE = "<!-- written by slmembed report -->"  # the last line of report.md: marks it (and its plots) as ours



@dataclass
class Run:
    """What one folder holds: its training log, reproduce result and/or eval result (each may be missing)."""

    name: str
    log: list[dict] | None
    result: dict | None  # reproduce JSON
    scores: dict | None  # eval JSON
    dev: list[dict] = field(default_factory=list)  # train_log records with an STSBenchmark dev score


def read_log(path: Path) -> list[dict]:
    """The records of a training run's log: each has a step and the loss and lr, or an STSBenchmark dev score
    (``stsb_dev``, train.dev_every), or both; any other line is a DataError."""
    records = []
    for line_no, record in json_lines(path, path.read_text().splitlines()):
        if not isinstance(record, dict) or "step" not in record or not (
                {"loss", "lr"} <= record.keys() or "stsb_dev" in record):
            raise DataError(path, "expected an object with step and loss and lr, or step and stsb_dev", line_no)
        records.append(record)
    return records


def find_run(folder: Path) -> Run | None:
    """The run in ``folder``, or None if it holds neither a training log nor scores."""
    log_file = RunDir(folder).log
    records = read_log(log_file) if log_file.exists() else None
    log = [r for r in records if "loss" in r] if records is not None else None
    dev = [r for r in records if "stsb_dev" in r] if records is not None else []
    result = scores = None
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "scores" in data.get("before", {}) and "scores" in data.get("after", {}):
            result = data
        elif path.name == "eval.json" and "scores" in data:
            scores = data
    if log is None and result is None and scores is None:
        return None
    return Run(folder.name, log, result, scores, dev)


def plot_training(path: Path, name: str, log: list[dict]) -> None:
    """Loss and learning rate against step, side by side."""
    plt = pyplot()
    steps = [r["step"] for r in log]
    fig, (loss_ax, lr_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    marker = "." if len(log) < 40 else None
    loss_ax.plot(steps, [r["loss"] for r in log], color="#1f6feb", marker=marker)
    loss_ax.set(xlabel="step", ylabel="InfoNCE loss", title=f"{name}: training loss")
    lr_ax.plot(steps, [r["lr"] for r in log], color="#d1242f", marker=marker)
    lr_ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in (loss_ax, lr_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, path)


def plot_losses(path: Path, runs: list[Run]) -> None:
    """The training loss of several runs on one axis."""
    plt = pyplot()
    many = len(runs) > 12  # the legend beside the axes, where it covers no line
    fig, ax = plt.subplots(figsize=(10 + 2.4 * (1 + len(runs) // 16) * many, 4 + many))
    for i, run in enumerate(runs):  # ten colours, then the next line style
        ax.plot([r["step"] for r in run.log], [r["loss"] for r in run.log], label=run.name, linewidth=1.2,
                color=f"C{i % 10}", linestyle=("-", "--", ":")[i // 10 % 3])
    ax.set(xlabel="step", ylabel="InfoNCE loss", title="training loss per run")
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=7, ncol=1 + len(runs) // 16, loc="upper left", bbox_to_anchor=(1.01, 1))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)


def plot_ablation(path: Path, runs: list[Run]) -> None:
    """Nine-set average before and after training, one pair of bars per run."""
    before_after_bars(path, [r.name for r in runs], [r.result["before"]["average"] for r in runs],
                      [r.result["after"]["average"] for r in runs], ylabel="nine-set average (Spearman x100)",
                      title="ablation: STS average before and after fine-tuning")


def plot_dims(path: Path, runs: list[Run]) -> None:
    """Nine-set average against the embedding's prefix size, one line per run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        sizes = sorted(r.scores["dims"], key=int)
        ax.plot([int(d) for d in sizes], [r.scores["dims"][d]["average"] for d in sizes], marker="o", label=r.name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("embedding dimensions (first d, renormalised)")
    ax.set_ylabel("STS average (Spearman x100)")
    ax.set_title("score against embedding size")
    ax.legend()
    save(fig, path)


def _dims(runs: list[Run], out: Path) -> list[str]:
    sizes = sorted({d for r in runs for d in r.scores["dims"]}, key=int)
    lines = ["## Score against embedding size", "", "| run | " + " | ".join(sizes) + " |",
             "|---|" + "---:|" * len(sizes)]
    for r in runs:
        cells = [f"{r.scores['dims'][d]['average']:.2f}" if d in r.scores["dims"] else "-" for d in sizes]
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    plot_dims(out / "dims.png", runs)
    return [*lines, "", "![dims](dims.png)", ""]


def _recipe_fields(run: Run) -> dict[str, str]:
    """A run's recipe as section.key -> JSON value; fields an older result lacks take today's defaults."""
    saved = flat(run.result.get("recipe", {}))
    return {k: json.dumps(saved.get(k, v)) for k, v in flat(Recipe().to_dict()).items()}


def _ablation(runs: list[Run], out: Path) -> list[str]:
    fields = [_recipe_fields(r) for r in runs]
    diffs = [k for k in fields[0] if len({f[k] for f in fields}) > 1 and k not in NOT_RESULT]
    head = ["run", *diffs, "steps x batch", "before", "after", "gain", "after (seven sets)", "STSB dev"]
    lines = ["## Ablation", "", "| " + " | ".join(head) + " |", "|---|" + "---|" * len(diffs) + "---:|" * 6]
    for r, f in zip(runs, fields, strict=True):
        b, a, t = r.result["before"], r.result["after"], r.result["train"]
        cells = [r.name, *(f"`{f[k]}`" for k in diffs), f"{t['steps']} x {t['batch_size']}",
                 f"{b['average']:.2f}", f"**{a['average']:.2f}**", f"{a['average'] - b['average']:+.2f}",
                 f"{averages(a['scores']).get('average_7', float('nan')):.2f}",
                 f"{a['stsb_dev']:.2f}" if "stsb_dev" in a else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![ablation](ablation.png)", "", "Scores after training, per task:", "",
              table({r.name: r.result["after"]["scores"] for r in runs})]
    plot_ablation(out / "ablation.png", runs)
    logged = [r for r in runs if r.log]
    if logged:
        plot_losses(out / "losses.png", logged)
        lines += ["", "![losses](losses.png)"]
    return [*lines, ""]


def _single(run: Run, out: Path) -> list[str]:
    lines = []
    if run.result:
        t = run.result["train"]
        lines += [f"Model `{run.result['model']}`: {t['steps']} steps of {t['batch_size']} triplets "
                  f"({t['triplets_seen']} seen) in {t['minutes']:.1f} min on {t['device']}.", "",
                  "## STS scores (Spearman x100)", "",
                  table({"before": run.result["before"]["scores"], "after": run.result["after"]["scores"]}),
                  "", "![scores](scores.png)", ""]
        plots.scores(out / "scores.png", run.name, run.result["before"], run.result["after"])
        if run.result.get("curve"):
            lines += ["Nine-set average at kept checkpoints: " + ", ".join(
                f"step {p['step']}: {p['average']:.2f}" for p in run.result["curve"]) + ".", ""]
    elif run.scores:
        lines += ["## STS scores (Spearman x100)", "", table({"score": run.scores["scores"]}), ""]
    if run.log:
        last = run.log[-1]
        lines += ["## Training", "", f"{len(run.log)} log records to step {last['step']}; final loss "
                  f"{last['loss']:.4f}" + (f", {last['triplets_per_s']:.1f} triplets/s." if "triplets_per_s" in last
                                           else "."), "", "![training](train.png)", ""]
        plot_training(out / "train.png", run.name, run.log)
    if run.dev:
        lines += ["STSBenchmark dev during training: " + ", ".join(
            f"step {r['step']}: {r['stsb_dev']:.2f}" for r in run.dev) + ".", ""]
    return lines


def _ours(path: Path) -> bool:
    """An earlier report's file: a report.md that carries SIGNATURE, or a plot beside one."""
    report_md = path.with_name("report.md")
    try:
        return SIGNATURE in report_md.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return False


def report(folder: str | Path, output: str | Path | None = None, force: bool = False) -> Path:
    """Write ``report.md`` and its plots for ``folder`` into ``output`` (default: the folder); return its path.

    Only the report's own files are written; an earlier report's are replaced only with ``force``.
    """
    folder = Path(folder)
    out = Path(output) if output else folder
    if not folder.is_dir():
        raise SlmembedError(f"{folder}: no such folder")
    for name in FILES:
        outputs.check_file(out / name, "report", around=[folder], force=force, ours=_ours)
    run = find_run(folder)
    subruns = [r for r in (find_run(sub) for sub in sorted(folder.iterdir()) if sub.is_dir()) if r]
    ablation = [r for r in subruns if r.result]
    ablation = ablation if len(ablation) >= 2 else []
    sized = [r for r in [run, *subruns] if r and r.scores and "dims" in r.scores]
    if run is None and not ablation and not sized:
        raise SlmembedError(f"nothing to report in {folder}: expected {RunDir(folder).log.name}, a reproduce or eval "
                            "JSON, two or more subfolders holding reproduce JSONs, or subfolders with eval.json by "
                            "--dims")
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Report: {folder.name}", ""]
    if run:
        lines += _single(run, out)
    if ablation:
        lines += _ablation(ablation, out)
    if sized:
        lines += _dims(sized, out)
    target = out / "report.md"
    write_text(target, "\n".join([*lines, "", SIGNATURE]).rstrip() + "\n")
    for name in FILES:
        if (out / name).exists():
            outputs.record_added(out, name, "report")
    return target
