"""Training: a real run lowers the loss; resume reproduces an uninterrupted run; a NaN loss stops the run, and
--resume continues it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from slmembed import models, tuning
from slmembed import train as train_mod
from slmembed.config import Recipe, load_recipe, with_overrides
from slmembed.data.nli import load_triplets
from slmembed.errors import SlmembedError
from slmembed.loading import load_embedder
from slmembed.losses import LOSSES, REFERENCE
from slmembed.losses.infonce import info_nce
from slmembed.run import RunDir


def _heldout_loss(model: str | None, adapter, triplets) -> float:
    emb = load_embedder(model, adapter, device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        vecs = [emb.forward_ids(emb.tokenize([t[c] for t in triplets])) for c in range(3)]
    return info_nce(*vecs, temperature=0.05).item()


def test_real_training_on_smollm2_lowers_the_loss(tmp_path, data_dir) -> None:
    recipe = with_overrides(load_recipe("demo-smollm2"), [
        "train.max_steps=6", "train.batch_size=16", "train.warmup_steps=2", "train.log_every=1", "train.lr=1e-3",
        "train.schedule=constant_with_warmup",
        "data.sources=[lingnli]"])
    summary = train_mod.train(recipe, tmp_path / "run", data_dir=data_dir, progress=False)
    assert summary["steps"] == 6 and summary["triplets_seen"] == 96
    log = [json.loads(line) for line in (tmp_path / "run/train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    heldout = load_triplets(["new_protocols"], data_dir=data_dir).triplets[:48]  # not trained on
    before = _heldout_loss("smollm2-135m", None, heldout)
    after = _heldout_loss(None, tmp_path / "run", heldout)
    assert after < before - 0.4, (before, after)  # 4.63 -> 3.97 on 2026-12-01 (12 steps: 2.30)


def _tiny_recipe(tiny_models, **train) -> Recipe:
    recipe = Recipe()
    recipe.model.name = str(tiny_models["llama"])
    recipe.model.max_length = 32
    recipe.data.sources, recipe.data.max_triplets = ["cad_snli"], 64
    for key, value in {"batch_size": 8, "max_steps": 6, "warmup_steps": 2, "lr": 1e-3, "save_every": 2,
                       "bf16": False, "log_every": 1, **train}.items():
        setattr(recipe.train, key, value)
    return recipe


@pytest.mark.parametrize("native", [False, True])
def test_bf16_is_used_only_where_the_device_computes_it(tmp_path, tiny_models, data_dir, monkeypatch, capsys,
                                                       native: bool) -> None:
    monkeypatch.setattr(tuning, "computes_bf16", lambda device: native)
    loaded = []
    load = models.load
    monkeypatch.setattr(models, "load", lambda *a, **k: loaded.append(k["dtype"]) or load(*a, **k))
    summary = train_mod.train(_tiny_recipe(tiny_models, bf16=True, max_steps=2), tmp_path / "run", data_dir=data_dir,
                              progress=False)
    assert summary["bf16"] is native and loaded == [torch.bfloat16 if native else torch.float32]
    assert ("training in float32" in capsys.readouterr().out) is not native


def test_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_models, data_dir) -> None:
    recipe = _tiny_recipe(tiny_models)
    train_mod.train(recipe, tmp_path / "a", data_dir=data_dir, progress=False)
    train_mod.train(recipe, tmp_path / "b", data_dir=data_dir, progress=False)
    # Make run b look interrupted after its step-4 checkpoint, then resume it.
    for name in ("adapter", "summary.json", "embed.json"):
        target = tmp_path / "b" / name
        train_mod.shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert [p.name for p in RunDir(tmp_path / "b").checkpoints()] == ["step-0000002", "step-0000004"]
    train_mod.train(recipe, tmp_path / "b", data_dir=data_dir, resume=True, progress=False)
    a = load_file(tmp_path / "a/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "b/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 8  # 2 layers x (q, v) x (A, B)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
    assert a[next(iter(a))].abs().sum() > 0


def test_existing_run_needs_resume_and_a_foreign_folder_is_refused(tmp_path, tiny_models, data_dir) -> None:
    recipe = _tiny_recipe(tiny_models, max_steps=2)
    train_mod.train(recipe, tmp_path / "run", data_dir=data_dir, progress=False)
    with pytest.raises(SlmembedError, match="--resume"):
        train_mod.train(recipe, tmp_path / "run", data_dir=data_dir, progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x").write_text("")
    with pytest.raises(SlmembedError, match="did not write"):
        train_mod.train(recipe, tmp_path / "mine", data_dir=data_dir, progress=False, resume=True)


def test_nan_loss_stops_naming_its_step_keeps_the_checkpoint_before_and_resumes(tmp_path, tiny_models, data_dir,
                                                                               capsys) -> None:
    """NaN embeddings in step 5 (from global torch hooks, not slmembed's internals): ``slmembed train`` exits 2 with
    one error line naming step 5, checkpoints 2 and 4 stay as an unfaulted run wrote them, and ``--resume`` (fault
    gone) ends with the unfaulted run's adapter."""
    from torch.nn.modules.module import register_module_forward_hook
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from slmembed.cli import main

    config = tmp_path / "recipe.yaml"
    config.write_text(_tiny_recipe(tiny_models, max_steps=8, log_every=4, keep_checkpoints=3).to_yaml())

    def run(name: str, *extra: str) -> int:
        return main(["train", "--recipe", str(config), "--output", str(tmp_path / name), "--data-dir", str(data_dir),
                     "--device", "cpu", *extra])

    assert run("clean") == 0
    steps = [0]

    def poison(module, args, output):
        if isinstance(module, torch.nn.Embedding) and steps[0] == 4:  # the forward of step 5
            return output * float("nan")

    hooks = [register_optimizer_step_post_hook(lambda *args: steps.__setitem__(0, steps[0] + 1)),
             register_module_forward_hook(poison)]
    capsys.readouterr()
    try:
        assert run("faulty") == 2
    finally:
        for hook in hooks:
            hook.remove()
    err = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert err.startswith("slmembed: error: ") and re.search(r"\bstep 5\b", err) and "--resume" in err, err
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    assert [p.name for p in RunDir(faulty).checkpoints()] == ["step-0000002", "step-0000004"]
    for ckpt in RunDir(faulty).checkpoints():
        kept, want = (load_file(d / "checkpoints" / ckpt.name / "adapter.safetensors") for d in (faulty, clean))
        assert all(torch.equal(kept[k], want[k]) for k in want)
    assert not (faulty / "adapter").exists()

    assert run("faulty", "--resume") == 0
    a, b = (load_file(d / "adapter/adapter_model.safetensors") for d in (clean, faulty))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)
    logs = [[json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines()] for d in (clean, faulty)]
    assert [r["step"] for r in logs[1]] == [r["step"] for r in logs[0]] == [4, 8]
    assert [r["loss"] for r in logs[1]] == pytest.approx([r["loss"] for r in logs[0]], abs=1e-5)


