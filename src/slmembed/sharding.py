"""Sharded data parallelism (``train.sharding: fsdp``) for backbones that do not fit one device: torch's FSDP2
(``fully_shard``), the engine accelerate's FSDP plugin drives, used directly because that plugin runs on GPUs only
while ``fully_shard`` also runs over gloo on CPUs, where the suite tests it against the same run under DDP.

Each transformer block (the model's ``_no_split_modules``, the classes transformers marks as units, which
accelerate's transformer auto-wrap policy also uses) is one shard group, and the root holds the rest (embeddings,
final norm). Weights, gradients and optimizer state are split across the processes; a block's weights are gathered
for its forward and backward only. The trainable state (the LoRA adapter, or every weight) and the optimizer state
are gathered whole for checkpoints and dev snapshots, in the layout unsharded runs write, and scattered back on
resume. Every process must take part in these gathers and in every forward: dev scoring runs on all of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard

from slmembed.errors import SlmembedError

# Whole tensors on the host; only the trainable ones (a LoRA run's adapter) are gathered, not the frozen backbone.
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
LOAD = StateDictOptions(full_state_dict=True, strict=False)
BROADCAST = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)  # the first process's, to all


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Shard ``model`` in place (its blocks, then the root) onto ``device``; call before building the optimizer.

    Only the first process holds the weights (``models.load``): the others build ``model`` on the meta device and
    get their shards from the first's, tensor by tensor, so no other process ever holds the whole model (a 7B
    backbone's float32 weights are 28 GB of host memory a process otherwise). Every process calls this."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise SlmembedError(f"train.sharding=fsdp: {type(model).__name__} names no transformer blocks "
                            "(_no_split_modules) to shard by")
    first = dist.get_rank() == 0
    whole = model.state_dict() if first else {}  # the unsharded tensors, before fully_shard replaces them
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    if not first:
        model.to_empty(device=device)
    set_model_state_dict(model, whole, options=BROADCAST)
    # Buffers are not sharded, and those outside the state dict (the rotary tables) were never in ``whole``.
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    return model


@contextmanager
def no_sync(model: torch.nn.Module) -> Iterator[None]:
    """Backward passes inside keep their gradients local (GradCache's chunks); the pass after them reduces."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _peft_key(name: str) -> str:
    """peft's saved name of an adapter weight: the model's name without the adapter's (``.default``)."""
    return name.replace(".default.", ".")


def gather_state(model: torch.nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    """The trainable weights, whole, on the host, named as ``tuning.state`` names them (every process calls it)."""
    full = get_model_state_dict(model, options=FULL)
    return {(_peft_key(k) if lora else k): v.contiguous() for k, v in full.items()}


def scatter_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], lora: bool) -> None:
    """Load whole trainable weights (``gather_state``'s layout) into the sharded model (every process calls it)."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    names = {(_peft_key(n) if lora else n): n for n in trainable}
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise SlmembedError(f"the weights to load lack {len(missing)} trained tensors, e.g. {missing[0]}")
    set_model_state_dict(model, {names[k]: tensors[k] for k in names}, options=LOAD)


def gather_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state, whole, keyed by parameter names (every process calls it)."""
    return get_optimizer_state_dict(model, optimizer, options=FULL)


def scatter_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, optimizer, state, options=LOAD)
