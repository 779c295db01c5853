"""Several machines, simulated on one host with ``bench/multi_node.py``: two torchrun launchers of one CPU process each
(``--nnodes=2``, c10d rendezvous over loopback, gloo) train the adapter that one launcher of two processes trains, and
when one launcher is frozen with its worker after a checkpoint (SIGSTOP: its connections stay open, so the other's
collectives would wait 30 minutes), the other stops by itself within seconds (liveness.py's watcher, told to give up
after 5 s of silence) and ``--resume`` on both ends with the uninterrupted run's adapter and losses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from slmembed.config import Recipe

BENCH = Path(__file__).resolve().parents[1] / "bench" / "multi_node.py"


def test_two_launchers_equal_one_and_resume_after_one_is_killed(tmp_path, tiny_models, data_dir) -> None:
    recipe = Recipe()
    recipe.model.name, recipe.model.max_length = str(tiny_models["llama"]), 32
    recipe.data.sources, recipe.data.max_triplets = ["cad_snli"], 256
    recipe.lora.dropout = 0.0
    recipe.train.warmup_steps, recipe.train.lr, recipe.train.bf16 = 2, 1e-3, False
    (tmp_path / "tiny.yaml").write_text(recipe.to_yaml())
    out = tmp_path / "multi-node.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--config", str(tmp_path / "tiny.yaml"), "--device", "cpu",
         "--per-process-batch", "4", "--steps", "24", "--save-every", "4", "--grace", "60", "--lose", "freeze",
         "--data-dir", str(data_dir), "--output", str(out)], capture_output=True, text=True, timeout=900,
        env={**os.environ, "SLMEMBED_LOST_AFTER_S": "5"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert (result["world_size"], result["global_batch"], result["adapter_tensors"]) == (2, 8, 8)
    assert result["adapter_max_abs"] > 0.01  # the adapters moved away from LoRA's zero B
    assert result["max_abs_diff_two_launchers_vs_single"] <= 1e-6
    assert result["max_abs_diff_resumed_vs_uninterrupted"] <= 1e-6
    killed = result["killed_and_resumed"]
    survivor = killed["survivor"]
    assert survivor["exit_code"] not in (0, None) and survivor["stopped_after_s"] < 30  # by itself, as a failure
    # 5 s of silence allowed, 10 before the lost process's watcher first beat
    assert re.search(r"process 1 of 2 has not been heard from for ([56]|1[01]) s", survivor["said"])
    assert 4 <= killed["resumed_from_step"] < 24
    losses = result["losses"]
    assert len(losses["single"]) == 24
    assert losses["two_launchers"] == pytest.approx(losses["single"], rel=1e-5)
    assert losses["resumed"] == pytest.approx(losses["two_launchers"], rel=1e-5)
