"""bench/eval_phases.py times `slmembed eval`'s steps as the command takes them, and must follow the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from slmembed.data.sts import load_sts

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_eval_phases_times_every_step_of_the_command(tiny_models) -> None:
    """One fresh process over a tiny Llama on STS12: every phase of the command is timed, in order (wall and CPU
    seconds, none negative), on the device `slmembed eval` resolves, over each unique sentence of the set once."""
    out = subprocess.run([sys.executable, str(BENCH / "eval_phases.py"), "--model", str(tiny_models["llama"]),
                          "--tasks", "STS12", "--passes", "1"], capture_output=True, text=True, check=True, cwd=BENCH)
    result = json.loads(out.stdout.splitlines()[-1])
    phases = ["import torch", "import slmembed.cli", "read the sets", "resolve the device",
              "import slmembed.embedder, transformers", "load model", "tokenise and encode, first pass", "score"]
    assert list(result["phases_s"]) == phases and list(result["cpu_s"]) == phases
    assert all(v >= 0 for v in [*result["phases_s"].values(), *result["cpu_s"].values()])
    assert result["device"] == "cpu"
    sts = load_sts("STS12")
    assert result["sentences"] == len(set(sts.sentences1) | set(sts.sentences2))


def test_repeated_runs_time_the_process_outside_its_phases(tiny_models, tmp_path: Path) -> None:
    """With --repeats, each fresh process's phases are framed by what the parent sees: the interpreter's start before
    the first phase and the process's exit after the last, both positive and together less than the whole process."""
    out = tmp_path / "phases.json"
    subprocess.run([sys.executable, str(BENCH / "eval_phases.py"), "--model", str(tiny_models["llama"]), "--tasks",
                    "STS12", "--passes", "0", "--repeats", "1", "--phases-only", "--output", str(out)],
                   capture_output=True, text=True, check=True, cwd=BENCH)
    phases = json.loads(out.read_text())["phases_s"][0]
    names = list(phases)
    assert names[0] == "interpreter start" and names[-1] == "process exit" and names[-2] == "load model"
    assert phases["interpreter start"] > 0 and phases["process exit"] > 0
    assert phases["interpreter start"] + phases["process exit"] < sum(phases.values())
