"""Atomic file writes: write under a temporary name in the same folder, fsync, then rename over the target.

A reader (or a run killed mid-write) sees either the old file or the complete new one, never a partial file.

Every write goes through a temporary folder ``.NAME.XXXXXXXX.tmp`` beside its target, which holds ``TEMP_MARKER``
(naming the target) from the moment it is created: what a killed write leaves behind is recognised as slmembed's by
that marker, never by its name alone, and removed by ``clean_leftovers`` (below a folder) or ``clean_temporaries``
(beside one output). The file or folder being written is ``NAME`` inside it, so the marker is never part of it.

A write that fails because the disk (or quota) is full raises ``OSError(ENOSPC)`` naming the target, whichever
library was writing (their own errors say so in words, or not at all), and leaves no temporary behind.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The process's umask, read once (os.umask can only be read by setting it): mkdtemp and some libraries (safetensors
# writes through its own private temporary file) create private (0700, 0600) entries, which the files and folders
# made here get instead as open() and mkdir() would make them.
_UMASK = os.umask(0o022)
os.umask(_UMASK)

TEMP_MARKER = ".slmembed-temporary"
_OLD = ".slmembed-replaced"  # in a temporary folder: the target it replaces, until the new one is in place
_FULL = {errno.ENOSPC, errno.EDQUOT}
_FULL_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether ``exc``, raised while writing in ``folder``, means that the disk or quota is full: an OSError with
    ENOSPC or EDQUOT in its chain (torch's error hides it there when it writes to a Python file), a library's error
    saying so in words (safetensors), or a write that failed without a reason (numpy's short writes, torch's
    iostream errors) on a filesystem with no space left."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in _FULL or any(w in str(cause) for w in _FULL_WORDS):
            return True
        cause = cause.__cause__ or cause.__context__
    try:
        unexplained = isinstance(exc, RuntimeError) or isinstance(exc, OSError) and exc.errno is None
        return unexplained and os.statvfs(folder).f_bavail == 0
    except OSError:
        return False


@contextmanager
def disk_errors(target: str | Path) -> Iterator[None]:
    """Raise a write failure caused by a full disk as ``OSError(ENOSPC, ..., target)``; other errors pass."""
    try:
        yield
    except Exception as exc:
        if _disk_full(exc, Path(target).parent):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target)) from exc
        raise


@contextmanager
def _temporary(target: Path) -> Iterator[Path]:
    """A marked temporary folder beside ``target`` (see the module docstring), removed on exit."""
    with disk_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        with disk_errors(target):  # inside the cleanup: a full disk is seen before the temporary files are removed
            (folder / TEMP_MARKER).write_text(target.name + "\n", encoding="utf-8")
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _public(path: Path) -> None:
    """Give ``path`` and everything below it the modes open() and mkdir() would under the umask."""
    for entry in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not entry.is_symlink():
            entry.chmod((0o777 if entry.is_dir() else 0o666) & ~_UMASK)


@contextmanager
def temporary_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty folder beside ``target`` for intermediate files; it is removed on exit."""
    target = Path(target)
    with _temporary(target) as folder:
        (folder / target.name).mkdir(mode=0o777 & ~_UMASK)
        yield folder / target.name


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary file path; on clean exit it is fsynced and renamed to ``target``, on error removed."""
    target = Path(target)
    with _temporary(target) as folder:
        tmp = folder / target.name
        tmp.touch()
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        _public(tmp)
        os.replace(tmp, target)
        _fsync_dir(target.parent)


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | Path, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def atomic_dir(target: str | Path, keep: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a temporary folder; on clean exit its files are fsynced and it replaces ``target`` by rename. The
    folders ``keep`` of the ``target`` replaced are kept in the new one, as hard links to their files: nothing is
    moved, so a write killed at any point leaves them where they were."""
    target = Path(target)
    with temporary_dir(target) as tmp:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        _public(tmp)
        for name in keep:
            if (target / name).is_dir():
                shutil.copytree(target / name, tmp / name, symlinks=True, copy_function=os.link)
                for folder in [tmp / name, *(tmp / name).rglob("*")]:
                    if folder.is_dir() and not folder.is_symlink():
                        _fsync_dir(folder)
        if target.exists():
            os.replace(target, tmp.parent / _OLD)  # put back by clean_leftovers if killed before the next rename
        os.replace(tmp, target)
        _fsync_dir(target.parent)


def temporary_target(folder: Path) -> str | None:
    """The name of the file or folder whose write (under way, or killed midway) ``folder`` is the marked temporary
    folder of; None if it is no such folder."""
    try:
        name = (folder / TEMP_MARKER).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    ours = folder.name.startswith(f".{name}.") and folder.name.endswith(".tmp") and "/" not in name
    return name if ours else None


def _undo(folder: Path, target: str | None = None) -> bool:
    """Undo the killed write (of ``target``, if given) whose marked temporary folder is ``folder``: the target it
    replaced comes back if it is missing. False if ``folder`` is not such a folder."""
    name = temporary_target(folder)
    if name is None or target not in (None, name):
        return False
    target = folder.parent / name
    if (folder / _OLD).exists() and not target.exists():
        os.replace(folder / _OLD, target)
    shutil.rmtree(folder)
    return True


def clean_leftovers(folder: str | Path) -> list[Path]:
    """Undo what writes killed midway left below ``folder`` (their marked temporary folders); return them."""
    handled = []
    for root, dirs, _ in os.walk(folder):
        for name in dirs:
            if name.startswith(".") and name.endswith(".tmp") and _undo(Path(root, name)):
                handled.append(Path(root, name))
        dirs[:] = [d for d in dirs if Path(root, d) not in handled]
    return handled


def clean_temporaries(target: str | Path) -> list[Path]:
    """Undo what writes of ``target`` killed midway left beside it; return the folders handled. Only for a caller
    that holds ``target`` (outputs.writing): another process's write in progress looks the same."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    found = sorted(target.parent.glob(f".{glob.escape(target.name)}.*.tmp"))
    return [p for p in found if p.is_dir() and _undo(p, target.name)]
