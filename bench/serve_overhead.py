"""The server's own time for a lone short text: `slmembed serve`'s p50 at one client against the same encode in-process.

The model is a tiny random Llama (2 layers, hidden size 64, SmolLM2-135M's tokenizer) unless --model names one, so
that what is left after subtracting the in-process ``Embedder.encode`` is the request path: HTTP (uvicorn, Starlette),
parsing, the tokenising and encoding threads' hand-offs, writing the answer. ``GET /health`` gives the bare HTTP round
trip. In-process, the request's own two steps are timed apart too, as the server runs them: tokenising, and the
forward with the copy of the vector to the host (with --cuda-graphs, the recorded graph's replay: ``GraphedEncoder``;
``Embedder.encode`` replays none, so there only the steps are the like-for-like figure).
One keep-alive client, sequential requests. Writes results/bench/serve-overhead-<host>.json (or --output).

    .venv/bin/python bench/serve_overhead.py --requests 500
    python bench/serve_overhead.py --model EXPORT --dtype bfloat16 --cuda-graphs --compile --requests 1000  # on a GPU
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import free_port, latency_ms, start_server, stop_server
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from slmembed import models
from slmembed.adapters import Single
from slmembed.atomic import write_json
from slmembed.compile import compile_blocks
from slmembed.cuda_graphs import GraphedEncoder
from slmembed.loading import load_embedder
from slmembed.serve import Batcher, Limits

ROOT = Path(__file__).resolve().parents[1]
TEXT = "A man is playing a guitar on the stage."


def tiny_llama(folder: Path) -> Path:
    """A 2-layer random Llama with SmolLM2-135M's tokenizer in ``folder``."""
    tokenizer = AutoTokenizer.from_pretrained(models.resolve("smollm2-135m"))
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def timed_ms(call: Callable[[], object], n: int, warmup: int = 50) -> dict[str, float]:
    """``call``'s latency percentiles over ``n`` calls after ``warmup`` (common.latency_ms: p50, p90, p99, max; to the
    microsecond: tokenising one text takes tens of them)."""
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - t0)
    return latency_ms(seconds, digits=3)


def server_path_p50(served: dict, encode: dict, steps: dict, *, cuda_graphs: bool) -> dict[str, float | None]:
    """The request's p50 less what the server computes: less the in-process ``Embedder.encode`` (None with CUDA
    graphs: the server replays a graph, ``Embedder.encode`` does not, so the difference is not the server's path),
    and less the server's own two steps timed in-process (the like-for-like figure either way)."""
    return {"server_path_p50_ms": None if cuda_graphs else round(served["p50"] - encode["p50"], 3),
            "server_path_beyond_its_steps_p50_ms":
                round(served["p50"] - steps["tokenise"]["p50"] - steps["forward_and_copy"]["p50"], 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a model name or folder (default: a tiny random Llama)")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the weights', both sides")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="serve --cuda-graphs, in-process the graph's replay (else: --no-cuda-graphs, the eager "
                         "forward)")
    ap.add_argument("--compile", action="store_true",
                    help="serve --compile, in-process the compiled blocks (with --cuda-graphs: recorded in the graphs)")
    ap.add_argument("--output", help="default: results/bench/serve-overhead-<host>.json")
    args = ap.parse_args()
    if args.requests < 10:
        ap.error("--requests must be at least 10")
    if args.cuda_graphs and not torch.cuda.is_available():
        ap.error("--cuda-graphs needs a GPU")

    model = args.model or str(tiny_llama(Path(tempfile.mkdtemp(prefix="serve-overhead-")) / "tiny-llama"))
    embedder = load_embedder(model, dtype=getattr(torch, args.dtype))
    if args.compile:
        compile_blocks(embedder.model)
    encode = timed_ms(lambda: embedder.encode([TEXT]), args.requests)
    # the server's own two steps, called directly: its tokenising, and its worker's forward with the copy to the host
    batcher = Batcher(Single(embedder, "m"), Limits(), GraphedEncoder(embedder) if args.cuda_graphs else None)
    ids = batcher._ids("m", [TEXT])
    steps = {"tokenise": timed_ms(lambda: batcher._ids("m", [TEXT]), args.requests),
             "forward_and_copy": timed_ms(lambda: batcher._encode("m", ids), args.requests)}

    port = free_port()
    extra = ["--dtype", args.dtype, "--cuda-graphs" if args.cuda_graphs else "--no-cuda-graphs",
             *(["--compile"] if args.compile else [])]
    proc = start_server([sys.executable, "-m", "slmembed", "serve", "--model", model, "--name", "m", "--port",
                         str(port), *extra], port, Path(tempfile.gettempdir()) / "serve-overhead.log")
    conn = http.client.HTTPConnection("127.0.0.1", port)
    body = json.dumps({"model": "m", "input": [TEXT]})

    def embed() -> None:
        conn.request("POST", "/v1/embeddings", body=body, headers={"Content-Type": "application/json"})
        json.loads(conn.getresponse().read())

    def health() -> None:
        conn.request("GET", "/health")
        conn.getresponse().read()

    try:
        served, bare = timed_ms(embed, args.requests), timed_ms(health, args.requests)
    finally:
        conn.close()
        stop_server(proc)
    out = {"command": " ".join(["python", "bench/serve_overhead.py", *sys.argv[1:]]), "model": args.model or
           "tiny random Llama (2 layers, hidden 64)", "text": TEXT, "requests": args.requests,
           "dtype": args.dtype, "cuda_graphs": args.cuda_graphs, "compile": args.compile,
           "device": str(embedder.device),
           "encode_in_process_ms": encode, "in_process_steps_ms": steps, "embeddings_request_ms": served,
           "health_request_ms": bare, **server_path_p50(served, encode, steps, cuda_graphs=args.cuda_graphs),
           "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                       "cores": os.cpu_count(), "torch": torch.__version__,
                       "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    write_json(Path(args.output or ROOT / f"results/bench/serve-overhead-{platform.node()}.json"), out)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
