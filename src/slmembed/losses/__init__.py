"""Training objectives, one per module, each
``f(anchors, positives, negatives | None, temperature, negative_mask=None) -> loss``, gathered across ranks.
``train.loss`` in a recipe names one of ``LOSSES``; a new objective is a module here and an entry below.
An objective's keyword-only parameters named in ``OPTIONS`` are recipe fields of ``train`` of the same names.
The objectives in ``REFERENCE`` also take a reference model's vectors of the same texts as the keyword
``reference`` (``train.reference``; reference.py).
``train.matryoshka_dims`` wraps the named objective in ``matryoshka`` (summed over embedding prefixes).
``mntp`` and ``simcse`` are the objectives of the ``adapt`` stages before training (adapt.py calls them): not
``train.loss`` choices, and of other inputs (logits and labels; two views), so not in ``LOSSES``.

The registry names each objective's module and function instead of importing them: a recipe's ``train.loss`` is
checked (config.py) before torch is imported, and ``objective`` imports the one a run uses."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

LOSSES = {
    "infonce": "infonce.info_nce",  # the paper's: anchors against all positives and hard negatives
    "symmetric_infonce": "symmetric.symmetric_info_nce",  # and positives against all anchors
    "angle_infonce": "angle.angle_info_nce",  # InfoNCE plus AnglE's angle term
    "guided_infonce": "guided.guided_info_nce",  # without the candidates the reference ranks above the positive
    "distill_infonce": "distill.distill_info_nce",  # plus the KL to the reference's in-batch distribution
}
OPTIONS = {"angle_infonce": ("angle_weight", "angle_tau"),  # the train fields each objective takes as keywords
           "guided_infonce": ("guide_margin",), "distill_infonce": ("distill_weight", "distill_temperature")}
REFERENCE = frozenset({"guided_infonce", "distill_infonce"})


def objective(name: str, train: Any = None) -> Callable:
    """The objective ``LOSSES`` names ``name``, its ``OPTIONS`` set from ``train`` (a recipe's train section) if
    given, else left at their defaults."""
    module, _, function = LOSSES[name].rpartition(".")
    loss = getattr(importlib.import_module(f"{__name__}.{module}"), function)
    options = {key: getattr(train, key) for key in OPTIONS.get(name, ())} if train is not None else {}
    return functools.partial(loss, **options) if options else loss
