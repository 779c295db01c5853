"""CUDA graphs for small batches: a training step's forward, loss and backward recorded once and replayed (and a
serving batch's forward: ``GraphedEncoder``).

At batch 60 the GPU computes a step in a third of the step's time; the rest is the host launching some 2,000
kernels (bench/NOTES.md). A CUDA graph (``torch.cuda.CUDAGraph``) records a step's kernels once, and replaying it is
one launch, so the host no longer paces the GPU. A graph replays fixed shapes at fixed addresses, hence:

* the step is one packed forward (packing.py): the step's sequences end to end, then a filler sequence of pad tokens
  that brings the length up to the next multiple of ``BUCKET`` tokens. The filler attends only to itself and its
  pooled row is dropped, so it changes nothing; a run records one graph per bucket its steps reach (a handful);
* the sequence count is fixed, rows x columns: a missing negative is given as a one-token sequence and masked out of
  every anchor's candidates (the mask is always passed; all true when every negative is there);
* each step's inputs are copied into its graph's own input tensors before the replay; the loss and the gradients are
  the graph's output tensors, which a later replay overwrites: the loss is returned as a copy, the gradients are
  handed to the optimizer (as ``.grad``) before the next step;
* a graph is recorded after one warm-up pass on a side stream (cuBLAS's workspaces, compiled code's first call), with
  autocast's weight cache off (a cached bf16 copy of a LoRA weight would otherwise be replayed stale). All graphs
  share one memory pool: they never run at once, and each one's outputs are used before another replays.

LoRA's dropout draws from the default generator, which a replay advances as an uncaptured step would. The optimizer
step and the schedule stay outside the graph (fused AdamW is one launch). On the CPU (``record=False``) the same
static-input path runs without recording: that is what the CPU tests compare with the ordinary step.

With several processes (torchrun), a graph holds the step's collectives too: the loss's gather of every process's
embeddings and its backward, and the average of the gradients, which the graph does itself in one all-reduce
(``average_gradients``) because the model is not wrapped in DDP, whose hooks a graph cannot hold. Collectives pair
up only if every process records and replays the same graphs at the same steps, so each step is padded to the bucket
of the largest of its processes' shares, which every process computes from the global batch (``size``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from slmembed import packing
from slmembed.batch import StepBatch, batch_loss
from slmembed.embedder import Embedder
from slmembed.errors import SlmembedError

BUCKET = 256  # tokens: the smallest step of a bucket's granularity


def bucket_of(tokens: int) -> tuple[int, int]:
    """The padded size of a step of ``tokens``, and the most filler any step of that bucket gets.

    The size is the next multiple of 256 tokens, or of 1/16 to 1/32 of the step when that is larger (1,024 at batch
    512's ~27k tokens), so that steps of similar size share one graph while padding stays under 7%; at least one filler
    token. The filler bound goes to the attention kernel as the longest sequence: recorded once per bucket, it must
    cover every later step's filler."""
    step = max(BUCKET, 1 << max(0, tokens.bit_length() - 5))
    return (tokens // step + 1) * step, step


def check(enabled: bool, *, device: torch.device, sharded: bool, grad_cache: bool, packing: bool | None,
          reference: bool = False) -> None:
    """Refuse, in one line and before anything loads, ``train.cuda_graphs`` where it cannot run."""
    if not enabled:
        return
    if device.type != "cuda":
        raise SlmembedError(f"train.cuda_graphs records the step on a GPU; this run is on the {device.type}: "
                            "set train.cuda_graphs=false")
    if sharded:
        raise SlmembedError("train.cuda_graphs and train.sharding=fsdp exclude each other (FSDP gathers and frees "
                            "the weights around every block): set train.cuda_graphs=false")
    if grad_cache:
        raise SlmembedError("train.cuda_graphs and train.grad_cache exclude each other (a graph replays one "
                            "forward of the whole step): set one of them to false")
    if packing is False:
        raise SlmembedError("train.cuda_graphs runs packed steps: set train.packing=true (or null), "
                            "or train.cuda_graphs=false")
    if reference:
        raise SlmembedError("train.cuda_graphs does not record the reference's vectors that train.reference's "
                            "objectives take: set train.cuda_graphs=false")


def replicated(enabled: bool, world: int) -> bool:
    """Whether ``world`` processes run graphed steps as replicas without DDP's wrapper (its hooks a graph cannot
    hold): the graph averages the gradients itself (``average_gradients``)."""
    return enabled and world > 1


def _several() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_parameters(params: list[torch.nn.Parameter]) -> None:
    """The first process's ``params`` everywhere, as DDP's wrapper would make them at the start."""
    if _several():
        for param in params:
            dist.broadcast(param.data, src=0)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """DDP's gradient average without its wrapper: every process's gradients summed in one all-reduce of their
    concatenation (at small batches a collective's fixed cost is what a step pays), divided by the process count."""
    if not _several():
        return
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    flat = torch.cat([param.grad.reshape(-1) for param in params])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    for param, part in zip(params, flat.split([param.numel() for param in params]), strict=True):
        param.grad.copy_(part.view_as(param.grad))


@dataclass
class _Graph:
    """One bucket's recorded step: its input tensors, its loss, and the gradients it writes (None on the CPU)."""

    inputs: dict
    graph: torch.cuda.CUDAGraph | None = None
    loss: torch.Tensor | None = None
    grads: list[torch.Tensor | None] | None = None


class GraphedStep:
    """``step(batch) -> loss``: the forward, loss and backward of a ``StepBatch`` as a replayed CUDA graph.

    ``objective`` is the recipe's loss (``losses``), ``params`` the trained weights. A step of more than
    ``max_tokens`` tokens is not recorded: the call returns None and the caller runs it the ordinary way.
    """

    def __init__(self, embedder: Embedder, objective: Callable, temperature: float,
                 params: list[torch.nn.Parameter], bf16: bool, max_tokens: int, record: bool = True) -> None:
        if not embedder.packed:
            raise SlmembedError(f"train.cuda_graphs runs packed steps, which {type(embedder.model).__name__} cannot "
                                "(packing.py): set train.cuda_graphs=false")
        self.embedder, self.objective, self.temperature = embedder, objective, temperature
        self.params, self.bf16, self.max_tokens = params, bf16, max_tokens
        self.record = record and embedder.device.type == "cuda"
        self.pad = embedder.tokenizer.pad_token_id
        self.longest = embedder.spec.max_length
        self.graphs: dict[int, _Graph] = {}
        self._pool = None

    def size(self, batch: StepBatch) -> int:
        """The tokens of ``batch``'s step as recorded (its missing negatives filled)."""
        return sum(len(row) for row in self.layout(batch)[0])

    def __call__(self, batch: StepBatch, largest: int | None = None) -> torch.Tensor | None:
        """The step's loss, its gradients averaged over the processes; ``largest``: the largest ``size`` of this
        step's shares over the processes (the bucket every process must replay), by default this one's."""
        ids, mask = self.layout(batch)
        tokens = sum(len(row) for row in ids)
        bucket, filler = bucket_of(max(tokens, largest or 0))
        if bucket > self.max_tokens:
            return None
        host = packing.collate([*ids, [self.pad] * (bucket - tokens)])
        host["max_length"] = max(self.longest, filler)  # the real sequences and any filler of this bucket within it
        if mask is not None:
            host["mask"] = mask
        entry = self.graphs.get(bucket)
        if entry is None:
            entry = self.graphs[bucket] = self._new(host, batch)
        else:
            self.embedder.to_device(host, into=entry.inputs)
        if entry.graph is None:  # the CPU: the same inputs, run directly
            return self._run(entry.inputs, batch).detach()
        for param, grad in zip(self.params, entry.grads, strict=True):
            param.grad = grad
        entry.graph.replay()
        return entry.loss.detach().clone()

    def layout(self, batch: StepBatch) -> tuple[list[list[int]], torch.Tensor | None]:
        """The step's sequences with every negative slot filled (a missing one by a one-token sequence), and the mask
        of the real negatives (None without negatives)."""
        b = batch.rows
        if not batch.negatives:
            return list(batch.ids), None
        if batch.slots is None:
            return list(batch.ids), torch.ones(batch.negatives, dtype=torch.bool)
        negatives = [[self.pad]] * batch.negatives
        for slot, row in zip(batch.slots.tolist(), batch.ids[2 * b :], strict=True):
            negatives[slot] = row
        return [*batch.ids[: 2 * b], *negatives], batch.present

    def _run(self, inputs: dict, batch: StepBatch) -> torch.Tensor:
        """Forward, loss and backward on ``inputs``, ``batch`` as ``layout`` fills it; the loss."""
        device = self.embedder.device
        filled = StepBatch([], batch.rows, batch.negatives, present=inputs.get("mask"))  # the ids are in ``inputs``
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            emb = self.embedder.forward(inputs)[:-1]  # the filler's row dropped
            loss = batch_loss(self.objective, filled, emb, self.temperature)
        loss.backward()
        average_gradients(self.params)
        return loss

    def _new(self, host: dict, batch: StepBatch) -> _Graph:
        """A bucket's input tensors on the device holding this step's inputs, and (on a GPU) its recorded graph."""
        device = self.embedder.device
        inputs = self.embedder.to_device(host)
        if not self.record:
            return _Graph(inputs)
        for param in self.params:  # the backward then allocates the gradients inside the graph's pool
            param.grad = None

        def warm_up() -> None:
            self._run(inputs, batch)
            for param in self.params:
                param.grad = None

        graph, loss = _record(device, lambda: self._run(inputs, batch), self._pool, warm_up)
        self._pool = self._pool or graph.pool()
        grads = [param.grad for param in self.params]
        for param in self.params:  # set again before each replay (the next bucket's recording resets them)
            param.grad = None
        return _Graph(inputs, graph, loss, grads)


class GraphedEncoder:
    """``encoder(ids) -> vectors``: a serving batch's packed forward as a replayed CUDA graph, for latency.

    A short request's forward costs the host far more than the GPU (a launch per kernel, hundreds a forward); replayed
    as a graph it is one launch. A graph replays fixed shapes, so a batch of N sequences is recorded as N's slots, the
    next power of two (the missing ones one-token sequences), and its tokens' bucket (``bucket_of``, the rest a
    filler sequence); every filler's vector is dropped. Graphs are recorded on first use, one per (slots, bucket),
    and share one memory pool (one batch runs at a time). A batch of more than ``max_tokens`` tokens or ``max_rows``
    sequences returns None, for the caller to run the ordinary way: larger batches keep the GPU busy for longer than
    their launches take, and 4,096 tokens bound the graphs to 16 buckets by 9 slot counts. The weights must stay
    where they are (one model, no adapters loaded and unloaded). On the CPU (``record=False``) the same static inputs
    run directly.
    """

    def __init__(self, embedder: Embedder, max_tokens: int = 4096, max_rows: int = 256, record: bool = True) -> None:
        if not embedder.packed:
            raise SlmembedError(f"--cuda-graphs replays packed forwards, which {type(embedder.model).__name__} does "
                                "not run here (packing.py: a supported decoder in bf16 or fp16 on a GPU)")
        self.embedder, self.max_tokens, self.max_rows = embedder, max_tokens, max_rows
        self.record = record and embedder.device.type == "cuda"
        self.pad = embedder.tokenizer.pad_token_id
        self.graphs: dict[tuple[int, int], tuple[dict, torch.cuda.CUDAGraph | None, torch.Tensor | None]] = {}
        self._pool = None

    def __call__(self, ids: list[list[int]]) -> torch.Tensor | None:
        """Normalised embeddings [N, D] of ``ids`` (a copy), or None if the batch is larger than recorded ones."""
        slots = 1 << (len(ids) - 1).bit_length()
        rows = [*ids, *[[self.pad]] * (slots - len(ids))]
        tokens = sum(len(row) for row in rows)
        bucket, filler = bucket_of(tokens)
        if bucket > self.max_tokens or slots > self.max_rows:
            return None
        host = packing.collate([*rows, [self.pad] * (bucket - tokens)])
        host["max_length"] = max(self.embedder.spec.max_length, filler)  # as GraphedStep's
        entry = self.graphs.get((slots, bucket))
        if entry is None:
            entry = self.graphs[slots, bucket] = self._new(host)
        else:
            self.embedder.to_device(host, into=entry[0])
        inputs, graph, out = entry
        if graph is None:
            out = self.embedder.forward(inputs)
        else:
            graph.replay()
        return out[: len(ids)].clone()

    def _new(self, host: dict) -> tuple[dict, torch.cuda.CUDAGraph | None, torch.Tensor | None]:
        """A bucket's input tensors on the device and (on a GPU) its graph and output, recorded after a warm-up pass
        on a side stream."""
        inputs = self.embedder.to_device(host)
        if not self.record:
            return inputs, None, None
        # thread_local: recorded on the server's worker thread, while its other threads go on
        graph, out = _record(self.embedder.device, lambda: self.embedder.forward(inputs), self._pool,
                             mode="thread_local")
        self._pool = self._pool or graph.pool()
        return inputs, graph, out


def _record(device: torch.device, run: Callable[[], Any], pool, warm_up: Callable[[], object] | None = None,
            mode: str = "global") -> tuple[torch.cuda.CUDAGraph, Any]:
    """``run`` recorded as a CUDA graph in the memory pool ``pool`` (None: a pool of its own), and what it returned,
    after one pass of ``warm_up`` (default: ``run``) on a side stream, which sets up cuBLAS's workspaces and compiled
    code's first call outside the graph. ``mode``: ``torch.cuda.graph``'s capture_error_mode."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        (warm_up or run)()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode=mode):
        out = run()
    return graph, out
