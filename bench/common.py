"""What every benchmark needs: provenance, the GPU's measured matmul ceiling, the sentence-transformers peer, and the
load generator of the serving benchmarks (servers as processes, concurrent clients, every reply checked).

The peer is built the way its users would build it for this task: Transformer -> Pooling(lasttoken) -> Normalize,
bf16 weights, a PEFT LoRA adapter, MultipleNegativesRankingLoss with scale 20 (= temperature 0.05). Its tokenizer is
given what ``slmembed export`` gives an exported model's: it appends EOS itself and pads on the right, so both tools
see the same token ids (``check_same_tokens`` verifies it) at the same positions. (Carrying EOS as text gave other
ids for about a quarter of the sentences with transformers 5.17, and left padding shifts Gemma's positions.)
"""

from __future__ import annotations

import contextlib
import http.client
import json
import multiprocessing
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path

import numpy as np
import torch

from slmembed.atomic import write_json
from slmembed.cli import provenance
from slmembed.device import resolve_device
from slmembed.embedder import Embedder
from slmembed.export import export_tokenizer
from slmembed.report import read_log
from slmembed.run import RunDir
from slmembed.spec import EmbedSpec


def save(path: str | Path, result: dict) -> None:
    write_json(path, {**result, "run": provenance(" ".join(["python", *sys.argv]))})
    print(f"wrote {path}")


def log_window(run_dir: Path, first: int, last: int) -> tuple[dict, float]:
    """A training run's log record at step ``last``, and the seconds between the records of ``first`` and ``last``."""
    log = {r["step"]: r for r in read_log(RunDir(run_dir).log)}
    return log[last], log[last]["elapsed_s"] - log[first]["elapsed_s"]


def matmul_ceiling_tflops(n: int = 8192, repeats: int = 50) -> float:
    """Measured bf16 matrix-product throughput of this GPU (TFLOP/s), the denominator of MFU."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e12


def st_model(folder: str | Path, spec: EmbedSpec, dtype: torch.dtype = torch.bfloat16):
    """The peer: a sentence-transformers model with last-token pooling over ``folder``'s backbone."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer

    # Plain text in, hidden states out: without the pin, sentence-transformers 6 wraps the text of a model that has
    # a chat template (SmolLM2-Instruct) in that template.
    backbone = Transformer(str(folder), model_kwargs={"dtype": dtype}, max_seq_length=spec.max_length,
                           modality_config={"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
                           module_output_name="token_embeddings")
    tokenizer = getattr(backbone, "tokenizer", None) or backbone.processor
    if tokenizer.pad_token is None:  # as slmembed does (models.load): SmolLM2's GGUF tokenizer has no pad token
        tokenizer.pad_token = tokenizer.eos_token
    export_tokenizer(tokenizer, spec)
    pooling = Pooling(backbone.get_embedding_dimension(), pooling_mode="lasttoken")
    return SentenceTransformer(modules=[backbone, pooling, Normalize()], device=str(resolve_device()))


def st_texts(texts: list[str], embedder: Embedder) -> list[str]:
    """The peer's inputs: each text in the prompt template (its tokenizer appends EOS)."""
    return [embedder.spec.template.format(t) for t in texts]


def check_same_tokens(model, embedder: Embedder, texts: list[str]) -> int:
    """How many of ``texts`` the peer tokenises differently from slmembed (0 expected)."""
    ours = embedder.tokenize(texts)
    theirs = model.tokenize(st_texts(texts, embedder))
    mask, ids = theirs["attention_mask"], theirs["input_ids"]
    return sum(ids[i][mask[i].bool()].tolist() != row for i, row in enumerate(ours))


class StEncoder:
    """Lets slmembed's evaluator score the peer: ``encode`` with the peer's own batching."""

    def __init__(self, model, embedder: Embedder, batch_size: int = 256) -> None:
        self.model, self.embedder, self.batch_size = model, embedder, batch_size
        self.device = model.device

    def encode(self, texts, batch_size: int | None = None, max_tokens: int | None = None,
               progress: bool = False) -> np.ndarray:
        return self.model.encode(st_texts(list(texts), self.embedder), batch_size=self.batch_size,
                                 normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)


# Load generation over real sockets (load_test.py, serve_gpu.py): servers started as processes, keep-alive clients in
# threads (of this process, or of several forked ones), every reply checked against direct embeddings of its inputs.

Request = tuple[dict, np.ndarray]  # a request's JSON body and the expected (unit) vectors of its inputs, in order


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None,
                 timeout: float = 600.0) -> subprocess.Popen:
    """Start ``cmd`` (output to ``log``) and return once ``GET /health`` on ``port`` answers 200."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited: {' '.join(cmd)}\n{log.read_text()[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"server did not start: {' '.join(cmd)}\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    return json.loads(conn.getresponse().read())


def post_json(conn: http.client.HTTPConnection, path: str, body: dict) -> tuple[int, dict]:
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def reply_problem(data: dict, expected: np.ndarray, min_cosine: float) -> tuple[str | None, float]:
    """What is wrong with a 200 reply to inputs whose direct embeddings are ``expected`` ("missing": not one vector
    per input; "reordered": indices not 0..n-1 in order; "mismatch": a cosine at or below ``min_cosine``; None: right),
    and the least cosine of its vectors to their own inputs' (nan if it was not compared)."""
    items = data.get("data") or []
    if len(items) != len(expected):
        return "missing", float("nan")
    if [d.get("index") for d in items] != list(range(len(expected))):
        return "reordered", float("nan")
    got = np.array([d["embedding"] for d in items], dtype=np.float32)
    got /= np.linalg.norm(got, axis=1, keepdims=True)
    cos = float((got * expected).sum(1).min())
    return (None if cos > min_cosine else "mismatch"), cos


