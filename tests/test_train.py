"""Training: a real run lowers the loss; resume reproduces an uninterrupted run; a NaN loss stops the run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from slmembed import train as train_mod
from slmembed.config import Recipe, load_recipe, with_overrides
from slmembed.data.nli import load_triplets
from slmembed.embedder import load_embedder
from slmembed.errors import SlmembedError
from slmembed.loss import info_nce


def _heldout_loss(model: str | None, adapter, triplets) -> float:
    emb = load_embedder(model, adapter, device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        vecs = [emb.forward_ids(emb.tokenize([t[c] for t in triplets])) for c in range(3)]
    return info_nce(*vecs, temperature=0.05).item()


def test_real_training_on_smollm2_lowers_the_loss(tmp_path, data_dir) -> None:
    recipe = with_overrides(load_recipe("demo-smollm2"), [
        "train.max_steps=12", "train.batch_size=16", "train.warmup_steps=2", "train.log_every=1", "train.lr=1e-3",
        "train.schedule=constant_with_warmup",
        "data.sources=[lingnli]"])
    summary = train_mod.train(recipe, tmp_path / "run", data_dir=data_dir, progress=False)
    assert summary["steps"] == 12 and summary["triplets_seen"] == 192
    log = [json.loads(line) for line in (tmp_path / "run/train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    heldout = load_triplets(["new_protocols"], data_dir=data_dir).triplets[:48]  # not trained on
    before = _heldout_loss("smollm2-135m", None, heldout)
    after = _heldout_loss(None, tmp_path / "run", heldout)
    assert after < before - 0.2, (before, after)


def _tiny_recipe(tiny_models, **train) -> Recipe:
    recipe = Recipe()
    recipe.model.name = str(tiny_models["llama"])
    recipe.model.max_length = 32
    recipe.data.sources, recipe.data.max_triplets = ["cad_snli"], 64
    for key, value in {"batch_size": 8, "max_steps": 6, "warmup_steps": 2, "lr": 1e-3, "save_every": 2,
                       "bf16": False, "log_every": 1, **train}.items():
        setattr(recipe.train, key, value)
    return recipe


def test_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_models, data_dir) -> None:
    recipe = _tiny_recipe(tiny_models)
    train_mod.train(recipe, tmp_path / "a", data_dir=data_dir, progress=False)
    train_mod.train(recipe, tmp_path / "b", data_dir=data_dir, progress=False)
    # Make run b look interrupted after its step-4 checkpoint, then resume it.
    for name in ("adapter", "summary.json", "embed.json"):
        target = tmp_path / "b" / name
        train_mod.shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert [p.name for p in train_mod.checkpoints(tmp_path / "b")] == ["step-0000002", "step-0000004"]
    train_mod.train(recipe, tmp_path / "b", data_dir=data_dir, resume=True, progress=False)
    a = load_file(tmp_path / "a/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "b/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 8  # 2 layers x (q, v) x (A, B)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
    assert a[next(iter(a))].abs().sum() > 0


def test_existing_run_needs_resume(tmp_path, tiny_models, data_dir) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("")
    with pytest.raises(SlmembedError, match="--resume"):
        train_mod.train(_tiny_recipe(tiny_models), tmp_path / "run", data_dir=data_dir, progress=False)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, tiny_models, data_dir, monkeypatch) -> None:
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = info_nce(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train_mod, "info_nce", flaky)
    with pytest.raises(SlmembedError, match="loss is nan at step 3"):
        train_mod.train(_tiny_recipe(tiny_models), tmp_path / "run", data_dir=data_dir, progress=False)
    assert [p.name for p in train_mod.checkpoints(tmp_path / "run")] == ["step-0000002"]


def test_batches_are_a_function_of_the_step() -> None:
    first = [train_mod.batch_indices(50, 8, s, seed=1) for s in range(12)]
    assert all((a == b).all() for a, b in zip(first, [train_mod.batch_indices(50, 8, s, seed=1) for s in range(12)]))
    epoch0 = sorted(int(i) for b in first[:6] for i in b)
    assert len(set(epoch0)) == 48  # one epoch: 6 disjoint batches of 8, remainder dropped


def test_torchrun_two_cpu_ranks_equal_one_process_at_twice_the_batch(tmp_path, tiny_models, data_dir) -> None:
    """Under torchrun (gloo, 2 processes at batch 4) the adapter equals one process at batch 8.

    The loss gathers both ranks' candidates with gradients and DDP averages the gradients, so the two runs see the
    same global batches, the same candidates and the same updates.
    """
    import subprocess
    import sys

    recipe = _tiny_recipe(tiny_models, batch_size=8, max_steps=4, save_every=100)
    recipe.lora.dropout = 0.0
    single = tmp_path / "single.yaml"
    single.write_text(recipe.to_yaml())
    recipe.train.batch_size = 4
    double = tmp_path / "double.yaml"
    double.write_text(recipe.to_yaml())
    train_mod.train(load_recipe(single), tmp_path / "one", data_dir=data_dir, progress=False)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "slmembed",
         "train", "--config", str(double), "--output", str(tmp_path / "two"), "--data-dir", str(data_dir),
         "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "two/summary.json").read_text())
    assert summary["world_size"] == 2 and summary["batch_size"] == 8
    a = load_file(tmp_path / "one/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "two/adapter/adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
