"""Atomic writes: a failed write leaves the old file; leftovers of killed writes are recognised by their marker and
cleaned up; written files get the umask's modes; a full disk is an error naming the target, with nothing left."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from slmembed import atomic
from slmembed.atomic import atomic_dir, atomic_path, clean_leftovers, clean_temporaries, write_text


def test_failed_writes_keep_the_old_version(tmp_path) -> None:
    write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("half")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert (tmp_path / "a.txt").read_text() == "old" and not (tmp_path / "d").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def _killed(script: str, cwd: Path) -> None:
    """Run ``script`` (atomic's names imported), which SIGKILLs itself midway through a write."""
    code = "import os, signal\nfrom slmembed.atomic import atomic_dir, atomic_path\n" + textwrap.dedent(script)
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_clean_leftovers_of_killed_writes(tmp_path) -> None:
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "checkpoints" / "step-0000002").mkdir(parents=True)
    die = "os.kill(os.getpid(), signal.SIGKILL)"
    _killed(f"""
        with atomic_dir("checkpoints/step-0000004") as tmp:  # a checkpoint killed while saving
            (tmp / "adapter.safetensors").write_bytes(b"half")
            {die}""", run)
    _killed(f"""
        with atomic_path("summary.json") as tmp:  # a file killed while writing
            tmp.write_text("{{")
            {die}""", run)
    _killed(f"""
        replace = os.replace
        os.replace = lambda a, b: replace(a, b) if str(b) != "adapter" else {die}
        with atomic_dir("adapter") as tmp:  # killed between the two renames: the old adapter comes back
            (tmp / "adapter_config.json").write_text("new")""", run)
    assert not (run / "adapter").exists()
    (run / ".notes.x1.tmp").mkdir()  # temporary-looking folders without slmembed's marker are not touched
    (run / ".adapter.x2.tmp").mkdir()
    (run / ".adapter.x2.tmp" / "mine").write_text("keep")
    (run / ".hidden").write_text("not ours")
    assert len(clean_leftovers(run)) == 3
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == [
        ".adapter.x2.tmp", ".adapter.x2.tmp/mine", ".hidden", ".notes.x1.tmp", "adapter", "adapter/adapter_config.json",
        "checkpoints", "checkpoints/step-0000002"]
    assert (run / "adapter" / "adapter_config.json").read_text() == "{}"
    assert clean_leftovers(run) == []


def test_clean_temporaries_removes_only_its_targets(tmp_path) -> None:
    """Beside an output, only the marked temporaries of that output go: not another output's whose name it
    prefixes, not an unmarked folder of the same pattern."""
    die = "os.kill(os.getpid(), signal.SIGKILL)"
    for name in ("model", "model.v2"):
        _killed(f"""
            with atomic_dir({name!r}) as tmp:
                (tmp / "model.safetensors").write_bytes(b"x" * 1000)
                {die}""", tmp_path)
    (tmp_path / ".model.mine.tmp").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    assert len(before) == 3 and all(p.startswith(".model.") and p.endswith(".tmp") for p in before)
    handled = clean_temporaries(tmp_path / "model")
    assert len(handled) == 1 and handled[0].name.startswith(".model.") and not handled[0].name.startswith(".model.v2")
    assert sorted(p.name for p in tmp_path.iterdir()) == [n for n in before if n not in {handled[0].name}]


def _modes(tmp_path: Path, umask: int) -> dict[str, int]:
    """The modes of what atomic_path and atomic_dir write (a text file, safetensors and torch files in a folder)
    in a process with ``umask``."""
    code = f"""
        import json, os, stat, sys
        os.umask({umask:#o})
        import torch
        from safetensors.torch import save_file
        from slmembed.atomic import atomic_dir, write_text
        write_text("a.txt", "x")
        with atomic_dir("ckpt") as tmp:
            save_file({{"w": torch.zeros(2)}}, tmp / "adapter.safetensors")
            torch.save({{"step": 1}}, tmp / "optim.pt")
            (tmp / "sub").mkdir()
        print(json.dumps({{p: stat.S_IMODE(os.stat(p).st_mode)
                          for p in ["a.txt", "ckpt", "ckpt/adapter.safetensors", "ckpt/optim.pt", "ckpt/sub"]}}))
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_and_folders_get_the_umask_modes_not_private_ones(tmp_path, umask) -> None:
    # As open() and mkdir() would make them (mkdtemp and safetensors' own temporary file make them 0700 and 0600).
    files, folders = 0o666 & ~umask, 0o777 & ~umask
    assert _modes(tmp_path, umask) == {"a.txt": files, "ckpt": folders, "ckpt/adapter.safetensors": files,
                                       "ckpt/optim.pt": files, "ckpt/sub": folders}
    assert os.umask(atomic._UMASK) == atomic._UMASK  # reading it left the process's umask as it was


@pytest.fixture
def full_disk(tmp_path):
    """A folder on a 2 MiB tmpfs, and a function that fills it up (root only: skipped where mounts are refused)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")

    def fill() -> None:
        fd = os.open(mnt / "filler", os.O_CREAT | os.O_WRONLY)
        try:
            os.posix_fallocate(fd, 0, os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize)
        finally:
            os.close(fd)

    yield mnt, fill
    subprocess.run(["umount", "--lazy", str(mnt)], check=True)


def _numpy(tmp: Path) -> None:
    with open(tmp, "wb") as fh:
        np.save(fh, np.zeros(1_000_000))


WRITERS = {
    "safetensors": lambda tmp: save_file({"w": torch.zeros(1_000_000)}, tmp),
    "torch": lambda tmp: torch.save({"w": torch.zeros(1_000_000)}, tmp),
    "numpy": _numpy,
}


@pytest.mark.parametrize("writer", WRITERS)
def test_a_full_disk_is_an_error_naming_the_target_and_leaves_nothing(full_disk, writer) -> None:
    """Each library fails its own way on a full disk (safetensors in words, torch with a RuntimeError, numpy with a
    short write): every one becomes OSError(ENOSPC) naming the target; the old version and no temporary remain."""
    mnt, fill = full_disk
    (mnt / "old").mkdir()
    write_text(mnt / "old" / "f", "old")
    fill()
    for target, write in ((mnt / "w.bin", atomic_path), (mnt / "old", atomic_dir)):
        with pytest.raises(OSError) as exc, write(target) as tmp:
            WRITERS[writer](tmp if write is atomic_path else tmp / "f")
        assert (exc.value.errno, exc.value.filename) == (errno.ENOSPC, str(target))
    assert sorted(p.name for p in mnt.iterdir()) == ["filler", "old"] and (mnt / "old" / "f").read_text() == "old"