def test_batches_are_a_function_of_the_step() -> None:
    first = [train_mod.batch_indices(50, 8, s, seed=1) for s in range(12)]
    again = [train_mod.batch_indices(50, 8, s, seed=1) for s in range(12)]
    assert all((a == b).all() for a, b in zip(first, again, strict=True))
    epoch0 = sorted(int(i) for b in first[:6] for i in b)
    assert len(set(epoch0)) == 48  # one epoch: 6 disjoint batches of 8, remainder dropped


@pytest.mark.parametrize("world,per_rank", [(2, 60), (2, 7), (3, 5), (4, 512)])
def test_ranks_get_equal_rows_and_nearly_equal_tokens(world: int, per_rank: int) -> None:
    """rank_rows splits a global batch into equal, disjoint shares whose token counts differ by at most the largest
    row's."""
    rng = np.random.default_rng(world)
    cost = rng.integers(10, 150, size=5000)
    rows = rng.permutation(5000)[: world * per_rank]
    shares = [train_mod.rank_rows(rows, cost, r, world) for r in range(world)]
    assert all(len(x) == per_rank for x in shares)
    assert sorted(np.concatenate(shares).tolist()) == sorted(rows.tolist())
    tokens = [int(cost[x].sum()) for x in shares]
    assert max(tokens) - min(tokens) <= cost[rows].max()
    assert (train_mod.rank_rows(rows, cost, 0, 1) == rows).all()


