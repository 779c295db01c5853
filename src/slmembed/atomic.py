"""Atomic file writes: write to a temporary name in the same folder, fsync, then rename over the target.

A reader (or a run killed mid-write) sees either the old file or the complete new one, never a partial file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The process's umask, read once (os.umask can only be read by setting it): mkstemp and mkdtemp create private
# (0600, 0700) entries, which the files and folders made here get instead as open() and mkdir() would make them.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary file path; on clean exit it is fsynced and renamed to ``target``, on error removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        tmp_path.chmod(0o666 & ~_UMASK)
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | Path, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; on clean exit its files are fsynced and it replaces ``target`` by rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp.chmod(0o777 & ~_UMASK)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clean_leftovers(folder: str | Path) -> list[Path]:
    """Undo what writes killed midway left below ``folder``; return the paths handled.

    Temporary ``.NAME.*.tmp`` files and folders are removed. A ``.NAME.old`` folder (a kill between atomic_dir's two
    renames) is renamed back to NAME if NAME is missing, else removed.
    """
    handled = []
    for root, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            path = Path(root, name)
            if name.startswith(".") and name.endswith(".old") and path.is_dir():
                target = path.with_name(name[1:-4])
                shutil.rmtree(path) if target.exists() else os.replace(path, target)
            elif name.startswith(".") and name.endswith(".tmp"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            else:
                continue
            handled.append(path)
        dirs[:] = [d for d in dirs if Path(root, d) not in handled]  # gone or renamed: nothing to walk
    return handled
