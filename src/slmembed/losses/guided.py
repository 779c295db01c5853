"""Guided in-batch negatives (GISTEmbed; Solatorio 2024): InfoNCE without the candidates a reference model ranks
above the anchor's own positive, which are probably not negatives at all.

Inputs as ``infonce.info_nce`` (anchors ``a``, positives ``p``, optional hard negatives ``n``, each [B, D] from this
rank; ``negative_mask``), plus ``reference``: the reference model's unit vectors ``(a', p', n')`` of the same texts
(any width R; reference.py), gathered across ranks with the candidates ``c`` (``c'`` are theirs). With cosine
similarities ``s`` (the trained model's) and ``g`` (the reference's), temperature ``tau``, margin ``m``
(``train.guide_margin``) and ``k = rB + i`` the column of local anchor ``i``'s positive on rank ``r``, a candidate is
dropped as a false negative when

    F_ij = [ j != k  and  g(a'_i, c'_j) > g(a'_i, c'_k) - m ]

and the loss is InfoNCE over the candidates that remain:

    l_i = -log( exp(s(a_i, c_k) / tau) / sum_{j: not F_ij} exp(s(a_i, c_j) / tau) )

averaged over the local anchors. This is sentence-transformers' ``GISTEmbedLoss`` with its "absolute" margin (default
0: only candidates the reference puts strictly above the positive go) restricted to its anchor-positive and
anchor-negative blocks (``contrast_anchors=False, contrast_positives=False``): the candidates are the ones InfoNCE
has, so the objective differs from ``infonce`` by the mask alone. Gathered candidates, missing negatives and the
gradient across ranks are as in ``info_nce``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slmembed.losses.infonce import similarities


def guided_info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    temperature: float = 0.05,
    negative_mask: torch.Tensor | None = None,
    *,
    reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    guide_margin: float = 0.0,
) -> torch.Tensor:
    """Mean InfoNCE of the local anchors without the candidates the reference ranks above their positive (see the
    module docstring)."""
    sims, labels, guide = similarities(anchors, positives, negatives, negative_mask, reference)
    rows = torch.arange(labels.shape[0], device=labels.device)
    false = guide > (guide[rows, labels] - guide_margin).unsqueeze(1)
    false[rows, labels] = False  # the positive itself stays, whatever the margin
    return F.cross_entropy(sims.masked_fill(false, float("-inf")) / temperature, labels)
