"""The serving benchmark's parts (bench/common.py, bench/serve_gpu.py) without a real server: the reply checker, the
load generator against a stub HTTP server, the long-text builder and the latency percentiles."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import common  # noqa: E402
import serve_gpu  # noqa: E402


def _unit(rng: np.random.Generator, n: int, dim: int = 16) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _reply(vectors: np.ndarray, indices: list[int] | None = None) -> dict:
    indices = list(range(len(vectors))) if indices is None else indices
    return {"data": [{"index": i, "embedding": v.tolist()} for i, v in zip(indices, vectors, strict=True)]}


def test_reply_checker_flags_a_wrong_vector_a_reordered_reply_and_a_missing_one() -> None:
    expected = _unit(np.random.default_rng(0), 3)
    problem, cos = common.reply_problem(_reply(expected * 2.5), expected, 0.999)  # scale does not matter
    assert problem is None and cos == pytest.approx(1.0, abs=1e-6)
    wrong = expected.copy()
    wrong[1] = _unit(np.random.default_rng(1), 1)[0]
    problem, cos = common.reply_problem(_reply(wrong), expected, 0.999)
    assert problem == "mismatch" and cos == pytest.approx(float(wrong[1] @ expected[1]), abs=1e-6)
    assert common.reply_problem(_reply(expected[[1, 0, 2]]), expected, 0.999)[0] == "mismatch"  # swapped vectors
    assert common.reply_problem(_reply(expected[[1, 0, 2]], [1, 0, 2]), expected, 0.999)[0] == "reordered"
    assert common.reply_problem(_reply(expected[:2]), expected, 0.999)[0] == "missing"
    assert common.reply_problem({"data": []}, expected, 0.999)[0] == "missing"


class _Stub(BaseHTTPRequestHandler):
    """Answers /v1/embeddings with each text's vector from ``vectors``; ``drop_last`` leaves a multi-text reply's
    last vector out; ``wrong_text`` is answered with another text's vector; a request with ``busy_text`` among its
    inputs gets 503. ``log`` gets each request's (nonce, inputs, status, vectors answered), ``wrong`` the inputs
    answered of each reply with a wrong vector."""

    vectors: dict[str, list[float]] = {}
    drop_last = False
    wrong_text: str | None = None
    busy_text: str | None = None
    log: list[tuple[int, int, int, int]] = []
    wrong: list[int] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        texts = body["input"][:-1] if self.drop_last and len(body["input"]) > 1 else body["input"]
        status = 503 if self.busy_text in body["input"] else 200
        answered = texts if status == 200 else []
        payload = json.dumps(_reply(np.array([self.vectors[TEXTS[0] if t == self.wrong_text else t]
                                              for t in answered]))).encode()
        self.log.append((body.get("nonce"), len(body["input"]), status, len(answered)))
        if self.wrong_text in answered:
            self.wrong.append(len(answered))
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


TEXTS = [f"text {i}" for i in range(8)]
VECTORS = _unit(np.random.default_rng(0), len(TEXTS))


@contextmanager
def _stub(**attrs) -> Iterator[tuple[int, list[tuple[int, int, int, int]]]]:
    """A stub server on a free port answering TEXTS with VECTORS (``attrs``: _Stub's switches), and its log."""
    log: list[tuple[int, int, int, int]] = []
    handler = type("Stub", (_Stub,), {"vectors": dict(zip(TEXTS, VECTORS.tolist(), strict=True)), "log": log,
                                      **attrs})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], log
    finally:
        server.shutdown()
        server.server_close()


def _request(rng: random.Random) -> common.Request:
    """1-4 of TEXTS, with a 64-bit nonce that tells which client's stream (and where in it) a request comes from."""
    nonce = rng.getrandbits(64)
    picks = rng.sample(range(len(TEXTS)), rng.randint(1, 4))
    return {"model": "m", "input": [TEXTS[i] for i in picks], "nonce": nonce}, VECTORS[picks]


