"""README.md and docs/*.md: every relative link and every inline `path` into the repository names a file that exists,
every #anchor names a heading of its page, and the README stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 220
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)  # fenced code blocks: not links
INDENTED = re.compile(r"^(?: {4}|\t).*$", re.M)               # indented code blocks (command examples)
LINK = re.compile(r"(?<!\\)!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)           # http:, https:, mailto:, ...
# An inline path is checked when it starts at one of the repository's top-level entries and is a plain path (no
# spaces, no placeholders such as NAME or {variant}); a * is a glob that must match something.
PLACEHOLDER = re.compile(r"(^|/)[A-Z][A-Z_0-9]*(/|$)|[{}<>$]|\.\.\.")


def prose(text: str) -> str:
    """The page without its code blocks, where link syntax and paths are examples, not references."""
    return INDENTED.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(page: Path) -> list[str]:
    """The relative link targets of a page (with their #anchors)."""
    return [t for t in LINK.findall(prose(page.read_text(encoding="utf-8"))) if not EXTERNAL.match(t)]


def inline_paths(page: Path, root: Path = ROOT) -> list[str]:
    """The `code spans` of a page that are paths into the repository ``root``."""
    top_level = {p.name for p in root.iterdir() if p.name != ".git"}
    found = []
    for span in CODE_SPAN.findall(prose(page.read_text(encoding="utf-8"))):
        span = span.strip()
        if " " in span or PLACEHOLDER.search(span):
            continue
        first = span.split("/", 1)[0]
        if first in top_level and ("/" in span or span == first):
            found.append(span)
    return found


def broken(page: Path, root: Path = ROOT) -> list[str]:
    """What a page of the repository ``root`` refers to that is not there."""
    problems = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            problems.append(f"link {target}: no {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"link {target}: no heading #{anchor} in {resolved.name}")
    for span in inline_paths(page, root):
        if "*" in span:
            if not list(root.glob(span)):
                problems.append(f"`{span}`: matches no file")
        elif not (root / span.rstrip("/")).exists():
            problems.append(f"`{span}`: no such file or folder")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_path_exists(page: Path) -> None:
    assert broken(page) == []


def test_docs_pages_are_linked_from_the_readme() -> None:
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []


def test_readme_is_short() -> None:
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it to {README_MAX_LINES}, details in docs/"


def test_the_checker_finds_broken_references(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "src" / "slmembed").mkdir(parents=True)
    (tmp_path / "src" / "slmembed" / "cli.py").write_text("")
    (tmp_path / "README.md").write_text("# Top\n")
    (tmp_path / "docs" / "training.md").write_text("# Training\n\n## Data\n")
    page = tmp_path / "docs" / "probe.md"
    page.write_text("# Probe\n\n[ok](../README.md) [gone](missing.md) [bad anchor](training.md#no-such)\n"
                    "[anchor](training.md#data) [here](#probe) [web](https://example.org/x.md)\n"
                    "`src/slmembed/cli.py` `src/slmembed/missing.py` `src/slmembed/nothing-*.py`\n"
                    "`runs/qs` `src/NAME/x.py` `src/slmembed/{x}.py` `docs/` `src/slmembed/cli.py --help`\n\n"
                    "    [in a code block](nowhere.md) `src/gone.py`\n")
    problems = broken(page, tmp_path)
    assert len(problems) == 4, problems
    assert any("missing.md" in p for p in problems)
    assert any("#no-such" in p for p in problems)
    assert any("src/slmembed/missing.py" in p for p in problems)
    assert any("nothing-*.py" in p for p in problems)
