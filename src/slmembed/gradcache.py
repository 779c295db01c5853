"""Cached-negatives training (GradCache; Gao, Zhang, Han and Callan 2021): one loss over a batch larger than fits.

The loss needs every embedding of the batch at once, but the gradient of each parameter only needs, per chunk of
sequences, the chunk's graph and the loss's gradient with respect to the chunk's embeddings. So:

1. embed every chunk without a graph, remembering the random state before each (dropout must draw the same masks);
2. compute the loss ``L(E)`` on the detached embeddings ``E`` [N, D] and ``G = dL/dE`` (small: N x D);
3. embed each chunk again with a graph, with its random state restored, and backpropagate ``G_chunk`` into it.

By the chain rule the parameters receive exactly ``dL/dtheta``, while only one chunk's activations are alive at a
time: peak memory depends on the chunk size, not the batch size. The cost is a second forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import numpy as np
import torch

from slmembed.embedder import Embedder


class _RandomState:
    """The CPU (and this device's CUDA) generator state at construction, restorable inside a forked RNG."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def restored(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def cached_backward(
    embedder: Embedder,
    ids: Sequence[list[int]],
    max_tokens: int,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    no_sync: Callable[[], AbstractContextManager] = nullcontext,
) -> torch.Tensor:
    """Backpropagate ``loss_fn(embeddings of ids)`` into the model chunk by chunk; return the (detached) loss.

    ``loss_fn`` takes the embeddings [N, D] in the order of ``ids``. ``no_sync`` is entered for every chunk's backward
    but the last (DDP's ``no_sync``), so gradients are all-reduced once per step.
    """
    chunks = embedder.chunks(ids, max_tokens)
    # Collated and copied to the device once, used by both passes.
    batches = [embedder.to_device(embedder.collate([ids[i] for i in chunk])) for chunk in chunks]
    states, parts = [], []
    with torch.no_grad():
        for batch in batches:
            states.append(_RandomState(embedder.device))
            parts.append(embedder.forward(batch))
    order = torch.from_numpy(np.concatenate(chunks)).to(embedder.device, non_blocking=True)
    embeddings = parts[0].new_empty((len(ids), parts[0].shape[1]))
    embeddings[order] = torch.cat(parts)
    embeddings.requires_grad_()
    loss = loss_fn(embeddings)
    (grad,) = torch.autograd.grad(loss, embeddings)
    grads = grad[order].split([len(chunk) for chunk in chunks])
    for k, (batch, state) in enumerate(zip(batches, states, strict=True)):
        with (no_sync() if k < len(chunks) - 1 else nullcontext()), state.restored():
            embedder.forward(batch).backward(grads[k])
    return loss.detach()