def _per_client(log: list[tuple[int, int, int, int]], clients: int) -> list[int]:
    """How many requests of the log each client k sent, asserting that the log is, as a multiset, the union of a
    prefix of each client's request stream (``_request`` drawing from ``random.Random(k)``)."""
    sent = Counter(entry[0] for entry in log)
    counts, prefixes = [], Counter()
    for k in range(clients):
        rng = random.Random(k)
        stream = [_request(rng)[0]["nonce"] for _ in range(len(log) + 1)]
        n = next(i for i, nonce in enumerate(stream) if nonce not in sent)
        counts.append(n)
        prefixes.update(stream[:n])
    assert prefixes == sent
    return counts


def _drive(port: int, make_request, **kwargs) -> dict:
    """common.drive, failing the test rather than hanging it if drive has not returned after 150 s."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(common.drive(port, make_request, **kwargs)), daemon=True)
    thread.start()
    thread.join(150)
    assert not thread.is_alive(), "drive did not return"
    return out


def test_clients_are_spread_over_processes_evenly_in_order() -> None:
    assert common.client_groups(3, 2) == [[0, 1], [2]]
    assert common.client_groups(10, 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert common.client_groups(2, 8) == [[0], [1]]  # no more processes than clients
    assert common.client_groups(5, 1) == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("fault", [None, "drop_last", "wrong_text"])
def test_drive_counts_what_the_server_answered(fault: str | None, processes: int, monkeypatch) -> None:
    """Requests, statuses, latencies, and texts: a reply short of a vector is a mismatch and serves no text; a
    reply with a wrong vector is a mismatch whose texts were served (``texts``) but not matched (``texts_matched``)."""
    latencies: list[int] = []
    percentiles = common.latency_ms
    monkeypatch.setattr(common, "latency_ms", lambda seconds: latencies.append(len(seconds)) or percentiles(seconds))
    wrong: list[int] = []
    switches = {"drop_last": {"drop_last": True}, "wrong_text": {"wrong_text": "text 3"}}.get(fault, {})
    with _stub(busy_text="text 7", wrong=wrong, **switches) as (port, log):
        load = _drive(port, _request, clients=3, seconds=0.5, min_cosine=0.999, processes=processes)
    ok = [(n, answered) for _, n, status, answered in log if status == 200]
    busy = sum(status == 503 for _, _, status, _ in log)
    short = [n for n, answered in ok if answered < n]
    assert load["client_processes"] == processes and load["client_processes_lost"] == 0
    assert min(_per_client(log, 3)) > 0  # clients 0, 1, 2 each sent their own stream, and nothing else was sent
    assert load["requests"] == len(log) == latencies[0] and len(latencies) == 1
    assert load["status"] == {"200": len(ok), "503": busy} and busy > 0
    assert load["errors"] == busy and load["transport_errors"] == 0
    assert load["mismatches"] == len(short) + len(wrong) and (len(short) + len(wrong) > 0) == (fault is not None)
    assert load["problems"] == ({"missing": len(short)} if short else {"mismatch": len(wrong)} if wrong else {})
    assert load["texts"] == sum(n for n, answered in ok if answered == n)
    assert load["texts_matched"] == load["texts"] - sum(wrong)
    assert load["min_cosine_seen"] == pytest.approx(1.0, abs=1e-5) or fault == "wrong_text"
    assert load["client_cpu_per_wall_max"] >= 0 and load["client_cpu_per_wall"] >= 0


def _failing(how: str):
    """``_request``, except that client 1's first request raises, kills its process, or never comes."""
    doomed = random.Random(1).getrandbits(64)

    def request(rng: random.Random) -> common.Request:
        body, expected = _request(rng)
        if body["nonce"] == doomed:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if how == "hang":
                time.sleep(60)
            raise RuntimeError("make_request failed")
        return body, expected

    return request


