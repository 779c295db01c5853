"""Load test of `slmembed serve`: concurrent clients on loopback for a fixed time, every reply checked.

Starts the server as a process (default: all-minilm-l6-v2), embeds a pool of STSBenchmark test sentences directly
with slmembed's Embedder in this process, then runs CLIENTS threads, each sending requests of 1-4 random pool
sentences over its own keep-alive HTTP connection until the time is up. Every reply is compared with the direct
embeddings of its own inputs (cosine > 0.999, same count and order): a lost, reordered or mixed-up reply counts as a
mismatch. Writes request and text throughput, p50/p90/p99 latency and the status counts, with the command, machine and
date, to results/bench/load_test.json (or --output). Exits 1 on any 5xx, transport error or mismatch.

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
import http.client
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(conn: http.client.HTTPConnection, body: dict) -> tuple[int, dict]:
    conn.request("POST", "/v1/embeddings", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def _start_server(models: list[str], port: int, log: Path, extra: list[str]) -> subprocess.Popen:
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "slmembed", "serve", *models, "--port", str(port), *extra],
                                stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("server did not start")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["all-minilm-l6-v2"], help="a model, or several training runs")
    ap.add_argument("--max-adapters", type=int, help="with several runs: adapters the server holds at once")
    ap.add_argument("--min-cosine", type=float, default=0.999, help="a reply's least cosine to its direct embedding")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--pool", type=int, default=512, help="distinct sentences the requests draw from")
    ap.add_argument("--output", default=str(ROOT / "results/bench/load_test.json"))
    args = ap.parse_args()

    import torch

    from slmembed.atomic import write_json
    from slmembed.data.sts import load_sts
    from slmembed.loading import load_embedder

    sts = load_sts("STSBenchmark")
    pool = sorted(set(sts.sentences1) | set(sts.sentences2))[: args.pool]
    names = [Path(m).name if Path(m).is_dir() else m for m in args.model]
    expected = {name: load_embedder(m).encode(pool)  # the server's defaults: device and dtype "auto"
                for name, m in zip(names, args.model, strict=True)}
    port, log = _free_port(), Path(tempfile.gettempdir()) / "slmembed-load-test-server.log"
    extra = ["--max-adapters", str(args.max_adapters)] if args.max_adapters else []
    server = _start_server(args.model, port, log, extra)

    latencies: list[float] = []
    statuses: Counter = Counter()
    problems: Counter = Counter()
    texts_done = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + args.seconds

    def client(seed: int) -> None:
        rng = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.monotonic() < stop_at:
            picks = rng.sample(range(len(pool)), rng.randint(1, 4))
            name = rng.choice(names)
            t0 = time.perf_counter()
            try:
                status, data = _call(conn, {"model": name, "input": [pool[i] for i in picks]})
            except (OSError, http.client.HTTPException, json.JSONDecodeError):
                with lock:
                    problems["transport"] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                continue
            elapsed = time.perf_counter() - t0
            ok = status == 200 and [d["index"] for d in data["data"]] == list(range(len(picks)))
            if ok:
                got = np.array([d["embedding"] for d in data["data"]], dtype=np.float32)
                ok = bool(((got * expected[name][picks]).sum(1) > args.min_cosine).all())
            with lock:
                statuses[status] += 1
                latencies.append(elapsed)
                if status == 200 and not ok:
                    problems["mismatch"] += 1
                texts_done[0] += len(picks) if ok else 0
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/health")
    health = json.loads(conn.getresponse().read())
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=120)

    lat_ms = np.array(latencies) * 1000
    errors_5xx = sum(n for s, n in statuses.items() if s >= 500)
    result = {
        "command": " ".join(["python", "bench/load_test.py", *sys.argv[1:]]),
        "model": args.model[0] if len(args.model) == 1 else args.model, "max_adapters": args.max_adapters,
        "min_cosine": args.min_cosine, "clients": args.clients, "seconds": args.seconds, "wall_s": round(wall, 2),
        "requests": int(sum(statuses.values())), "texts": texts_done[0],
        "requests_per_s": round(sum(statuses.values()) / wall, 1), "texts_per_s": round(texts_done[0] / wall, 1),
        "latency_ms": {q: round(float(np.percentile(lat_ms, p)), 1) for q, p in
                       (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        "status": {str(s): n for s, n in sorted(statuses.items())}, "errors_5xx": errors_5xx,
        "mismatches": problems["mismatch"], "transport_errors": problems["transport"],
        "server_batches": health["batches"], "texts_per_batch": round(health["texts"] / max(health["batches"], 1), 1),
        **{k: health[k] for k in ("adapter_loads", "adapter_unloads") if k in health},
        "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "note": "server and clients share the machine"},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    write_json(args.output, result)
    print(json.dumps(result, indent=2))
    return 0 if errors_5xx == 0 and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
