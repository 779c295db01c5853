"""Distillation of a reference model's in-batch similarities (a teacher: one model or an ensemble), beside InfoNCE.

Inputs as ``infonce.info_nce`` (anchors ``a``, positives ``p``, optional hard negatives ``n``, each [B, D] from this
rank; ``negative_mask``), plus ``reference``: the teacher's unit vectors ``(a', p', n')`` of the same texts (any
width; reference.py), gathered across ranks with the candidates ``c`` (``c'`` are theirs). For local anchor ``i``,
over the candidates InfoNCE uses (all ranks' positives and present negatives), the student's and the teacher's
distributions are

    q_ij = softmax_j( s(a_i, c_j) / tau ),    p_ij = softmax_j( t(a_i, c'_j) / tau_t )

with ``s`` and ``t`` the student's and the teacher's cosine similarities, ``tau`` = ``train.temperature`` and
``tau_t`` = ``train.distill_temperature``, and the loss is

    L = InfoNCE + w * 1/B * sum_i KL(p_i || q_i),    KL(p || q) = sum_j p_j (log p_j - log q_j)

with ``w`` = ``train.distill_weight``: a listwise distillation, sentence-transformers' ``DistillKLDivLoss`` (teacher
probabilities, student log-probabilities, ``batchmean``) over the in-batch candidates instead of each row's own.
Unlike that loss, the KL is not multiplied by ``tau**2`` (Hinton's factor, which at tau = 0.05 would divide the term
by 400): ``w`` alone weighs it. The teacher has no gradient.
Gathered candidates, missing negatives and the gradient across ranks are as in ``info_nce``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slmembed.losses.infonce import similarities


def distill_info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    temperature: float = 0.05,
    negative_mask: torch.Tensor | None = None,
    *,
    reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    distill_weight: float = 1.0,
    distill_temperature: float = 0.05,
) -> torch.Tensor:
    """Mean InfoNCE of the local anchors plus ``distill_weight`` times the mean KL divergence from the teacher's
    in-batch distribution (at ``distill_temperature``) to theirs (see the module docstring)."""
    sims, labels, teacher = similarities(anchors, positives, negatives, negative_mask, reference)
    logits = sims / temperature
    # Missing negatives (-inf) take part in neither distribution: 0 * (-inf - -inf) would make the sum NaN.
    kept = torch.isfinite(sims)
    log_q = torch.where(kept, logits.log_softmax(dim=1), 0.0)
    log_p = torch.where(kept, (teacher / distill_temperature).log_softmax(dim=1), 0.0)
    kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    return F.cross_entropy(logits, labels) + distill_weight * kl
