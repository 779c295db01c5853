"""Regional ``torch.compile``: compile the transformer block once, not the whole model.

A decoder is one block repeated N times. Compiling each block in place (``nn.Module.compile``) lets Dynamo trace one
block and reuse the compiled code for all N (parameters are inputs, not constants), so compile time is that of one
block, and every block runs as a few fused kernels instead of dozens of eager ones (norms in fp32, rotary embeddings,
LoRA's dropout and scaled adds). Shapes are symbolic from the start, so batches of any (rows, width) reuse the same
code.

Inductor is told to draw random numbers exactly as eager PyTorch does (``fallback_random``): LoRA dropout then
gives the same masks compiled or not, which GradCache's replay of each chunk's forward relies on.
"""

from __future__ import annotations

import torch
import torch._dynamo.config
import torch._inductor.config
import torch.fx.experimental._config


def blocks(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's repeated blocks: its longest ModuleList (``layers`` of a decoder, ``layer`` of a BERT encoder)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    return max(lists, key=len, default=None)


def compile_blocks(model: torch.nn.Module) -> None:
    """Compile every block of ``model`` in place (the whole model if it has no repeated blocks)."""
    torch._inductor.config.fallback_random = True
    # Sizes that happen to be equal (a width of 16 and a head size of 16) must not share one symbol, or the first
    # batch whose width differs recompiles.
    torch.fx.experimental._config.use_duck_shape = False
    # One block traced per grad mode (training, GradCache's graph-free pass), per whether its input needs a gradient
    # (the first block's does not) and per kind of layer (Gemma-3's local and global attention): more than the default.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    repeated = blocks(model)
    if repeated is None:
        model.compile(dynamic=True)
        return
    for block in repeated:
        block.compile(dynamic=True)
