"""Value rules: a rule takes a value of the right type and returns None if it keeps the rule, else what was expected.

Recipe fields (config.py) and the embedding spec (spec.py) declare their rules with these builders, so a field and
the CLI option that sets it report a bad value in the same words.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

Check = Callable[[Any], str | None]  # a rule: None for a good value, else what was expected


def rule(expected: str, ok: Callable[[Any], bool]) -> Check:
    """The rule that passes values for which ``ok`` holds."""
    return lambda value: None if ok(value) else expected


def at_least(low: int) -> Check:
    return rule(f"an integer >= {low}", lambda v: v >= low)


def one_of(*choices: str) -> Check:
    return rule(f"one of {', '.join(choices)}", lambda v: v in choices)


POSITIVE = rule("a finite number > 0", lambda v: math.isfinite(v) and v > 0)
NOT_NEGATIVE = rule("a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)
TEXT = rule("a non-empty string", lambda v: bool(v.strip()))
