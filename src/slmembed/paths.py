"""Where data and cached models live.

Data directory, first match wins: the explicit option, ``$SLMEMBED_DATA``, then ``../shared/data`` seen from the
working directory or from the source checkout. Cache directory: ``$SLMEMBED_CACHE``, else
``$XDG_CACHE_HOME/slmembed``, else ``~/.cache/slmembed``.
"""

from __future__ import annotations

import os
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
        raise SlmembedError("no data directory: pass --data-dir, set SLMEMBED_DATA, or place the data in ../shared/data")
    return None


def cache_dir() -> Path:
    """Return (and create) the cache directory for converted models and tokenised data."""
    env = os.environ.get("SLMEMBED_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slmembed"
    base.mkdir(parents=True, exist_ok=True)
    return base
