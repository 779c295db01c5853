"""Load test of `slmembed serve`: concurrent clients on loopback for a fixed time, every reply checked.

Starts the server as a process (default: all-minilm-l6-v2), embeds a pool of STSBenchmark test sentences directly with
slmembed's Embedder in this process, then runs CLIENTS threads, each sending requests of 1-4 random pool sentences over
its own keep-alive HTTP connection until the time is up (with --client-processes N, the threads are spread over N forked
processes, for a server fast enough that one client process's core would limit the rates). Every reply is compared with
the direct embeddings of its own inputs (cosine > 0.999, same count and order): a lost, reordered or mixed-up reply
counts as a mismatch. Writes request and text throughput, p50/p90/p99 latency and the status counts, with the command,
machine and date, to results/bench/load_test.json (or --output). Exits 1 on any 5xx, transport error or mismatch.

With several training runs as --model, the server holds their LoRA adapters over one base model (at most
--max-adapters at once) and each request names a random one of them; its reply is checked against that run's own
embeddings (its merged model, embedded directly; --min-cosine, as unmerged and merged LoRA differ in bf16).

    .venv/bin/python bench/load_test.py --clients 64 --seconds 60
    .venv/bin/python bench/load_test.py --model runs/a runs/b --max-adapters 1 --min-cosine 0.995 \
        --clients 16 --seconds 60 --output results/bench/load_test-adapters.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["all-minilm-l6-v2"], help="a model, or several training runs")
    ap.add_argument("--max-adapters", type=int, help="with several runs: adapters the server holds at once")
    ap.add_argument("--min-cosine", type=float, default=0.999, help="a reply's least cosine to its direct embedding")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--client-processes", type=int, default=1, help="processes the clients are spread over")
    ap.add_argument("--pool", type=int, default=512, help="distinct sentences the requests draw from")
    ap.add_argument("--output", default=str(ROOT / "results/bench/load_test.json"))
    args = ap.parse_args()
    if args.client_processes < 1:
        ap.error("--client-processes must be at least 1")

    import torch
    from common import Request, drive, free_port, get_json, start_server, stop_server

    from slmembed.atomic import write_json
    from slmembed.data.sts import load_sts
    from slmembed.loading import load_embedder

    sts = load_sts("STSBenchmark")
    pool = sorted(set(sts.sentences1) | set(sts.sentences2))[: args.pool]
    names = [Path(m).name if Path(m).is_dir() else m for m in args.model]
    expected = {name: load_embedder(m).encode(pool)  # the server's defaults: device and dtype "auto"
                for name, m in zip(names, args.model, strict=True)}
    port, log = free_port(), Path(tempfile.gettempdir()) / "slmembed-load-test-server.log"
    extra = ["--max-adapters", str(args.max_adapters)] if args.max_adapters else []
    server = start_server([sys.executable, "-m", "slmembed", "serve", *args.model, "--port", str(port), *extra],
                          port, log)

    def request(rng: random.Random) -> Request:
        picks = rng.sample(range(len(pool)), rng.randint(1, 4))
        name = rng.choice(names)
        return {"model": name, "input": [pool[i] for i in picks]}, expected[name][picks]

    load = drive(port, request, args.clients, args.seconds, args.min_cosine, processes=args.client_processes)
    health = get_json(port, "/health")
    stop_server(server)

    result = {
        "command": " ".join(["python", "bench/load_test.py", *sys.argv[1:]]),
        "model": args.model[0] if len(args.model) == 1 else args.model, "max_adapters": args.max_adapters,
        "min_cosine": args.min_cosine, **load,
        "server_batches": health["batches"], "texts_per_batch": round(health["texts"] / max(health["batches"], 1), 1),
        **{k: health[k] for k in ("adapter_loads", "adapter_unloads") if k in health},
        "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "note": "server and clients share the machine"},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    write_json(args.output, result)
    print(json.dumps(result, indent=2))
    return 0 if load["errors"] == 0 and load["mismatches"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
