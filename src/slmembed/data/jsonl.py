"""JSON Lines reading whose errors name the file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from slmembed.errors import DataError


def parse(text: str) -> Any:
    """The JSON value of one line; a ValueError saying what is wrong where the line is not valid JSON, is nested too
    deeply for Python's parser (a RecursionError otherwise), or has a string with a lone surrogate escape
    (``"\\ud800"``: valid JSON, but not text UTF-8 can encode, so no tokenizer reads it). Surrogates U+DC80 to U+DCFF
    pass: they are how a reader that decodes with ``errors="surrogateescape"`` keeps undecodable bytes, and that
    reader checks its texts for them (nli.py; embed's texts pass through data/texts.py)."""
    try:
        value = json.loads(text)
        if "\\u" in text:  # only an escape puts a surrogate outside U+DC80..U+DCFF into a decoded line's strings
            json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise ValueError(f"a string holds a lone surrogate ({exc.object[exc.start]!r}), which is not UTF-8 "
                         "text") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of more digits than Python converts
        raise ValueError(f"not valid JSON: {getattr(exc, 'msg', exc)}") from None
    return value


def json_lines(path: Path, lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line of ``path``; a line ``parse`` refuses is a DataError naming
    it."""
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = parse(line)
        except ValueError as exc:
            raise DataError(path, str(exc), line_no) from None
        yield line_no, value
