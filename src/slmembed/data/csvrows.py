"""CSV and TSV rows read strictly: a row with more or fewer fields than the header is named, never cut or padded."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from pathlib import Path

from slmembed.errors import DataError


def _bare(cell: str) -> str:
    """A field without a byte-order mark and surrounding whitespace: a line holding only a BOM is blank."""
    return cell.lstrip("\ufeff").strip()


class CsvRows:
    """The rows of a delimited file under its header, the first non-blank row (names stripped of spaces and a BOM).

    Iterating gives ``(line, record)`` for each row with a non-blank field, ``line`` the row's first line (a quoted
    field may span several): the record a dict by header name, or, for a row with more or fewer fields than the
    header (such as an unquoted comma in a text), the problem as a string, for the caller to raise or skip. A file
    the csv module cannot read (a NUL byte) is a DataError naming the line. ``quoted=False``: quotes are plain text.
    """

    def __init__(self, path: Path, lines: Iterable[str], delimiter: str = ",", quoted: bool = True) -> None:
        csv.field_size_limit(2**31 - 1)  # the default, 131,072 characters, would reject long but valid fields
        self.path, self.sep = path, "tab" if delimiter == "\t" else "comma"
        self._reader = csv.reader(lines, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE)
        self._next = 1  # the line the next row starts on
        self._rows = self._nonblank()
        self.line, self.header = 1, []
        for line, row in self._rows:
            self.line, self.header = line, [_bare(c) for c in row]
            break

    def _nonblank(self) -> Iterator[tuple[int, list[str]]]:
        try:
            for row in self._reader:
                line, self._next = self._next, self._reader.line_num + 1
                if any(map(_bare, row)):
                    yield line, row
        except csv.Error as exc:
            raise DataError(self.path, f"unreadable CSV ({exc})", self._next) from None

    def __iter__(self) -> Iterator[tuple[int, dict[str, str] | str]]:
        for line, row in self._rows:
            if len(row) != len(self.header):
                yield line, (f"expected {len(self.header)} {self.sep}-separated columns ({','.join(self.header)}), "
                             f"got {len(row)}")
            else:
                yield line, dict(zip(self.header, row, strict=False))