@pytest.mark.parametrize("processes", [1, 2])
def test_a_client_whose_make_request_raises_is_a_transport_error(processes: int) -> None:
    with _stub() as (port, log):
        load = _drive(port, _failing("raise"), clients=3, seconds=0.5, min_cosine=0.999, processes=processes)
    sent = _per_client(log, 3)
    assert sent[1] == 0 and min(sent[0], sent[2]) > 0
    assert load["requests"] == len(log) and load["status"] == {"200": len(log)}
    assert load["transport_errors"] == load["errors"] == 1 and load["client_processes_lost"] == 0


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_lost_worker_process_counts_its_clients_as_transport_errors(how: str, monkeypatch) -> None:
    monkeypatch.setattr(common, "GRACE_S", 3.0)  # a hung worker is killed 3 s after the window
    with _stub() as (port, log):
        load = _drive(port, _failing(how), clients=3, seconds=0.5, min_cosine=0.999, processes=2)
    sent = _per_client(log, 3)  # the worker of clients 0 and 1 is lost; what client 0 sent is not counted
    assert sent[1] == 0 and sent[2] > 0
    assert load["requests"] == sent[2] and load["status"] == {"200": sent[2]}
    assert load["client_processes"] == 2 and load["client_processes_lost"] == 1
    assert load["transport_errors"] == load["errors"] == 2


def test_long_texts_have_200_to_500_tokens_of_consecutive_sentences(tiny_models) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    rng = np.random.default_rng(0)
    words = ["cat", "river", "mountain", "blue", "quickly", "the", "a", "of", "seventeen", "unbelievable"]
    sentences = [" ".join(rng.choice(words, size=rng.integers(3, 40))) + "." for _ in range(400)]
    sentences.insert(50, " ".join(["word"] * 700))  # longer than 500 tokens by itself: never part of a text

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    texts = serve_gpu.long_texts(sentences, count, 12)
    assert len(texts) == 12
    assert all(200 <= count(t) <= 500 for t in texts), [count(t) for t in texts]
    assert all(sentences[50] not in t for t in texts)
    joined = " ".join(sentences)
    assert all(t in joined for t in texts)  # consecutive sentences


def test_latency_percentiles_match_numpy() -> None:
    seconds = np.random.default_rng(0).exponential(0.05, size=999).tolist()
    ms = np.array(seconds) * 1000
    got = common.latency_ms(seconds)
    assert list(got) == ["p50", "p90", "p99", "max"]
    for (key, value), p in zip(got.items(), (50, 90, 99, 100), strict=True):
        assert value == pytest.approx(np.percentile(ms, p), abs=0.05), key
    # 1..100 ms: numpy's linear interpolation between order statistics, by hand
    assert common.latency_ms([i / 1000 for i in range(1, 101)]) == {"p50": 50.5, "p90": 90.1, "p99": 99.0,
                                                                     "max": 100.0}


def test_default_prompt_is_read_from_the_sentence_transformers_config(tmp_path) -> None:
    assert serve_gpu.default_prompt(tmp_path) == ""
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"default": "Represent: ", "other": "x"}, "default_prompt_name": "default"}))
    assert serve_gpu.default_prompt(tmp_path) == "Represent: "


def test_transformers5_rope_parameters_are_spelled_for_transformers4() -> None:
    smollm2 = {"model_type": "llama", "dtype": "float32", "rope_parameters": {"rope_theta": 100000.0,
                                                                            "rope_type": "default"}}
    assert serve_gpu._transformers4_config(smollm2) == {"model_type": "llama", "torch_dtype": "float32",
                                                        "rope_theta": 100000.0, "rope_scaling": None}
    gemma3 = {"rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0},
                                  "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}}
    assert serve_gpu._transformers4_config(gemma3) == {"rope_theta": 1e6, "rope_local_base_freq": 1e4,
                                                       "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
