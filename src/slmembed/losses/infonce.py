"""InfoNCE over in-batch positives and hard negatives, gathered across ranks.

Inputs: anchors ``a`` [B, D], positives ``p`` [B, D] and optional hard negatives ``n`` [B, D] from this rank.
Candidates ``c`` are the positives of every rank followed by the negatives of every rank (``[W*B + W*B, D]``
with W ranks; just ``[p; n]`` in one process). With cosine similarity ``s(x, y) = x.y / (|x||y|)`` and temperature
``tau``, the loss for local anchor ``i`` on rank ``r`` is

    l_i = -log( exp(s(a_i, c_{rB+i}) / tau) / sum_j exp(s(a_i, c_j) / tau) )

and the function returns the mean over the local anchors. The gather keeps gradients: its backward sums the
gradients of all ranks' losses, so under DDP (which averages parameter gradients over ranks) the update equals
the gradient of the mean loss over the whole global batch.

``negative_mask`` [B] (bool) marks which rows of ``n`` are real: the others (an entailment-only pair has no hard
negative) are left out of every anchor's candidates.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns this rank's slice of the all-reduced (summed) gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks (differentiably); identity outside torch.distributed."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _GatherWithGrad.apply(x)
    return x


def info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    temperature: float = 0.05,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean InfoNCE loss of the local anchors against all ranks' positives and hard negatives (see module doc)."""
    a = F.normalize(anchors.float(), dim=-1)
    p = gather(F.normalize(positives.float(), dim=-1))
    candidates = p if negatives is None else torch.cat([p, gather(F.normalize(negatives.float(), dim=-1))])
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    labels = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]
    logits = a @ candidates.T / temperature
    if negative_mask is not None:
        real = torch.cat([torch.ones(p.shape[0], dtype=torch.bool, device=a.device),
                          gather(negative_mask.to(device=a.device, dtype=torch.uint8)).bool()])
        logits = logits.masked_fill(~real, float("-inf"))
    return F.cross_entropy(logits, labels)
