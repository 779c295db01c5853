"""JSON Lines reading whose errors name the file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from slmembed.errors import DataError


def json_lines(path: Path, lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line of ``path``; invalid JSON is a DataError naming its line."""
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(path, f"not valid JSON: {exc.msg}", line_no) from None
        yield line_no, value
