"""Kill and resume: ``slmembed train`` killed with SIGKILL at seeded random points, between steps and inside checkpoint
saves, and resumed each time with ``--resume``, ends with the adapter, losses and schedule of an uninterrupted run.

The kills come from a small wrapper around the CLI (below), so slmembed itself holds no test hook. The seed is printed
and taken from $SLMEMBED_KILL_SEED if set, so a failure can be replayed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slmembed.config import Recipe
from slmembed.run import RunDir

STEPS, SAVE_EVERY, KILLS = 10, 2, 5

KILLER = '''"""Run the slmembed CLI; SIGKILL this process at the point $SLMEMBED_KILL names.

step:N        right after this process's N-th optimizer step
save_file:N   in the N-th safetensors save_file call, once half of the file is written
torch.save:N  in the N-th torch.save call, once half of the file is written
"""
import os
import signal
import sys

import safetensors.torch
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

kind, _, n = os.environ.get("SLMEMBED_KILL", "").partition(":")
calls = 0


def due():
    global calls
    calls += 1
    return calls == int(n)


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def half_then_die(save):
    def wrapper(obj, path, *args, **kwargs):
        save(obj, path, *args, **kwargs)
        if due():
            with open(path, "r+b") as fh:
                fh.truncate(os.path.getsize(path) // 2)
            die()
    return wrapper


if kind == "step":
    register_optimizer_step_post_hook(lambda *args: due() and die())
elif kind == "save_file":  # before slmembed and peft import it
    safetensors.torch.save_file = half_then_die(safetensors.torch.save_file)
elif kind == "torch.save":
    torch.save = half_then_die(torch.save)

from slmembed.cli import main

sys.exit(main())
'''


def _train(killer: Path, config: Path, run: Path, data_dir: Path, kill: str = "",
           resume: bool = False) -> subprocess.CompletedProcess:
    args = [sys.executable, str(killer), "train", "--recipe", str(config), "--output", str(run),
            "--data-dir", str(data_dir), "--device", "cpu", *(["--resume"] if resume else [])]
    return subprocess.run(args, env={**os.environ, "SLMEMBED_KILL": kill}, capture_output=True, text=True,
                          timeout=300)


def _kill_point(rng: random.Random, kind: str, start: int) -> tuple[str, str]:
    """The $SLMEMBED_KILL value for a process resuming at ``start``, and what it kills."""
    saves = [s for s in range(start + 1, STEPS) if s % SAVE_EVERY == 0]  # this process's checkpoints
    if kind == "torch.save" and saves:  # two per checkpoint: optim.pt, rng.pt
        n = rng.randint(1, 2 * len(saves))
        return f"torch.save:{n}", f"in {('optim.pt', 'rng.pt')[(n - 1) % 2]} of checkpoint {saves[(n - 1) // 2]}"
    if kind == "save_file":  # one per checkpoint, and the final adapter
        n = rng.randint(1, len(saves) + 1)
        return f"save_file:{n}", f"in checkpoint {saves[n - 1]}" if n <= len(saves) else "in the final adapter"
    n = rng.randint(1, STEPS - start)
    return f"step:{n}", f"after step {start + n}"


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path, tiny_models, data_dir) -> None:
    seed = int(os.environ.get("SLMEMBED_KILL_SEED") or random.randrange(2**32))
    print(f"kill seed: {seed} (replay with SLMEMBED_KILL_SEED={seed})")
    rng = random.Random(seed)
    recipe = Recipe()
    recipe.model.name, recipe.model.max_length = str(tiny_models["llama"]), 32
    recipe.data.sources, recipe.data.max_triplets = ["cad_snli"], 96
    for key, value in {"batch_size": 8, "max_steps": STEPS, "warmup_steps": 2, "lr": 1e-3, "save_every": SAVE_EVERY,
                       "keep_checkpoints": 2, "bf16": False, "log_every": 1}.items():
        setattr(recipe.train, key, value)  # LoRA dropout stays on: the random state must survive the kills too
    config, killer = tmp_path / "recipe.yaml", tmp_path / "killer.py"
    config.write_text(recipe.to_yaml())
    killer.write_text(KILLER)
    ref, run = tmp_path / "uninterrupted", tmp_path / "killed"
    done = _train(killer, config, ref, data_dir)
    assert done.returncode == 0, done.stderr[-3000:]

    kinds = ["step", "step", "save_file", "torch.save", rng.choice(["step", "save_file", "torch.save"])]
    rng.shuffle(kinds)
    survived = []
    for i, kind in enumerate(kinds):
        start = int(RunDir(run).checkpoints()[-1].name.split("-")[1]) if RunDir(run).checkpoints() else 0
        kill, where = _kill_point(rng, kind, start)
        proc = _train(killer, config, run, data_dir, kill, resume=i > 0)
        context = f"seed {seed}, kill {i + 1} ({kill}: {where}), after {survived}"
        assert proc.returncode == -signal.SIGKILL, f"{context}: {proc.stderr[-3000:]}"
        if not kill.startswith("step"):  # the kill left a half-written file behind a temporary name
            assert [p for p in run.rglob(".*.tmp") if p.is_dir()], context
        for ckpt in RunDir(run).checkpoints():  # every checkpoint under its final name is complete
            assert {p.name for p in ckpt.iterdir()} == {"adapter.safetensors", "optim.pt", "rng.pt", "state.json"}
            assert load_file(ckpt / "adapter.safetensors") and torch.load(ckpt / "optim.pt", weights_only=True)
        survived.append(f"{kill} ({where})")
    print("kills survived:", "; ".join(survived))

    proc = _train(killer, config, run, data_dir, resume=True)
    assert proc.returncode == 0, f"seed {seed}, after {survived}: {proc.stderr[-3000:]}"
    assert not list(run.rglob(".*.tmp")) and not list(run.rglob(".*.old"))  # leftovers cleaned on resume
    a = load_file(ref / "adapter/adapter_model.safetensors")
    b = load_file(run / "adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 8
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=lambda m: f"seed {seed}, {survived}: {m}")
    want, got = _log(ref), _log(run)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    assert [r["lr"] for r in got] == [r["lr"] for r in want]  # the schedule
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-5)  # the data order
