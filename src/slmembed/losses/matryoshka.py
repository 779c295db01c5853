"""Matryoshka representation learning: the objective summed over prefixes of the embedding.

Inputs as every objective's (anchors ``a``, positives ``p``, optional negatives ``n``, each [B, D], temperature,
``negative_mask``), plus the prefix sizes ``dims`` (each below D) and their ``weights`` ``w_k``. With ``L`` the base
objective (infonce, symmetric_infonce), the loss is

    L_M = L(a, p, n) + sum_k w_k * L(a[:, :d_k], p[:, :d_k], n[:, :d_k])

so that the first ``d_k`` coordinates alone, renormalised, are an embedding of their own (the objectives score by
cosine, which renormalises). It is a function of the full embeddings, so GradCache (whose cached gradients are the
loss's with respect to them), packed batches and the cross-rank gather inside ``L`` work unchanged. Further keywords
(a reference model's vectors, ``reference``) reach every term whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def matryoshka(objective: Callable, dims: Sequence[int], weights: Sequence[float] | None = None) -> Callable:
    """``objective`` at full size plus, weighted, at each prefix size in ``dims`` (weights default to 1)."""
    weights = list(weights) if weights is not None else [1.0] * len(dims)

    def loss(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None, temperature: float,
             negative_mask: torch.Tensor | None = None, **extra) -> torch.Tensor:
        total = objective(anchors, positives, negatives, temperature, negative_mask=negative_mask, **extra)
        for d, w in zip(dims, weights, strict=True):
            cut = None if negatives is None else negatives[:, :d]
            total = total + w * objective(anchors[:, :d], positives[:, :d], cut, temperature,
                                          negative_mask=negative_mask, **extra)
        return total

    return loss
