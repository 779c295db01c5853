"""Training objectives, one per module, each
``f(anchors, positives, negatives | None, temperature, negative_mask=None) -> loss``, gathered across ranks.
``train.loss`` in a recipe names one of ``LOSSES``; a new objective is a module here and an entry below.
``train.matryoshka_dims`` wraps the named objective in ``matryoshka`` (summed over embedding prefixes).

The registry names each objective's module and function instead of importing them: a recipe's ``train.loss`` is
checked (config.py) before torch is imported, and ``objective`` imports the one a run uses."""

from __future__ import annotations

import importlib
from collections.abc import Callable

LOSSES = {
    "infonce": "infonce.info_nce",  # the paper's: anchors against all positives and hard negatives
    "symmetric_infonce": "symmetric.symmetric_info_nce",  # and positives against all anchors
}


def objective(name: str) -> Callable:
    """The objective ``LOSSES`` names ``name``."""
    module, _, function = LOSSES[name].rpartition(".")
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)
