"""Symmetric InfoNCE: the anchors find their positives, and the positives find their anchors.

Inputs as ``infonce.info_nce``: anchors ``a`` [B, D], positives ``p`` [B, D], optional hard negatives ``n`` [B, D]
from this rank, gathered across ranks. With the candidates ``c`` = all ranks' ``[p; n]``, all ranks' anchors
``A``, cosine similarity ``s`` and temperature ``tau``, the loss for local pair ``i`` on rank ``r`` (global index
``g = rB + i``) is

    l_i = 1/2 * ( -log softmax_j( s(a_i, c_j) / tau )[g]  -  log softmax_k( s(p_i, A_k) / tau )[g] )

averaged over the local pairs: the paper's InfoNCE plus the reverse direction, in which each positive is scored
against every anchor of the global batch (the hard negatives are not anchors, so they take part one way only).
"""

from __future__ import annotations

import torch

from slmembed.losses.infonce import info_nce


def symmetric_info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    temperature: float = 0.05,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean symmetric InfoNCE of the local pairs (see the module docstring); ``negative_mask`` as in info_nce."""
    forward = info_nce(anchors, positives, negatives, temperature, negative_mask)
    return (forward + info_nce(positives, anchors, None, temperature)) / 2
