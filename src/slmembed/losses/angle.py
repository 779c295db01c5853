"""AnglE's objective with InfoNCE as its in-batch-negative term (Li & Li, "AnglE-optimized Text Embeddings",
arXiv 2309.12871): InfoNCE plus AnglE's angle term, which ranks pairs by a similarity that measures angle differences
in complex space and so escapes the flat gradient of the cosine near its extremes.

Inputs as ``infonce.info_nce``: anchors ``a`` [B, D], positives ``p`` [B, D] and optional negatives ``n`` [kB, D]
from this rank (k negative columns, hard negatives then neutrals, column-major: row ``r`` is a negative of anchor
``r mod B``), temperature ``tau``, ``negative_mask`` [kB]; and the angle term's weight ``w`` and scale ``tau_angle``.
Each ``(a_i, p_i)`` is a pair labelled 1; each ``(a_{r mod B}, n_r)`` whose negative is real a pair labelled 0.
With each vector split into halves ``x = (x1, x2)`` (the real and imaginary parts of a complex vector), AnglE's
normalised angle similarity is

    s(x, y) = | (x.y + x2.y1 - x1.y2) / (|x| |y|) |

(the sum of the real and imaginary parts of ``sum_k x_k conj(y_k) / (|x||y|)``; for odd D the last coordinate of
``x1`` has no partner, as in sentence-transformers' ``pairwise_angle_sim``). The angle term is CoSENT's ranking loss
over the pairs of the whole global batch (all ranks), each label-1 pair against each label-0 pair:

    L_angle = log(1 + sum_{i, r} exp(tau_angle * (s(a_{r mod B}, n_r) - s(a_i, p_i))))
            = softplus(logsumexp_r(tau_angle * s(a_{r mod B}, n_r)) + logsumexp_i(-tau_angle * s(a_i, p_i)))

(with two labels the double sum factorises), and the loss is ``info_nce(a, p, n, tau, negative_mask) + w * L_angle``.
Without negatives there is no label-0 pair and the loss is InfoNCE's.

Each rank scores its own pairs and gathers the (1 + k)B scores of every rank in one collective, so every rank
computes the same L_angle of the global batch: the mean over ranks is that loss, and its gradient comes out as
InfoNCE's does (the gather's backward sums the ranks' equal gradients, DDP divides by the number of ranks).

Defaults ``w = 0.02``, ``tau_angle = 20``: AnglE's settings for NLI triplets (its docs/notes/training.rst: angle_w
0.02, angle_tau 20, with ibn_w = cln_w = 1 and cosine_w 0; its InfoNCE scale ibn_tau = 20 is our temperature 0.05).

Written here rather than taken from sentence-transformers' ``AnglELoss`` (an optional dependency, for export): that
computes the term from a model's forward on one process and has no missing negatives; this is a function of the
embeddings, gathered across ranks, with missing negatives left out and no [2B, 2B] matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slmembed.losses.infonce import gather, info_nce


def angle_similarity(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """AnglE's normalised angle similarity of each row of ``x`` with the same row of ``y`` ([B, D] each -> [B])."""
    x, y = F.normalize(x.float(), dim=-1), F.normalize(y.float(), dim=-1)
    half = (x.shape[-1] + 1) // 2
    x1, x2, y1, y2 = x[:, :half], x[:, half:], y[:, :half], y[:, half:]
    paired = x2.shape[-1]  # half, or half - 1 for odd D
    return ((x * y).sum(-1) + (x2 * y1[:, :paired] - x1[:, :paired] * y2).sum(-1)).abs()


def angle_info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    temperature: float = 0.05,
    negative_mask: torch.Tensor | None = None,
    *,
    angle_weight: float = 0.02,
    angle_tau: float = 20.0,
) -> torch.Tensor:
    """InfoNCE of the local anchors plus ``angle_weight`` times the angle term of the global batch (module doc)."""
    loss = info_nce(anchors, positives, negatives, temperature, negative_mask)
    if negatives is None:
        return loss
    up = angle_similarity(anchors, positives) * angle_tau
    down = angle_similarity(anchors.repeat(negatives.shape[0] // anchors.shape[0], 1), negatives) * angle_tau
    if negative_mask is not None:
        # A missing negative's score: its exp is 0. Not -inf, whose backward through logsumexp is 0 * NaN.
        down = down.masked_fill(~negative_mask.to(device=down.device, dtype=torch.bool), torch.finfo(down.dtype).min)
    up, down = gather(up, down)
    return loss + angle_weight * F.softplus(torch.logsumexp(down, 0) + torch.logsumexp(-up, 0))
