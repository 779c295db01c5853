"""The one rule for a text slmembed embeds: what ``embed``'s readers and the server both apply."""

from __future__ import annotations


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be embedded, worded to follow its name ("input[3] is empty"), or None if it can: it is
    empty, only whitespace, or holds a lone surrogate (JSON's ``"\\ud800"`` is valid JSON but no text UTF-8 can
    encode, so no tokenizer can read it)."""
    if not text:
        return "is empty"
    if text.isspace():
        return "is only whitespace"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"holds a lone surrogate ({text[exc.start]!r} at character {exc.start + 1}), which is not UTF-8 text"
    return None
