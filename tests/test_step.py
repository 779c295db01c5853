"""step.Step, the one training step: built for CUDA graphs it trains as the ordinary step does (the graph's CPU path:
its fixed-shape inputs, not recorded), also as one of two replicas, which replays the bucket of the step's largest
share, and when a step is over ``chunk_tokens`` and runs the ordinary way."""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_cuda_graphs import SENTENCES, _embedder_of
from test_train import _tiny_recipe
from transformers import get_scheduler

from slmembed import cuda_graphs
from slmembed.batch import TrainData, batch_indices, rank_rows
from slmembed.step import Step

ROWS = [batch_indices(30, 10, s, seed=1) for s in range(3)]  # three steps of a global batch of 10


def _run(tiny_models, world: int, **train) -> tuple[list[float], dict, dict, Step]:
    """Three steps of process 0 of ``world`` (an accelerator stand-in: no process group, so a replica's own gradient
    average is the identity); the losses, the trained weights before and after, the step."""
    embedder = _embedder_of(str(tiny_models["llama"]))  # the same weights every time
    examples = [(SENTENCES[i], SENTENCES[i + 1], None if i % 7 == 3 else SENTENCES[i + 2]) for i in range(30)]
    texts = sorted({t for e in examples for t in e if t is not None})
    token_ids = dict(zip(texts, embedder.tokenize(texts), strict=True))
    cost = np.array([sum(len(token_ids[t]) for t in e if t is not None) for e in examples])
    data = TrainData(examples, token_ids, [0, 1, 2], cost)
    trained = {k: p for k, p in embedder.model.named_parameters() if p.requires_grad}
    before = {k: p.detach().clone() for k, p in trained.items()}
    optimizer = torch.optim.SGD(trained.values(), lr=0.5)  # an update linear in the gradients
    acc = SimpleNamespace(process_index=0, num_processes=world, device=torch.device("cpu"),
                          backward=torch.Tensor.backward, no_sync=nullcontext)
    step = Step(_tiny_recipe(tiny_models, **train), acc, embedder, optimizer, get_scheduler("constant", optimizer),
                data, bf16=False)
    if step.graphed is not None:  # a missing negative's slot filled with a word, which only the mask keeps out
        step.graphed.pad = embedder.tokenize(["sentence"])[0][0]
    losses = [step(rows).item() for rows in ROWS]
    return losses, before, {k: p.detach().clone() for k, p in trained.items()}, step


def _recorded_tokens(data: TrainData, rows: np.ndarray) -> int:
    """The tokens of a graphed step of ``rows``: anchors, positives and negatives, a missing one as one token."""
    texts = [data.examples[i][c] for c in data.cols for i in rows]
    return sum(1 if t is None else len(data.token_ids[t]) for t in texts)


@pytest.mark.parametrize("world,chunk_tokens", [(1, 4096), (2, 4096), (1, 64)])
def test_a_graphed_step_trains_as_the_ordinary_step(tiny_models, monkeypatch, world, chunk_tokens) -> None:
    largest, call = [], cuda_graphs.GraphedStep.__call__
    monkeypatch.setattr(cuda_graphs.GraphedStep, "__call__",
                        lambda self, batch, size=None: largest.append(size) or call(self, batch, size))
    want, before, want_weights, _ = _run(tiny_models, world, chunk_tokens=chunk_tokens)
    got, _, got_weights, step = _run(tiny_models, world, chunk_tokens=chunk_tokens, cuda_graphs=True)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert len(got_weights) == 8 and all(not torch.equal(want_weights[k], before[k]) for k in before)  # it trained
    for name, weight in want_weights.items():
        torch.testing.assert_close(got_weights[name], weight, rtol=1e-5, atol=1e-6, msg=name)
    assert bool(step.graphed.graphs) is (chunk_tokens > 64)  # 64 tokens: every step the ordinary way
    if world == 1:
        assert largest == [None] * 3
    else:  # the bucket of the largest share, which each replica computes from the global batch
        shares = [[rank_rows(rows, step.data.cost, rank, 2) for rank in range(2)] for rows in ROWS]
        assert largest == [max(_recorded_tokens(step.data, s) for s in ss) for ss in shares]
