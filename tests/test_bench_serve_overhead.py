"""bench/serve_overhead.py: a lone short text through `slmembed serve` against the same encode in-process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_the_server_path_is_the_request_less_the_in_process_encode(tmp_path: Path) -> None:
    """On the tiny random Llama it builds: every figure positive, p90 >= p50, the bare /health round trip shorter
    than an embeddings request, and the server's path the request's p50 less the in-process encode's."""
    out = tmp_path / "overhead.json"
    subprocess.run([sys.executable, str(BENCH / "serve_overhead.py"), "--requests", "20", "--output", str(out)],
                   check=True, capture_output=True, text=True, cwd=BENCH, timeout=300)
    got = json.loads(out.read_text())
    for key in ("encode_in_process_ms", "embeddings_request_ms", "health_request_ms"):
        assert 0 < got[key]["p50"] <= got[key]["p90"]
    assert got["health_request_ms"]["p50"] < got["embeddings_request_ms"]["p50"]
    request, encode = got["embeddings_request_ms"]["p50"], got["encode_in_process_ms"]["p50"]
    assert got["server_path_p50_ms"] == round(request - encode, 3)
    assert got["requests"] == 20 and got["command"].endswith(f"--output {out}")


def test_too_few_requests_is_refused_before_any_model_loads(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(BENCH / "serve_overhead.py"), "--requests", "3"],
                         capture_output=True, text=True, cwd=BENCH, timeout=120)
    assert run.returncode == 2 and "--requests must be at least 10" in run.stderr