def latency_ms(seconds: list[float], digits: int = 1) -> dict[str, float]:
    """p50, p90, p99 and max of request latencies given in seconds, in milliseconds to ``digits`` decimals."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    return {q: round(float(np.percentile(ms, p)), digits)
            for q, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))}


@dataclass
class _Tally:
    """What a group of clients counted, with the CPU seconds and the monotonic start and end of their threads."""

    statuses: Counter = field(default_factory=Counter)
    problems: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    least: float = 1.0
    texts: int = 0  # inputs answered with a vector each, in order (a mismatched vector still counts: it was served)
    matched: int = 0  # of those, inputs in replies whose every vector matched
    cpu_s: float = 0.0
    started: float = 0.0
    ended: float = 0.0


def client_groups(clients: int, processes: int) -> list[list[int]]:
    """The seeds (client numbers 0..clients-1, in order) of each of ``min(processes, clients)`` worker processes, as
    evenly as possible."""
    return [g.tolist() for g in np.array_split(np.arange(clients), max(1, min(processes, clients)))]


def _run_clients(port: int, make_request: Callable[[random.Random], Request], seeds: list[int], stop_at: float,
                 min_cosine: float, path: str) -> _Tally:
    """One thread per seed, each on its own keep-alive connection, sending ``make_request(Random(seed))``'s requests
    to ``path`` until ``stop_at`` (time.monotonic) and checking every 200 reply with ``reply_problem``. A client whose
    loop raises (``make_request``, a malformed reply) prints the traceback, stops, and counts as a transport error."""
    tally = _Tally()
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        try:
            while time.monotonic() < stop_at:
                body, expected = make_request(rng)
                t0 = time.perf_counter()
                try:
                    status, data = post_json(conn, path, body)
                except (OSError, http.client.HTTPException, json.JSONDecodeError):
                    with lock:
                        tally.problems["transport"] += 1
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
                    continue
                elapsed = time.perf_counter() - t0
                problem, cos = reply_problem(data, expected, min_cosine) if status == 200 else (None, float("nan"))
                with lock:
                    tally.statuses[status] += 1
                    tally.latencies.append(elapsed)
                    if problem:
                        tally.problems[problem] += 1
                    if cos == cos:  # compared (not nan)
                        tally.least = min(tally.least, cos)
                    if status == 200 and problem in (None, "mismatch"):
                        tally.texts += len(expected)
                        tally.matched += 0 if problem else len(expected)
        except Exception:
            traceback.print_exc()
            with lock:
                tally.problems["transport"] += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in seeds]
    tally.started, cpu = time.monotonic(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tally.ended, tally.cpu_s = time.monotonic(), time.process_time() - cpu
    return tally


GRACE_S = 60.0  # how long past the common window the parent waits for a worker process's counts before giving it up


def _run_processes(port: int, make_request: Callable[[random.Random], Request], groups: list[list[int]],
                   seconds: float, min_cosine: float, path: str) -> tuple[list[_Tally], list[list[int]], float]:
    """``_run_clients`` in one forked worker process per group of seeds, all released by one barrier into one window
    of ``seconds``. The workers' tallies, the groups whose worker sent none (it died, or was still running ``GRACE_S``
    after the window and was killed), and the wall time from the release to the last worker's end."""
    # fork: make_request is a closure over numpy arrays, shared without pickling; the workers only do HTTP and numpy
    # (never CUDA, which does not survive a fork).
    ctx = multiprocessing.get_context("fork")
    start = ctx.Value("d", 0.0, lock=False)
    # the last party to arrive stamps the common start, before any is released
    barrier = ctx.Barrier(len(groups) + 1, action=lambda: setattr(start, "value", time.monotonic()))

    def work(seeds: list[int], send: Connection) -> None:
        try:
            barrier.wait(GRACE_S)
        except threading.BrokenBarrierError:
            return  # sends nothing: the parent counts this worker's clients as lost
        send.send(_run_clients(port, make_request, seeds, start.value + seconds, min_cosine, path))

    workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    for seeds in groups:
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=work, args=(seeds, send), daemon=True)
        proc.start()
        send.close()  # the worker holds the only write end: its death reads as EOF here
        workers.append((proc, recv))
    try:
        barrier.wait(GRACE_S)
        started = start.value
    except threading.BrokenBarrierError:
        started = time.monotonic()
    deadline = started + seconds + GRACE_S
    tallies: dict[int, _Tally] = {}
    pending = {recv: k for k, (_, recv) in enumerate(workers)}
    while pending and (ready := wait(list(pending), timeout=max(0.0, deadline - time.monotonic()))):
        for recv in ready:
            k = pending.pop(recv)
            with contextlib.suppress(EOFError):  # the worker died before sending
                tallies[k] = recv.recv()
    for proc, recv in workers:
        proc.join(timeout=0 if recv in pending else 10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        recv.close()
    ended = max((t.ended for t in tallies.values()), default=time.monotonic())
    return list(tallies.values()), [g for k, g in enumerate(groups) if k not in tallies], ended - started


def drive(port: int, make_request: Callable[[random.Random], Request], clients: int, seconds: float,
          min_cosine: float, path: str = "/v1/embeddings", processes: int = 1) -> dict:
    """``clients`` threads, each on its own keep-alive connection, send ``make_request``'s requests to ``path``
    until ``seconds`` are up; every 200 reply is checked with ``reply_problem``. Client k draws from
    ``random.Random(k)``. Counts, rates, latencies, and the clients' CPU seconds per second of wall time. ``texts``
    counts every input answered with a vector in its place (the server's throughput), ``texts_matched`` those in
    replies whose vectors all passed the cosine check (a mismatched reply is in ``mismatches``).

    With ``processes`` > 1 the clients are spread over that many forked worker processes (at most ``clients``; see
    ``client_groups``), so that parsing and checking replies is not bound to one core; they start together and stop
    at the same moment, and the counts are summed (``client_cpu_per_wall``: all workers' CPU seconds;
    ``client_cpu_per_wall_max``: the busiest worker's). A worker that dies or hangs past the window counts each of its
    clients as one transport error (and in ``client_processes_lost``), and its requests are not counted."""
    groups = client_groups(clients, processes)
    if len(groups) == 1:  # threads in this process
        parts = [_run_clients(port, make_request, groups[0], time.monotonic() + seconds, min_cosine, path)]
        lost: list[list[int]] = []
        wall = parts[0].ended - parts[0].started
    else:
        parts, lost, wall = _run_processes(port, make_request, groups, seconds, min_cosine, path)
    statuses: Counter = sum((t.statuses for t in parts), Counter())
    problems: Counter = sum((t.problems for t in parts), Counter())
    problems["transport"] += sum(len(g) for g in lost)
    latencies = [s for t in parts for s in t.latencies]
    texts, matched = sum(t.texts for t in parts), sum(t.matched for t in parts)
    requests = sum(statuses.values())
    return {"clients": clients, "seconds": seconds, "wall_s": round(wall, 2), "requests": requests,
            "texts": texts, "requests_per_s": round(requests / wall, 1), "texts_per_s": round(texts / wall, 1),
            "texts_matched": matched, "texts_matched_per_s": round(matched / wall, 1),
            "latency_ms": latency_ms(latencies) if latencies else None,
            "status": {str(s): n for s, n in sorted(statuses.items())},
            "errors": sum(n for s, n in statuses.items() if s != 200) + problems["transport"],
            "transport_errors": problems["transport"],
            "mismatches": sum(problems[k] for k in ("missing", "reordered", "mismatch")),
            "problems": {k: problems[k] for k in ("missing", "reordered", "mismatch") if problems[k]},
            "min_cosine_seen": round(min((t.least for t in parts), default=1.0), 6),
            "client_processes": len(groups), "client_processes_lost": len(lost),
            # near 1 (or more): the clients' own process is busy all the time, and may be what limits the rates;
            # summed over worker processes, so the max says whether one of them was
            "client_cpu_per_wall": round(sum(t.cpu_s for t in parts) / wall, 2),
            "client_cpu_per_wall_max": round(max((t.cpu_s / (t.ended - t.started) for t in parts), default=0.0), 2)}
