"""A training step's batch: which examples it takes, this process's share of them, and the loss of their embeddings.

A step's rows are a function of the step alone (``batch_indices``: a seeded permutation per epoch), each process
takes a token-balanced share (``rank_rows``) as a ``StepBatch`` of token ids, and ``batch_loss`` is the one place the
objective (losses/) is called, by every way a step runs (step.py, cuda_graphs.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from slmembed.data.nli import Example
from slmembed.reference import Reference


def batch_indices(n: int, global_batch: int, step: int, seed: int) -> np.ndarray:
    """Triplet indices of the global batch at ``step``: epoch e uses permutation(seed + e), remainder dropped."""
    epoch, k = divmod(step, n // global_batch)
    return _permutation(n, seed + epoch)[k * global_batch : (k + 1) * global_batch]


def rank_rows(rows: np.ndarray, cost: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's share of a global batch's ``rows``: dealt by decreasing ``cost`` (tokens) in snake order (ranks
    0..W-1, then W-1..0, ...), so every rank gets the same number of rows and nearly the same tokens. Each step ends
    in collectives, so the rank with the most tokens sets the pace; which rank holds a row does not change the loss
    (every rank's candidates are gathered) and depends on the step alone."""
    if world == 1:
        return rows
    order = rows[np.argsort(-cost[rows], kind="stable")]
    lap = np.arange(len(rows)) % (2 * world)
    return order[np.where(lap < world, lap, 2 * world - 1 - lap) == rank]


@functools.lru_cache(maxsize=2)
def _permutation(n: int, seed: int) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(n)
    order.flags.writeable = False
    return order


@dataclass(frozen=True)
class StepBatch:
    """One step's sequences: anchors, positives, then each negative column's present texts (``ids``). Where some
    negatives are missing, ``slots`` holds the places of the present ones among the ``rows x negative columns``
    (column-major) and ``present`` marks them; both are None when every negative is there (or there are none).
    ``present`` without ``slots``: every slot is in ``ids`` (a graphed step fills the missing ones) and the mask
    says which are real."""

    ids: list[list[int]]
    rows: int
    negatives: int  # rows x negative columns
    slots: torch.Tensor | None = None
    present: torch.Tensor | None = None
    reference: torch.Tensor | None = None  # train.reference's vectors of anchors, positives, then every negative slot

    @classmethod
    def of(cls, examples: list[Example], rows: np.ndarray, cols: list[int], token_ids: dict[str, list[int]],
           table: Reference | None = None) -> StepBatch:
        texts = [[examples[i][c] for i in rows] for c in cols]
        negatives = [t for col in texts[2:] for t in col]
        ids = [token_ids[t] for col in texts[:2] for t in col] + [token_ids[t] for t in negatives if t is not None]
        present = torch.tensor([t is not None for t in negatives], dtype=torch.bool)
        vectors = None if table is None else table.rows([t for col in texts for t in col])
        if bool(present.all()):
            return cls(ids, len(rows), len(negatives), reference=vectors)
        return cls(ids, len(rows), len(negatives), present.nonzero().squeeze(1), present, vectors)


@dataclass(frozen=True)
class TrainData:
    """The examples as steps take them: every unique text's token ids, the example columns a step embeds
    (``cols``), each example's tokens (``cost``, by which ``rank_rows`` deals), and ``train.reference``'s vectors of
    the texts (``table``) if the objective takes them."""

    examples: list[Example]
    token_ids: dict[str, list[int]]
    cols: list[int]
    cost: np.ndarray
    table: Reference | None = None

    def share(self, rows: np.ndarray, rank: int, world: int) -> StepBatch:
        """Process ``rank``'s share of the global batch ``rows``."""
        return StepBatch.of(self.examples, rank_rows(rows, self.cost, rank, world), self.cols, self.token_ids,
                            self.table)


def batch_loss(objective: Callable, batch: StepBatch, emb: torch.Tensor, temperature: float) -> torch.Tensor:
    """Phase "loss": the objective of a step's embeddings [N, D] (in the order of ``batch.ids``). Missing negatives
    (entailment-only pairs, groups without a neutral) are masked out of the candidates. The places are computed on
    the host (``StepBatch.of``): a boolean index on the GPU would make the host wait for it. The reference's vectors,
    if the batch has them, go to the objective (those of losses.REFERENCE) as ``reference``."""
    b = batch.rows
    anchors, positives, negatives = emb[:b], emb[b : 2 * b], None
    mask = None if batch.present is None else batch.present.to(emb.device, non_blocking=True)
    if batch.negatives and batch.slots is None:
        negatives = emb[2 * b :]
    elif batch.negatives:
        slots = batch.slots.to(emb.device, non_blocking=True)
        negatives = emb.new_zeros((batch.negatives, emb.shape[1])).index_put((slots,), emb[2 * b :])
    extra = {}
    if batch.reference is not None:
        ref = batch.reference
        extra["reference"] = (ref[:b], ref[b : 2 * b], ref[2 * b :] if batch.negatives else None)
    return objective(anchors, positives, negatives, temperature, negative_mask=mask, **extra)
