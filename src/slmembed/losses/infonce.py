"""InfoNCE over in-batch positives and hard negatives, gathered across ranks.

Inputs: anchors ``a`` [B, D], positives ``p`` [B, D] and optional hard negatives ``n`` [B, D] from this rank.
Candidates ``c`` are the positives of every rank followed by the negatives of every rank (``[W*B + W*B, D]``
with W ranks; just ``[p; n]`` in one process), gathered in one collective. With cosine similarity
``s(x, y) = x.y / (|x||y|)`` and temperature ``tau``, the loss for local anchor ``i`` on rank ``r`` is

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

# torch 2.13 renamed the two single-tensor collectives (the old names warn); torch 2.11, which pyproject admits,
# may lack the new ones.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 of several tensors at once (one collective: at small batches each collective's fixed
    cost, not its bytes, is what a step pays); the backward reduce-scatters the gradients, so each rank gets its own
    rows of the gradient summed over ranks, again in one collective."""

    @staticmethod
    def forward(ctx, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        world, local = dist.get_world_size(), torch.cat(xs).contiguous()
        out = local.new_empty((world * local.shape[0], *local.shape[1:]))
        _all_gather(out, local)
        ctx.rows = [x.shape[0] for x in xs]
        per_rank = out.view(world, *local.shape).split(ctx.rows, dim=1)
        return tuple(part.reshape(world * rows, *local.shape[1:])
                     for part, rows in zip(per_rank, ctx.rows, strict=True))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        world, tail = dist.get_world_size(), grads[0].shape[1:]  # unused outputs' gradients come as zeros
        parts = [g.reshape(world, rows, *tail) for g, rows in zip(grads, ctx.rows, strict=True)]
        full = torch.cat(parts, dim=1).reshape(world * sum(ctx.rows), *tail).contiguous()
        local = full.new_empty((sum(ctx.rows), *tail))
        _reduce_scatter(local, full)
        return local.split(ctx.rows)


def gather(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each of ``xs`` (same trailing shape, dtype and device) concatenated over all ranks along dim 0, rank by rank,
    differentiably and in one collective; the tensors themselves outside torch.distributed."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _GatherWithGrad.apply(*xs)
    return xs


def similarities(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
    reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The local anchors' cosine similarities [B, C] to all ranks' candidates (``c`` of the module docstring; missing
    negatives -inf) and the column of each anchor's own positive [B]. With ``reference``, another model's vectors of
    the same anchors, positives and negatives (any width), also that model's similarities of the same pairs [B, C],
    without gradient: its candidates travel beside the trained ones, in the same collective."""
    a = F.normalize(anchors.float(), dim=-1)
    local = [F.normalize(x.float(), dim=-1) for x in (positives, negatives) if x is not None]
    width = a.shape[1]
    if reference is not None:
        ref = [F.normalize(x.float(), dim=-1) for x in reference if x is not None]
        local = [torch.cat([x, r], dim=1) for x, r in zip(local, ref[1:], strict=True)]
    gathered = gather(*local)
    candidates = torch.cat(gathered)  # all ranks' positives, then all ranks' negatives
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    labels = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]
    sims = a @ (candidates if reference is None else candidates[:, :width]).T
    guide = None if reference is None else ref[0] @ candidates[:, width:].detach().T
    if negative_mask is not None:
        (mask,) = gather(negative_mask.to(device=a.device, dtype=torch.uint8))
        real = torch.cat([torch.ones(gathered[0].shape[0], dtype=torch.bool, device=a.device), mask.bool()])
        sims = sims.masked_fill(~real, float("-inf"))
        guide = None if guide is None else guide.masked_fill(~real, float("-inf"))
    return sims, labels, guide


def info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    temperature: float = 0.05,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean InfoNCE loss of the local anchors against all ranks' positives and hard negatives (see module doc)."""
    sims, labels, _ = similarities(anchors, positives, negatives, negative_mask)
    return F.cross_entropy(sims / temperature, labels)
