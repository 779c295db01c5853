"""User-facing errors: the CLI prints them as one line and exits with code 2."""

from __future__ import annotations

from pathlib import Path


class SlmembedError(Exception):
    """An error caused by the user's input or environment, not by a bug."""


class DataError(SlmembedError):
    """A data file that cannot be read as expected; names the file, the line and the problem."""

    def __init__(self, path: str | Path, problem: str, line: int | None = None) -> None:
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")
