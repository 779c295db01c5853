"""Atomic writes: a failed write leaves the old file; leftovers of killed writes are cleaned up."""

from __future__ import annotations

import os
import stat

import pytest

from slmembed import atomic
from slmembed.atomic import atomic_dir, atomic_path, clean_leftovers, write_text


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


def test_clean_leftovers_of_killed_writes(tmp_path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints" / ".step-0000004.x1y2.tmp").mkdir(parents=True)  # a checkpoint killed while saving
    (run / "checkpoints" / ".step-0000004.x1y2.tmp" / "adapter.safetensors").write_bytes(b"half")
    (run / "checkpoints" / "step-0000002").mkdir()
    (run / ".summary.json.abc.tmp").write_text("{")  # a file killed while writing
    (run / ".adapter.old").mkdir()  # killed between atomic_dir's two renames: the old adapter comes back
    (run / ".adapter.old" / "adapter_config.json").write_text("{}")
    (run / ".embed.old").mkdir()  # a stale .old beside a complete folder is removed
    (run / "embed").mkdir()
    (run / ".hidden").write_text("not ours")
    handled = clean_leftovers(run)
    assert len(handled) == 4
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == [
        ".hidden", "adapter", "adapter/adapter_config.json", "checkpoints", "checkpoints/step-0000002", "embed"]
    assert clean_leftovers(run) == []


def test_written_files_and_folders_get_the_umask_modes_not_private_ones(tmp_path) -> None:
    write_text(tmp_path / "a.txt", "x")
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("y")
    # As open() and mkdir() would make them under the process's umask (mkstemp and mkdtemp make them 0600 and 0700).
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~atomic._UMASK
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~atomic._UMASK
    assert os.umask(atomic._UMASK) == atomic._UMASK  # reading it left the process's umask as it was
