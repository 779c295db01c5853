"""Where commands write, checked before any work: no command deletes or overwrites what it did not write.

Every command checks its outputs first (before loading data or a model), and a bad one is a one-line error:

* An output may not be, contain or lie inside one of the command's inputs (a run folder, a model folder, an input
  file), so that writing it cannot destroy them; nor be or contain a folder it only reads from (the data folder).
* A folder output (training run, exported model, reproduce results, report folder) must be missing, empty, or an
  earlier output of the same command. Such folders carry ``MARKER``, which names the command and the entries it
  wrote; other commands record there the files they add (``eval.json``, ``report.md``). An earlier output is
  replaced only when asked (``--force``), and only if everything in it was written by slmembed: a file the user put
  there stops the command instead of being deleted.
* A file output (an eval JSON, embeddings) replaces an existing file only when asked, and only if that file is
  recognisably an earlier output of the same command.
* The output's folder must be creatable and writable, so a command does not find out after minutes of work.
* One process writes an output at a time (``writing``): ``train``, ``embed``, ``export`` and ``reproduce`` hold a lock
  on theirs for the whole run, and a second process is refused at once, told the holder's PID.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from slmembed.atomic import clean_temporaries, write_json
from slmembed.errors import SlmembedError
from slmembed.run import PARTS, RunDir

MARKER = ".slmembed-output.json"
_T = TypeVar("_T")
_held: set[Path] = set()  # the lock files this process holds (reproduce's train holds its run folder already)


def _marker(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("command"), str) else None


def written_by(folder: Path) -> str | None:
    """The command whose output ``folder`` is, or None. Runs trained before markers existed count as ``train``."""
    marker = _marker(folder)
    if marker:
        return marker["command"]
    if RunDir(folder).holds_run():
        return "train"
    return None


def mark(folder: str | Path, command: str, entries: Iterable[str]) -> None:
    """Record that ``command`` wrote ``folder`` and which top-level ``entries`` it holds (keeping what other commands
    recorded as added to an earlier output of the same command)."""
    earlier = _marker(Path(folder)) or {}
    added = earlier.get("added", {}) if earlier.get("command") == command else {}
    write_json(Path(folder) / MARKER, {"command": command, "entries": sorted(set(entries)), "added": added})


def record_added(folder: str | Path, name: str, command: str) -> None:
    """Record in ``folder``'s marker, if it has one, that ``command`` added the file ``name``."""
    folder = Path(folder)
    marker = _marker(folder)
    if marker is not None:
        marker.setdefault("added", {})[name] = command
        write_json(folder / MARKER, marker)


def _forms(path: Path) -> set[Path]:
    """``path`` made absolute as written, and with its links resolved."""
    return {Path(os.path.abspath(path)), path.resolve()}


def _overlap(output: Path, inputs: Iterable[str | Path | None], around: Iterable[str | Path | None]) -> None:
    """Raise if ``output`` is, contains or lies inside one of ``inputs``, or is or contains one of ``around``. An
    ``around`` folder that slmembed wrote (a run) holds its work in subfolders (``adapter/``, ``checkpoints/``):
    those are inputs, so an output may sit beside the run's files but never inside them."""
    around = [a for a in around if a is not None]
    parts = [sub for a in around if Path(a).is_dir() and written_by(Path(a)) for sub in Path(a).iterdir()
             if sub.is_dir()]
    for item, inside in [*((i, True) for i in [*inputs, *parts]), *((a, False) for a in around)]:
        if item is None or not Path(item).exists():
            continue
        # Each path as written and with links resolved: a link to the data must not hide it.
        pairs = [(o, i) for o in _forms(output) for i in _forms(Path(item))]
        how = next((h for o, i in pairs for h, hit in (("is", o == i), ("lies inside", inside and i in o.parents),
                                                        ("contains", o in i.parents)) if hit), None)
        if how:
            raise SlmembedError(f"output {output} {how} the input {item}: writing it could destroy the input; "
                                "choose another output")


def _inside(item: Path, folder: Path) -> bool:
    """Whether ``item`` lies inside ``folder`` (as written, or with links resolved)."""
    return any(f in i.parents for i in _forms(item) for f in _forms(folder))


