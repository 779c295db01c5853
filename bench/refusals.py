"""How fast a command refuses what needs no model to refuse: every bad recipe value of tests/test_validation.py
(through ``--set`` and in a recipe file), ``--resume`` without a run, and the output checks of every command that
writes (tests/test_outputs.py's cases), each as a fresh ``python -m slmembed`` process, as a user runs it.

Each case must exit 2 with one stderr line; the wall time of each is recorded, per group. ``--src`` times another
checkout's sources in the same run (e.g. the commit before a change; ``--src-sample`` cases a group), for a
before/after on one machine:

    python bench/refusals.py --output results/bench/refusals-cpu.json [--src OLD_CHECKOUT/src]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import save

from slmembed import outputs
from slmembed.run import ADAPTER_CONFIG, ENTRIES, RunDir
from slmembed.spec import EmbedSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_validation import BAD  # noqa: E402 - the tests' table of bad values, kept complete by a test


def _fake_run(root: Path) -> Path:
    """A folder that reads as a finished LoRA run (recipe, spec, adapter config, marker), with no weights: every
    refusal below comes before anything would load them."""
    run = RunDir(root / "runs" / "run")
    run.adapter.mkdir(parents=True)
    run.checkpoints_dir.mkdir()
    run.recipe_file.write_text(yaml.safe_dump({"name": "fake"}))
    run.write_info("smollm2-135m", EmbedSpec(), "lora")
    (run.adapter / ADAPTER_CONFIG).write_text("{}")
    outputs.mark(run.path, "train", ENTRIES)
    return run.path


def cases(root: Path) -> dict[str, list[list[str]]]:
    """The command lines to time, by group."""
    run, data = _fake_run(root), os.environ.get("SLMEMBED_DATA") or str(Path(__file__).resolve().parents[2] / "shared"
                                                                            / "data")
    foreign = root / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    texts = root / "texts.txt"
    texts.write_text("A man is playing a guitar.\n")
    recipes = []
    for path, values in BAD.items():
        for k, value in enumerate(values):
            *section, key = path.split(".")
            tree = {key: yaml.safe_load(value)}
            file = root / "recipes" / f"{path}-{k}.yaml"
            file.parent.mkdir(exist_ok=True)
            file.write_text(yaml.safe_dump({section[0]: tree} if section else tree))
            recipes.append(str(file))
    out = str(root / "out")
    return {
        "recipe value, --set": [["train", "--config", "smollm2-135m", "--output", out, "--set", f"{p}={v}"]
                                for p, values in BAD.items() for v in values],
        "recipe value, file": [["train", "--config", f, "--output", out] for f in recipes],
        "resume without a run": [["train", "--config", "smollm2-135m", "--output", str(foreign), "--resume"],
                                 ["train", "--config", "smollm2-135m", "--output", str(root / "none"), "--resume"]],
        "output checks": [
            ["train", "--config", "smollm2-135m", "--output", str(run), "--data-dir", data],
            ["train", "--config", "smollm2-135m", "--output", str(foreign), "--force", "--data-dir", data],
            ["export", "--adapter", str(run), "--output", str(run)],
            ["export", "--adapter", str(run), "--output", str(run.parent)],
            ["export", "--adapter", str(run), "--output", str(RunDir(run).adapter / "x")],
            ["export", "--adapter", str(run), "--output", str(foreign), "--force"],
            ["eval", "--model", "all-minilm-l6-v2", "--data-dir", data, "--output", str(root)],
            ["eval", "--model", "all-minilm-l6-v2", "--data-dir", data, "--output", str(RunDir(run).embed_file)],
            ["eval", "--model", "all-minilm-l6-v2", "--data-dir", data, "--output", str(root / "scores.txt")],
            ["embed", str(texts), "--model", "all-minilm-l6-v2", "--output", str(texts)],
            ["embed", str(texts), "--model", "all-minilm-l6-v2", "--output", str(foreign / "notes.npy.x")],
            ["report", str(run), "--output", str(RunDir(run).adapter)],
            ["reproduce", "--model", "smollm2-135m", "--data-dir", data, "--output", str(foreign)],
            ["demo", "--data-dir", data, "--output", str(foreign)],
        ],
    }


def time_case(args: list[str], env: dict) -> tuple[float, str | None]:
    """Wall seconds of ``slmembed ARGS`` and what was wrong with its answer (None: exit 2, one stderr line)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "slmembed", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    seconds = time.perf_counter() - start
    lines = done.stderr.strip().splitlines()
    ok = done.returncode == 2 and len(lines) == 1 and lines[0].startswith("slmembed: error:")
    return seconds, None if ok else f"exit {done.returncode}: {done.stderr.strip()[-300:]}"


def measure(src: str, root: Path, sample: int | None = None) -> dict:
    """Time every case (or ``sample`` evenly spaced cases a group) with the sources ``src``."""
    env = {**os.environ, "PYTHONPATH": src, "SLMEMBED_CACHE": str(root / "cache")}
    result = {}
    for group, lines in cases(root).items():
        if sample and len(lines) > sample:
            lines = lines[:: -(-len(lines) // sample)]
        times, wrong = [], []
        for args in lines:
            seconds, problem = time_case(args, env)
            times.append(seconds)
            if problem:
                wrong.append({"args": args, "problem": problem})
        slowest = max(range(len(times)), key=times.__getitem__)
        result[group] = {"cases": len(times), "median_s": round(statistics.median(times), 3),
                         "max_s": round(times[slowest], 3), "slowest": lines[slowest][:2],
                         "over_1s": sum(t > 1 for t in times), "not_one_line_exit_2": wrong}
        print(f"{src}: {group}: {result[group]['cases']} cases, median {result[group]['median_s']} s, "
              f"max {result[group]['max_s']} s ({' '.join(lines[slowest][:1])}), {len(wrong)} not one line/exit 2",
              flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    p.add_argument("--src", action="append", default=[], help="also time these sources (a checkout's src folder)")
    p.add_argument("--src-sample", type=int, default=20, help="cases a group for the --src sources (default 20)")
    args = p.parse_args()
    timings = {}
    for src, sample in [(str(Path(__file__).resolve().parents[1] / "src"), None),
                        *((s, args.src_sample) for s in args.src)]:
        with tempfile.TemporaryDirectory() as tmp:
            timings[src] = measure(src, Path(tmp), sample)
    save(args.output, {"cores": os.cpu_count(), "src_sample": args.src_sample, "timings": timings})


if __name__ == "__main__":
    main()
