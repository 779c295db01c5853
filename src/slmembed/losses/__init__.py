"""Training objectives, one per module, each
``f(anchors, positives, negatives | None, temperature, negative_mask=None) -> loss``, gathered across ranks.
``train.loss`` in a recipe names one of ``LOSSES``; a new objective is a module here and an entry below.
``train.matryoshka_dims`` wraps the named objective in ``matryoshka`` (summed over embedding prefixes)."""

from __future__ import annotations

from slmembed.losses.infonce import info_nce
from slmembed.losses.matryoshka import matryoshka
from slmembed.losses.symmetric import symmetric_info_nce

LOSSES = {
    "infonce": info_nce,  # the paper's: anchors against all positives and hard negatives
    "symmetric_infonce": symmetric_info_nce,  # and positives against all anchors
}

__all__ = ["LOSSES", "info_nce", "matryoshka", "symmetric_info_nce"]