def _writable(path: Path) -> None:
    """Raise unless ``path`` could be created: its nearest existing ancestor is a folder we may write in."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SlmembedError(f"cannot write {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise SlmembedError(f"cannot write {path}: no permission to write in {ancestor}")


def check_folder(path: str | Path, command: str, *, inputs: Iterable[str | Path | None] = (),
                 around: Iterable[str | Path | None] = (), force: bool = False, resume: bool | None = None,
                 keep: Collection[str] = ()) -> bool:
    """Check, before any work, that ``command`` may write the folder ``path``; return True if it holds an earlier
    output of ``command`` (to be replaced with ``force``, or continued with ``resume``; None: it cannot be).
    ``keep``: entries of the folder that ``command`` keeps as they are (run.PARTS, for train and soup), whose
    contents may be its inputs."""
    path = Path(path)
    kept = [path / name for name in keep]
    _overlap(path, [i for i in inputs if i is None or not any(_inside(Path(i), k) for k in kept)], around)
    if path.exists() and not path.is_dir():
        raise SlmembedError(f"{path} is a file; the output must be a folder")
    if not path.exists() or not any(e.name not in keep for e in path.iterdir()):
        _writable(path / "x")
        return False
    if written_by(path) != command:
        raise SlmembedError(f"{path} is a folder that `slmembed {command}` did not write and is not empty: "
                            "choose a new or empty folder")
    if resume:
        return True
    if not force:
        hint = "pass --force to replace it" + (" (or --resume to continue it)" if resume is not None else "")
        raise SlmembedError(f"{path} holds an earlier `slmembed {command}` output: {hint}, or choose another folder")
    marker = _marker(path)
    if marker is not None:  # runs from before markers hold only what training writes
        known = {MARKER, *keep, *marker.get("entries", []), *marker.get("added", {})}
        foreign = sorted(e.name for e in path.iterdir() if e.name not in known)
        if foreign:
            raise SlmembedError(f"{path} holds {foreign[0]!r}, which slmembed did not write: --force replaces only "
                                "what slmembed wrote; move it away or choose another folder")
    _writable(path / "x")
    return True


def clear(path: str | Path) -> None:
    """Empty a folder that ``check_folder`` allowed to be replaced, but for the runs it may hold that a reproduced
    model is made of (run.PARTS), which the command replacing it did not write."""
    for entry in Path(path).iterdir():
        if entry.name in PARTS:
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def check_file(path: str | Path, command: str, *, inputs: Iterable[str | Path | None] = (),
               around: Iterable[str | Path | None] = (), force: bool = False,
               ours: Callable[[Path], bool] = lambda p: False, suffixes: tuple[str, ...] = ()) -> None:
    """Check, before any work, that ``command`` may write the file ``path``: see the module docstring. ``inputs``
    are read, ``around`` are folders read from (the output may lie inside them); ``ours`` tells whether an existing
    file is an earlier output of ``command``."""
    path = Path(path)
    if path.is_dir():
        raise SlmembedError(f"{path} is a folder; the output must be a file path")
    if suffixes and path.suffix.lower() not in suffixes:
        raise SlmembedError(f"{path}: the output must end in {' or '.join(suffixes)}")
    _overlap(path, inputs, around)
    if path.exists():
        if not ours(path):
            raise SlmembedError(f"{path} exists and is not an earlier `slmembed {command}` output: "
                                "choose another path")
        if not force:
            raise SlmembedError(f"{path} holds an earlier `slmembed {command}` output: pass --force to replace it")
    _writable(path)


def json_by(command: str) -> Callable[[Path], bool]:
    """``ours`` for JSON results: a file whose ``run.command`` is ``slmembed COMMAND ...`` (cli.provenance)."""

    def ours(path: Path) -> bool:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        run = data.get("run") if isinstance(data, dict) else None
        return isinstance(run, dict) and str(run.get("command", "")).split()[:2] == ["slmembed", command]

    return ours


def _lock_file(path: Path) -> Path:
    """The lock of the output ``path``: a hidden ``.NAME.lock`` beside it (not inside: a folder output is replaced
    by rename), under its resolved name, so that every spelling of the path meets the same lock."""
    path = path.resolve()
    return path.with_name(f".{path.name}.lock")


def _holder(lock: Path) -> str:
    """Who the lock file says holds it: ``PID 1234`` (with the host when it is another machine's)."""
    try:
        record = json.loads(lock.read_text())
        pid, host = int(record["pid"]), str(record["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return "PID unknown"
    return f"PID {pid}" if host == platform.node() else f"PID {pid} on {host}"


def _record_holder(fd: int) -> None:
    """Write this process's PID and host into the lock file it has just locked (filelock's ``on_acquired``)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": platform.node()}).encode(), 0)


@contextmanager
def writing(path: str | Path, check: Callable[[], _T] | None = None) -> Iterator[_T | None]:
    """Hold the output ``path`` for this process while the block runs; yield what ``check`` returns.

    ``check`` (the command's checks of ``path``) runs once the lock is held, so what it found stays true: another
    slmembed process writing ``path`` is refused before it (one line naming its PID), and a refused check removes
    the lock again and creates nothing. Once it passes, the temporary folders that writes of ``path`` killed midway
    left beside it are removed (atomic.py). The lock is a ``flock`` on ``.NAME.lock`` beside the output (filelock),
    which the kernel releases when the process ends, however it ends; the file is removed on exit, and one left by
    a killed process is simply taken over. The folders created to hold it go with it unless the output is in them.

    Under torchrun the run's first process (RANK 0) holds the lock for all of them; the others only check. Nested
    ``writing`` of a path this process holds only checks. Where no lock can be made (a filesystem without locks, or
    no folder to hold it, which the check then explains), the command runs unlocked.
    """
    from filelock import FileLock, Timeout  # 50 ms: after the argument parsing, as the command starts

    path = Path(path)
    lock_path = _lock_file(path)
    lock = None
    if os.environ.get("RANK", "0") == "0" and lock_path not in _held:
        created = [p for p in [lock_path.parent, *lock_path.parent.parents] if not p.exists()]
        # A second's wait: for a lock file being removed by a process that has finished as this one opens it.
        lock = FileLock(lock_path, timeout=1, on_acquired=_record_holder)
        try:
            lock.acquire()
        except Timeout:
            raise SlmembedError(f"{path} is being written by another slmembed process ({_holder(lock_path)}); wait "
                                "for it or choose another output") from None
        except OSError:
            lock = None
    if lock is None:
        yield check() if check else None
        return
    _held.add(lock_path)
    try:
        result = check() if check else None
        clean_temporaries(path)
        yield result
    finally:
        _held.discard(lock_path)
        lock_path.unlink(missing_ok=True)  # while held: a process that opened it meanwhile finds it gone (filelock)
        lock.release()
        for folder in created:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break