def test_profile_writes_each_steps_time_per_process(tmp_path, tiny_models, data_dir) -> None:
    """--profile FIRST:COUNT: the run folder's profile/ holds the window's per-step times and the operator tables."""
    recipe = _tiny_recipe(tiny_models, max_steps=5, save_every=100)
    train_mod.train(recipe, tmp_path / "run", data_dir=data_dir, progress=False, profile=(2, 2))
    summary = json.loads((tmp_path / "run/profile/rank0.json").read_text())
    assert summary["steps"] == "3..4" and summary["rank"] == 0
    assert summary["host_busy_ms_per_step"] > 0 and 0 < summary["wall_ms_per_step"] < 60_000
    assert summary["gpu_busy_ms_per_step"] == 0 and summary["kernels_per_step"] == 0  # on the CPU
    assert "aten::mm" in (tmp_path / "run/profile/rank0.txt").read_text()


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
         "train", "--recipe", str(double), "--output", str(tmp_path / "two"), "--data-dir", str(data_dir),
         "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "two/summary.json").read_text())
    assert summary["world_size"] == 2 and summary["batch_size"] == 8
    a = load_file(tmp_path / "one/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "two/adapter/adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    logged = [[json.loads(line)["loss"] for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
              for run in ("one", "two")]
    assert len(logged[0]) == 4 and logged[0] == pytest.approx(logged[1], rel=1e-4)  # the global batch's loss


def test_the_recipe_names_the_objective(tmp_path, tiny_models, data_dir) -> None:
    """train.loss picks the objective from losses.LOSSES: the same first step logs each one's own loss."""
    first = {}
    for name in LOSSES:
        guide = str(tiny_models["gemma"]) if name in REFERENCE else None  # those objectives learn from a model
        recipe = _tiny_recipe(tiny_models, max_steps=1, loss=name, reference=guide)
        recipe.lora.dropout = 0.0  # the same forward for both, so the losses differ by the objective alone
        train_mod.train(recipe, tmp_path / name, data_dir=data_dir, progress=False)
        first[name] = json.loads((tmp_path / name / "train_log.jsonl").read_text().splitlines()[0])["loss"]
    assert first["symmetric_infonce"] != pytest.approx(first["infonce"], abs=1e-4)
    assert first["angle_infonce"] > first["infonce"] + 1e-4  # plus 0.02 times the angle term, which is > 0
    assert load_recipe(tmp_path / "symmetric_infonce" / "recipe.yaml").train.loss == "symmetric_infonce"


@pytest.mark.parametrize("fails", [True, False])
def test_what_training_opens_is_closed_when_a_step_raises_or_the_run_ends(tmp_path, tiny_models, data_dir,
                                                                          monkeypatch, fails) -> None:
    """A step that raises (at step 2, from a global optimizer hook) leaves nothing open: the progress bar and the
    TensorBoard writer closed, the profiler stopped, no thread left, and the liveness watcher (a real one, over a
    store served here) ended without saying its process finished, so that the other processes stop too. A run that
    ends says it finished."""
    import threading
    from datetime import timedelta

    from torch.distributed import TCPStore
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.std import tqdm

    from slmembed import liveness

    store = TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    monkeypatch.setenv("SLMEMBED_LOST_AFTER_S", "600")  # the peer it watches for never comes: not lost meanwhile
    watchers, start = [], liveness.start
    monkeypatch.setattr(liveness, "start", lambda rank, world: watchers.append(start(0, 2)) or watchers[-1])
    closed = []
    for cls in (SummaryWriter, tqdm):
        monkeypatch.setattr(cls, "close", lambda self, close=cls.close: closed.append(type(self)) or close(self))
    steps = [0]

    def fault(*_) -> None:
        steps[0] += 1
        if steps[0] == 1:  # the watcher is up (its first beat) before the run can end: a busy machine starts it slowly
            store.wait(["slmembed/0/beat/0"], timedelta(seconds=120))
        if fails and steps[0] == 2:
            raise RuntimeError("the second step fails")

    threads = set(threading.enumerate())
    hook = register_optimizer_step_pre_hook(fault)
    try:
        recipe = _tiny_recipe(tiny_models, max_steps=4, save_every=100)
        if fails:
            with pytest.raises(RuntimeError, match="the second step fails"):
                train_mod.train(recipe, tmp_path / "run", data_dir=data_dir, profile=(1, 2))
        else:
            train_mod.train(recipe, tmp_path / "run", data_dir=data_dir, profile=(3, 2))  # still profiling at the end
        left = {"watchers running": [w.proc.poll() is None for w in watchers],
                "said finished": store.add("slmembed/0/done/0", 0),
                "writer closed": SummaryWriter in closed, "bar closed": any(issubclass(c, tqdm) for c in closed),
                "profiling": torch.autograd._profiler_enabled(),
                "threads": [t.name for t in threading.enumerate() if t not in threads and t.is_alive()]}
        assert left == {"watchers running": [False], "said finished": 0 if fails else 1, "writer closed": True,
                        "bar closed": True, "profiling": False, "threads": []}
    finally:
        hook.remove()
        for watcher in watchers:
            watcher.proc.kill()


def test_resume_refuses_a_finished_run_and_touches_nothing(tmp_path, tiny_models, data_dir) -> None:
    run = tmp_path / "run"
    recipe = _tiny_recipe(tiny_models, max_steps=2, save_every=10)  # finished without a checkpoint
    train_mod.train(recipe, run, data_dir=data_dir, progress=False)
    (run / "report.md").write_text("# report\n")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(SlmembedError, match=re.escape(f"{run} is finished (2 steps); nothing to resume")):
        train_mod.train(recipe, run, data_dir=data_dir, progress=False, resume=True)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_checkpoint_that_is_not_slmembeds_is_one_line(tmp_path, tiny_models, data_dir) -> None:
    """A checkpoint file holding other Python objects (it cannot load with weights_only) names the file and what
    was expected instead of torch's traceback."""
    run = tmp_path / "run"
    recipe = _tiny_recipe(tiny_models, max_steps=4, save_every=2)
    (run / "checkpoints").mkdir(parents=True)
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    ckpt = run / "checkpoints" / "step-0000002"
    ckpt.mkdir()
    torch.save({"optimizer": {}, "scheduler": {}, "extra": re.compile("x")}, ckpt / "optim.pt")
    torch.save({"cpu": torch.get_rng_state()}, ckpt / "rng.pt")
    (ckpt / "state.json").write_text('{"step": 2}')
    with pytest.raises(SlmembedError) as exc:
        train_mod.train(recipe, run, data_dir=data_dir, progress=False, resume=True)
    message = str(exc.value)
    assert message.startswith(f"{ckpt / 'optim.pt'}: cannot be read as the optimizer and schedule states") and \
        "\n" not in message and "delete this checkpoint folder" in message, message


FULL = '''"""Run the slmembed CLI; at the N-th call of $SLMEMBED_FULL's writer (save_file, torch.save or numpy.save) the
disk is full: the tmpfs $SLMEMBED_FILL is filled up, or, without one, the call fails as the library does on a full
disk."""
import errno
import os
import sys

import numpy
import safetensors.torch
import torch
from safetensors import SafetensorError

kind, _, n = os.environ["SLMEMBED_FULL"].partition(":")
fill = os.environ.get("SLMEMBED_FILL")
calls = 0


def full(save, error):
    def wrapper(*args, **kwargs):
        global calls
        calls += 1
        if calls == int(n):
            if not fill:
                error()
            fd = os.open(os.path.join(fill, "filler"), os.O_CREAT | os.O_WRONLY)
            stats = os.statvfs(fill)
            os.posix_fallocate(fd, 0, stats.f_bavail * stats.f_frsize)
            os.close(fd)
        return save(*args, **kwargs)
    return wrapper


def raises(error):
    def fail():
        raise error
    return fail


def torch_error():  # as torch.save into a Python file fails
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


if kind == "save_file":  # before slmembed, transformers and peft import it
    safetensors.torch.save_file = full(safetensors.torch.save_file, raises(SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)")))
elif kind == "torch.save":
    torch.save = full(torch.save, torch_error)
elif kind == "numpy.save":
    numpy.save = full(numpy.save, raises(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))

from slmembed.cli import main

sys.exit(main())
'''


@pytest.fixture(params=["tmpfs", "injected"])
def disk(request, tmp_path):
    """A folder whose disk fills when a FULL wrapper says (a 64 MiB tmpfs where mounts are allowed, else the
    writers' errors injected), and the environment that tells the wrapper so."""
    folder = tmp_path / "disk"
    folder.mkdir()
    env = {**os.environ}
    if request.param == "tmpfs":
        mount = ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)]
        if subprocess.run(mount, capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here")
        env["SLMEMBED_FILL"] = str(folder)
    (tmp_path / "full.py").write_text(FULL)
    yield folder, lambda args, full: subprocess.run([sys.executable, str(tmp_path / "full.py"), *args],
                                                    env={**env, "SLMEMBED_FULL": full}, capture_output=True,
                                                    text=True, timeout=300)
    if request.param == "tmpfs":
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def _no_space(proc, target: Path) -> None:
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line.partition("slmembed: error:")[2] for line in proc.stderr.splitlines() if "slmembed: error:" in line]
    assert errors == [f" cannot write {target}: no space left on device"], proc.stderr[-3000:]  # embed's bar stays
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("full, target", [("save_file:1", "checkpoints/step-0000002"),
                                          ("torch.save:3", "checkpoints/step-0000004"), ("save_file:3", "adapter")])
