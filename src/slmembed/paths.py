"""Where data and cached models live.

Data directory, first match wins: the explicit option, ``$SLMEMBED_DATA``, then ``../shared/data`` seen from the
working directory or from the source checkout. Cache directory: ``$SLMEMBED_CACHE``, else
``$XDG_CACHE_HOME/slmembed``, else ``~/.cache/slmembed``. Input files: ``input_file``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from slmembed.errors import SlmembedError

_CHECKOUT = Path(__file__).resolve().parents[2]


def find_data_dir(option: str | Path | None = None, required: bool = True) -> Path | None:
    """Return the data directory, or raise (or return None if not ``required``) when none exists."""
    if option is not None:
        path = Path(option).expanduser()
        if not path.is_dir():
            raise SlmembedError(f"data directory {path} does not exist")
        return path
    env = os.environ.get("SLMEMBED_DATA")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise SlmembedError(f"SLMEMBED_DATA={env} is not a directory")
        return path
    for candidate in (Path.cwd().parent / "shared" / "data", _CHECKOUT.parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    if required:
        raise SlmembedError("no data directory: pass --data-dir, set SLMEMBED_DATA, or place the data in "
                            "../shared/data")
    return None


def cache_dir() -> Path:
    """Return (and create) the cache directory for converted models and tokenised data."""
    env = os.environ.get("SLMEMBED_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slmembed"
    base.mkdir(parents=True, exist_ok=True)
    return base


def input_file(path: str | Path, option: str | None = None) -> Path:
    """``path``, checked to be an input file a command can read twice (links followed): else a one-line error naming
    it (after ``option``, e.g. ``--calibration``, if given) and saying what it is instead: missing, a folder, or not a
    regular file (a device such as /dev/null, a pipe)."""
    path = Path(path)
    name = f"{option} {path}" if option else str(path)
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise SlmembedError(f"{name}: no such file") from None
    except OSError as exc:
        raise SlmembedError(f"{name}: cannot be read ({exc.strerror})") from None
    if stat.S_ISDIR(mode):
        raise SlmembedError(f"{name}: is a folder; expected a file")
    if not stat.S_ISREG(mode):
        raise SlmembedError(f"{name}: is not a regular file (a device, pipe or socket); expected a file")
    return path
