"""bench/serve_overhead.py: a lone short text through `slmembed serve` against the same encode in-process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_the_server_path_is_the_request_less_the_in_process_encode(tmp_path: Path) -> None:
    """On the tiny random Llama it builds: every figure positive, p90 >= p50, the bare /health round trip shorter
    than an embeddings request, and the server's path the request's p50 less the in-process encode's."""
    out = tmp_path / "overhead.json"
    subprocess.run([sys.executable, str(BENCH / "serve_overhead.py"), "--requests", "20", "--output", str(out)],
                   check=True, capture_output=True, text=True, cwd=BENCH, timeout=300)
    got = json.loads(out.read_text())
    steps = got["in_process_steps_ms"]
    for figures in (got["encode_in_process_ms"], got["embeddings_request_ms"], got["health_request_ms"],
                    steps["tokenise"], steps["forward_and_copy"]):
        assert 0 < figures["p50"] <= figures["p90"]
    assert got["health_request_ms"]["p50"] < got["embeddings_request_ms"]["p50"]
    request, encode = got["embeddings_request_ms"]["p50"], got["encode_in_process_ms"]["p50"]
    assert got["server_path_p50_ms"] == round(request - encode, 3)
    beyond = request - steps["tokenise"]["p50"] - steps["forward_and_copy"]["p50"]
    assert got["server_path_beyond_its_steps_p50_ms"] == round(beyond, 3)
    assert (got["device"], got["dtype"], got["cuda_graphs"]) == ("cpu", "float32", False)
    assert got["requests"] == 20 and got["command"].endswith(f"--output {out}")


@pytest.mark.parametrize("args,message", [(["--requests", "3"], "--requests must be at least 10"),
                                          (["--cuda-graphs"], "--cuda-graphs needs a GPU")])
def test_bad_arguments_are_refused_before_any_model_loads(args: list[str], message: str) -> None:
    if "--cuda-graphs" in args and torch.cuda.is_available():
        pytest.skip("a GPU is here: --cuda-graphs runs")
    run = subprocess.run([sys.executable, str(BENCH / "serve_overhead.py"), *args],
                         capture_output=True, text=True, cwd=BENCH, timeout=120)
    assert run.returncode == 2 and message in run.stderr


def test_with_cuda_graphs_only_the_steps_give_the_server_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Figures of the H100 run (SmolLM2-135M, graphs): the request (5.542 ms) less the eager in-process encode
    (41.006) would be negative, so that figure is None; less the graph's own steps it is 1.506 ms."""
    monkeypatch.syspath_prepend(str(BENCH))
    from serve_overhead import server_path_p50

    steps = {"tokenise": {"p50": 0.038}, "forward_and_copy": {"p50": 3.998}}
    served, encode = {"p50": 5.542}, {"p50": 41.006}
    assert server_path_p50(served, encode, steps, cuda_graphs=True) == {
        "server_path_p50_ms": None, "server_path_beyond_its_steps_p50_ms": 1.506}
    assert server_path_p50(served, {"p50": 4.0}, steps, cuda_graphs=False)["server_path_p50_ms"] == 1.542