def test_a_full_disk_stops_train_in_one_line_and_keeps_its_checkpoints(disk, tiny_models, data_dir, full,
                                                                      target) -> None:
    """A full disk while a checkpoint or the final adapter is written: one line naming it, exit 1; the checkpoints
    before it are complete, nothing half-written or temporary remains, and --resume finishes the run."""
    folder, slmembed = disk
    config, run = folder.parent / "recipe.yaml", folder / "run"
    config.write_text(_tiny_recipe(tiny_models, max_steps=6, save_every=2, keep_checkpoints=5).to_yaml())
    args = ["train", "--recipe", str(config), "--output", str(run), "--data-dir", str(data_dir), "--device", "cpu"]
    _no_space(slmembed(args, full), run / target)
    assert not list(run.rglob(".*.tmp")) and not (run / "adapter").exists() and not (run / target).exists()
    for ckpt in RunDir(run).checkpoints():
        assert load_file(ckpt / "adapter.safetensors") and torch.load(ckpt / "optim.pt", weights_only=True)
    assert len(RunDir(run).checkpoints()) == int(target.split("-")[-1]) // 2 - 1 if "step" in target else 2
    (folder / "filler").unlink(missing_ok=True)
    proc = slmembed([*args, "--resume"], "none:0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 6 and load_file(
        run / "adapter" / "adapter_model.safetensors")


def test_a_full_disk_stops_embed_and_export_in_one_line(disk, tiny_models, data_dir, tmp_path) -> None:
    folder, slmembed = disk
    run = tmp_path / "run"
    train_mod.train(_tiny_recipe(tiny_models, max_steps=2), run, data_dir=data_dir, progress=False)
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"sentence number {i}\n" for i in range(10)))
    out = folder / "v.npy"
    args = ["embed", str(texts), "--run", str(run), "--output", str(out), "--chunk-size", "4", "--device", "cpu"]
    _no_space(slmembed(args, "numpy.save:2"), folder / "v.npy.parts" / "00000001.npy")
    assert sorted(p.name for p in (folder / "v.npy.parts").iterdir()) == ["00000000.npy", "manifest.json"]
    model = folder / "model"
    _no_space(slmembed(["export", "--run", str(run), "--output", str(model), "--format", "hf"], "save_file:1"),
              model)
    assert sorted(p.name for p in folder.iterdir()) in (["v.npy.parts"], ["filler", "v.npy.parts"])
