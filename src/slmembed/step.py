"""One training step: ``loss = step(rows)`` on this process's share of the global batch ``rows``, then the update.

The way a step runs is chosen once, when the ``Step`` is built from the recipe:

* ordinary: the share's embeddings in length-sorted chunks, the loss (``batch.batch_loss``), one backward, whose
  gradients DDP averages over the processes;
* GradCache (``train.grad_cache``): the backward chunk by chunk (gradcache.py), so the batch is bounded by time, not
  memory;
* a CUDA graph (``train.cuda_graphs``): the forward, loss and backward replayed (cuda_graphs.py); a step over
  ``chunk_tokens`` runs the ordinary way;
* graph replicas (CUDA graphs in several processes): no DDP wrapper; every process replays the bucket of the step's
  largest share, and a step run the ordinary way averages its gradients itself.

Then AdamW and the schedule. Every way runs the recipe's objective (``train.loss`` in losses/, within Matryoshka's
prefix sizes if asked) in bf16 autocast where the device computes it.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from accelerate import Accelerator

from slmembed import cuda_graphs, sharding
from slmembed.batch import StepBatch, TrainData, batch_loss
from slmembed.compile import compile_blocks
from slmembed.config import Recipe
from slmembed.embedder import Embedder
from slmembed.gradcache import cached_backward
from slmembed.losses import objective as named_objective
from slmembed.losses.matryoshka import matryoshka


class Step:
    """``loss = step(rows)``: forward, loss and backward of this process's share of ``rows`` (the gradients averaged
    over the processes), then AdamW and the schedule; the loss, detached (it stays on the device)."""

    def __init__(self, recipe: Recipe, acc: Accelerator, embedder: Embedder, optimizer, scheduler, data: TrainData,
                 bf16: bool) -> None:
        tc = recipe.train
        model = embedder.model
        model.train()
        if tc.compile:
            compile_blocks(model)
        objective = named_objective(tc.loss, tc)
        if tc.matryoshka_dims:
            objective = matryoshka(objective, tc.matryoshka_dims, tc.matryoshka_weights)
        self.objective, self.temperature, self.chunk_tokens = objective, tc.temperature, tc.chunk_tokens
        self.acc, self.embedder, self.optimizer, self.scheduler, self.data = acc, embedder, optimizer, scheduler, data
        self.bf16 = bf16
        self.trained = [p for p in model.parameters() if p.requires_grad]
        self.graphed = (cuda_graphs.GraphedStep(embedder, objective, tc.temperature, self.trained, bf16,
                                                tc.chunk_tokens) if tc.cuda_graphs else None)
        self.no_sync = functools.partial(sharding.no_sync if sharding.is_sharded(model) else acc.no_sync, model)
        replicas = cuda_graphs.replicated(tc.cuda_graphs, acc.num_processes)
        self._largest = self._largest_share if replicas else lambda rows: None
        self._ordinary = self._cached if tc.grad_cache else self._averaged if replicas else self._plain

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        batch = self.data.share(rows, self.acc.process_index, self.acc.num_processes)
        loss = None if self.graphed is None else self.graphed(batch, self._largest(rows))
        if loss is None:  # no graph, or a step over chunk_tokens: the ordinary way
            loss = self._ordinary(batch)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.acc.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _plain(self, batch: StepBatch) -> torch.Tensor:
        with self._autocast():
            loss = batch_loss(self.objective, batch, self.embedder.forward_ids(batch.ids, self.chunk_tokens),
                              self.temperature)
            self.acc.backward(loss)
        return loss

    def _cached(self, batch: StepBatch) -> torch.Tensor:
        loss_of = functools.partial(batch_loss, self.objective, batch, temperature=self.temperature)
        with self._autocast():
            return cached_backward(self.embedder, batch.ids, self.chunk_tokens, loss_of, self.no_sync)

    def _averaged(self, batch: StepBatch) -> torch.Tensor:
        """The plain step of a replica, which averages its gradients itself (no DDP wrapper)."""
        loss = self._plain(batch)
        cuda_graphs.average_gradients(self.trained)
        return loss

    def _largest_share(self, rows: np.ndarray) -> int:
        """The largest graphed size of the processes' shares of ``rows``: the bucket every replica replays, so that
        their collectives pair up."""
        world = self.acc.num_processes
        return max(self.graphed.size(self.data.share(rows, rank, world)) for rank in range(world))
