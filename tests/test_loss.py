"""InfoNCE against a direct computation, and the cross-rank gather against one process over the whole batch."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slmembed.losses import LOSSES, REFERENCE, objective
from slmembed.losses.infonce import info_nce
from slmembed.losses.symmetric import symmetric_info_nce


def reference(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None, tau: float) -> float:
    """Loop-by-loop InfoNCE in float64: -log softmax of cos(a_i, p_i) among all positives and negatives."""
    cands = list(p) + (list(n) if n is not None else [])
    cos = lambda x, y: float(x.double() @ y.double() / (x.double().norm() * y.double().norm()))  # noqa: E731
    total = 0.0
    for i, ai in enumerate(a):
        logits = [cos(ai, c) / tau for c in cands]
        top = max(logits)
        total += -(logits[i] - top - math.log(sum(math.exp(v - top) for v in logits)))
    return total / len(a)


@pytest.mark.parametrize("tau", [0.05, 1.0])
@pytest.mark.parametrize("hard", [True, False])
def test_info_nce_matches_reference(tau: float, hard: bool) -> None:
    g = torch.Generator().manual_seed(1)
    a, p, n = (torch.randn(6, 5, generator=g) * 3 for _ in range(3))
    got = info_nce(a, p, n if hard else None, temperature=tau).item()
    assert got == pytest.approx(reference(a, p, n if hard else None, tau), rel=1e-5)


def test_info_nce_is_low_when_positives_match() -> None:
    a = torch.eye(4)
    assert info_nce(a, a.clone(), -a, temperature=0.05).item() < 1e-6
    assert info_nce(a, a.roll(1, 0), None, temperature=0.05).item() > 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(name: str, inputs: list[torch.Tensor], rows: slice = slice(None), device: str = "cpu") -> dict:
    """The ``reference`` keyword of the objectives that take one (losses.REFERENCE): vectors of another width for the
    same rows, each near its trained one's first coordinates (so that some candidates rank above a positive)."""
    if name not in REFERENCE:
        return {}
    g = torch.Generator().manual_seed(7)
    ref = [t[:, :12] + 0.5 * torch.randn(t.shape[0], 12, generator=g) for t in inputs]
    return {"reference": tuple([r[rows].to(device) for r in ref] + [None] * (3 - len(ref)))}


def _rank(rank: int, world: int, port: int, backend: str, name: str, options: dict, inputs, mask, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(f"cuda:{rank}" if backend == "nccl" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world, device_id=device if backend == "nccl" else None)
    rows = slice(rank * len(inputs[0]) // world, (rank + 1) * len(inputs[0]) // world)
    local = [t[rows].to(device).requires_grad_(True) for t in inputs]
    loss = objective(name)(*local, *[None] * (3 - len(local)), temperature=0.05,
                        negative_mask=None if mask is None else mask[rows].to(device), **options,
                        **_reference(name, inputs, rows, device))
    loss.backward()
    out[rank] = [loss.detach().cpu()] + [t.grad.cpu() for t in local]
    dist.destroy_process_group()


OPTIONS = {"angle_infonce": {"angle_weight": 1.0}}  # the angle term at full weight (AnglE's 0.02 would hide it)
BACKENDS = ["gloo", pytest.param("nccl", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL needs two GPUs (the gloo case runs everywhere)"))]


# Each case starts two processes (15 s on 2 cores): the objectives built on info_nce's gather (those that take a
# reference) are run in the case that has them all, hard negatives with some missing.
CASES = [(name, negatives) for name in LOSSES for negatives in ("hard", "none", "masked")
         if name not in REFERENCE or negatives == "masked"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, negatives", CASES)
def test_two_ranks_equal_one_process_over_the_whole_batch(name: str, negatives: str, backend: str) -> None:
    """Mean of the rank losses = the global loss; each rank's gradient / world = the global gradient's slice.

    (DDP averages parameter gradients over ranks, which supplies that 1/world.) With hard negatives, without, and
    with some of them missing (masked out); over gloo on the CPU, and over NCCL between two GPUs where there are. The
    objectives that take a reference model's vectors get them for the same rows, gathered like the candidates.
    """
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(8, 16, generator=g) for _ in range(2 if negatives == "none" else 3)]
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool) if negatives == "masked" else None
    full = [t.clone().requires_grad_(True) for t in inputs]
    options = OPTIONS.get(name, {})
    loss = objective(name)(*full, *[None] * (3 - len(full)), temperature=0.05, negative_mask=mask, **options,
                           **_reference(name, inputs))
    loss.backward()

    world = 2
    out = mp.Manager().dict()
    mp.start_processes(_rank, args=(world, _free_port(), backend, name, options, inputs, mask, out), nprocs=world,
                       start_method="spawn")
    assert torch.stack([out[r][0] for r in range(world)]).mean().item() == pytest.approx(loss.item(), rel=1e-5)
    for r in range(world):
        rows = slice(r * 4, (r + 1) * 4)
        for k, t in enumerate(full):
            torch.testing.assert_close(out[r][k + 1] / world, t.grad[rows], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("hard", [True, False])
def test_symmetric_info_nce_adds_the_positives_to_anchors_direction(hard: bool) -> None:
    """Half the paper's loss plus half of each positive's InfoNCE against all anchors (no hard negatives there)."""
    g = torch.Generator().manual_seed(3)
    a, p, n = (torch.randn(6, 5, generator=g) * 3 for _ in range(3))
    got = symmetric_info_nce(a, p, n if hard else None, temperature=0.05).item()
    want = (reference(a, p, n if hard else None, 0.05) + reference(p, a, None, 0.05)) / 2
    assert got == pytest.approx(want, rel=1e-5)
    assert objective("symmetric_infonce") is symmetric_info_nce and objective("infonce") is info_nce
