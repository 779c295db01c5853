"""Unsupervised SimCSE (Gao et al. 2021), LLM2Vec's second adaptation stage (adapt.py); a stage objective, not a
``train.loss``.

Inputs: ``first`` and ``second`` [B, D], the pooled embeddings of the same B sentences from two forward passes with
dropout on (two dropout masks: two "views" of each sentence). Sentence ``i``'s second view is its positive, every
other sentence's second view (of all ranks) an in-batch negative; no hard negatives. With cosine ``s`` and
temperature ``tau``:

    l_i = -log( exp(s(first_i, second_i) / tau) / sum_j exp(s(first_i, second_j) / tau) )

which is InfoNCE (infonce.py) with the second views as the positives and no negatives; the mean over ``i``.
"""

from __future__ import annotations

import torch

from slmembed.losses.infonce import info_nce


def simcse_loss(first: torch.Tensor, second: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """InfoNCE of the first views against all second views (module docstring)."""
    return info_nce(first, second, None, temperature)
