"""`slmembed serve` as a real process on loopback, called with the official openai client and with raw HTTP:
results match direct embeddings, bad requests get OpenAI-shaped 4xx errors, concurrent requests share batches, the API
key guards every endpoint but /health, and SIGTERM finishes the requests in flight."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from openai import AuthenticationError, BadRequestError, NotFoundError, OpenAI

from slmembed.config import Recipe
from slmembed.embedder import load_embedder
from slmembed.errors import SlmembedError
from slmembed.export import export
from slmembed.serve import Limits
from slmembed.train import train

TEXTS = ["A man is playing a guitar.", "Hi", "Two dogs run across a snowy field near the old barn.", "Ein Satz."]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log

    def request(self, method: str, path: str, body: bytes | str | dict | None = None,
                headers: dict | None = None) -> tuple[int, dict]:
        """One raw HTTP request; returns the status and the JSON body."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        payload = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=payload, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        status, data = resp.status, json.loads(resp.read() or b"null")
        conn.close()
        return status, data

    def client(self, key: str = "unused") -> OpenAI:
        return OpenAI(api_key=key, base_url=f"http://127.0.0.1:{self.port}/v1", max_retries=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(model: str | Path, *args: str, env: dict | None = None, log: Path) -> Iterator[Server]:
    """Start `slmembed serve` and wait until /health answers; stop it (SIGTERM) afterwards."""
    port = _free_port()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "slmembed", "serve", str(model), "--port", str(port), *args],
                                stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    server = Server(proc, port, log)
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, f"server exited: {log.read_text()[-2000:]}"
            assert time.time() < deadline, "server did not start"
            try:
                if server.request("GET", "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.3)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_models, data_dir) -> Path:
    """A short real training run of the tiny Llama."""
    recipe = Recipe()
    recipe.model.name, recipe.model.max_length = str(tiny_models["llama"]), 32
    recipe.data.sources, recipe.data.max_triplets = ["cad_snli"], 64
    recipe.train.batch_size, recipe.train.max_steps, recipe.train.lr, recipe.train.bf16 = 8, 4, 5e-3, False
    run = tmp_path_factory.mktemp("serve") / "run"
    train(recipe, run, data_dir=str(data_dir), progress=False)
    return run


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory) -> Iterator[Server]:
    """A server for the training run folder, with small limits to test them."""
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with serving(run_dir, "--max-inputs", "8", "--max-chars", "300", log=log) as srv:
        yield srv


@pytest.fixture(scope="module")
def direct(run_dir):
    return load_embedder(None, adapter=run_dir)  # the server's device and dtype defaults


def _cosines(a, b) -> np.ndarray:
    return (np.asarray(a) * np.asarray(b)).sum(1)


def test_openai_client_gets_the_direct_embeddings(server, direct) -> None:
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["run"]
    expected = direct.encode(TEXTS)
    for fmt in ("float", "base64", None):  # unasked, the client asks for base64 and decodes it itself
        resp = client.embeddings.create(model="run", input=TEXTS, **({"encoding_format": fmt} if fmt else {}))
        assert [d.index for d in resp.data] == [0, 1, 2, 3]
        got = [np.frombuffer(base64.b64decode(d.embedding), "<f4") if fmt == "base64" else d.embedding
               for d in resp.data]
        assert _cosines(got, expected).min() > 0.999
        assert resp.usage.prompt_tokens == sum(len(ids) for ids in direct.tokenize(TEXTS))
    single = client.embeddings.create(model="run", input=TEXTS[2])
    assert len(single.data) == 1 and _cosines([single.data[0].embedding], expected[2:3])[0] > 0.999
    short = np.array(client.embeddings.create(model="run", input=TEXTS, dimensions=8).data[0].embedding)
    cut = expected[0, :8] / np.linalg.norm(expected[0, :8])
    assert short.shape == (8,) and np.linalg.norm(short) == pytest.approx(1, abs=1e-5) and short @ cut > 0.999
    with pytest.raises(BadRequestError, match="over the limit of 8"):
        client.embeddings.create(model="run", input=["x"] * 9)
    with pytest.raises(NotFoundError, match="not served here"):
        client.embeddings.create(model="gpt-4", input="x")
    assert "Uvicorn running on http://127.0.0.1:" in server.log.read_text()  # loopback by default


@pytest.mark.parametrize("body, status, param, message", [
    (b'{"model": "run", "input": ["a"', 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "Input should be an object"),
    ({"model": "run"}, 400, "input", "missing required field 'input'"),
    ({"model": "run", "input": 5}, 400, "input", "a string or a list of strings"),
    ({"model": "run", "input": [1, 2]}, 400, "input", "a string or a list of strings"),
    ({"model": "run", "input": "a", "dimensions": "8"}, 400, "dimensions", "valid integer"),
    ({"model": "run", "input": "a", "dimensions": 0}, 400, "dimensions", "between 1 and 32"),
    ({"model": "run", "input": "a", "encoding_format": "hex"}, 400, "encoding_format", "'float' or 'base64'"),
    ({"model": "run", "input": []}, 400, "input", "empty list"),
    ({"model": "run", "input": ["a", ""]}, 400, "input", "input[1] is an empty string"),
    ({"model": "run", "input": ["a"] * 9}, 400, "input", "9 texts, over the limit of 8"),
    ({"model": "run", "input": ["a", "b" * 301]}, 400, "input", "301 characters, over the limit of 300"),
    ({"model": "nope", "input": "a"}, 404, "model", "not served here"),
])
def test_bad_requests_get_openai_shaped_errors(server, body, status, param, message) -> None:
    got, data = server.request("POST", "/v1/embeddings", body)
    assert got == status, data
    assert set(data) == {"error"} and set(data["error"]) == {"message", "type", "param", "code"}
    assert data["error"]["type"] == "invalid_request_error" and data["error"]["param"] == param
    assert message in data["error"]["message"]


def test_oversized_body_unknown_path_and_wrong_method(server) -> None:
    status, data = server.request("POST", "/v1/embeddings", b" " * (8 * 300 * 6 + 65_537))
    assert status == 413 and "over the limit" in data["error"]["message"]
    assert server.request("GET", "/v1/nothing")[1]["error"]["type"] == "not_found_error"
    status, data = server.request("DELETE", "/v1/embeddings")
    assert status == 405 and "error" in data


def test_concurrent_requests_share_batches_and_keep_their_own_answers(server, direct) -> None:
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'the weather'} and more" for i in range(96)]
    expected = direct.encode(texts)
    before = server.request("GET", "/health")[1]
    results: dict[int, list] = {}

    def call(k: int) -> None:
        body = {"model": "run", "input": texts[4 * k : 4 * k + 4]}
        status, data = server.request("POST", "/v1/embeddings", body)
        results[k] = [d["embedding"] for d in data["data"]] if status == 200 else data

    threads = [threading.Thread(target=call, args=(k,)) for k in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(24):  # each reply is its own input's vectors, in order
        assert _cosines(results[k], expected[4 * k : 4 * k + 4]).min() > 0.999
    after = server.request("GET", "/health")[1]
    assert after["texts"] - before["texts"] == 96
    assert after["batches"] - before["batches"] < 24  # requests were merged into shared encode calls


def test_api_key_guards_all_but_health(run_dir, tmp_path) -> None:
    exported = tmp_path / "exported"
    export(run_dir, exported)
    with serving(exported, env={"SLMEMBED_API_KEY": "s3cret"}, log=tmp_path / "log") as srv:
        assert srv.request("GET", "/health")[0] == 200
        for method, path, body in [("GET", "/v1/models", None), ("POST", "/v1/embeddings", {"model": "exported",
                                                                                           "input": "a"})]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                status, data = srv.request(method, path, body, headers)
                assert status == 401 and data["error"]["code"] == "invalid_api_key"
        with pytest.raises(AuthenticationError):
            srv.client("wrong").models.list()
        resp = srv.client("s3cret").embeddings.create(model="exported", input=TEXTS)
        expected = load_embedder(str(exported)).encode(TEXTS)
        assert _cosines([d.embedding for d in resp.data], expected).min() > 0.999


@pytest.mark.slow
def test_sigterm_finishes_requests_in_flight(tmp_path) -> None:
    long_text = "The committee met on Tuesday to discuss the budget for the coming year, and after hours of debate "
    texts = [f"{i}: {long_text * 2}" for i in range(8)]
    with serving("smollm2-135m", log=tmp_path / "log") as srv:
        done: list[tuple[float, int, int]] = []

        def call() -> None:
            status, data = srv.request("POST", "/v1/embeddings", {"model": "smollm2-135m", "input": texts})
            done.append((time.monotonic(), status, len(data.get("data", []))))

        threads = [threading.Thread(target=call) for _ in range(10)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while True:  # every request has reached the server (answered or waiting), and some are waiting
            health = srv.request("GET", "/health")[1]
            if health["pending"] + len(done) == 10 and health["pending"] > 0:
                break
            assert len(done) < 10 and time.monotonic() < deadline, "the requests were answered before SIGTERM"
            time.sleep(0.01)
        signalled = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join()
        # uvicorn shuts down gracefully, then re-raises the signal: the exit status is "killed by SIGTERM"
        assert srv.proc.wait(timeout=120) == -signal.SIGTERM
    assert sorted((status, n) for _, status, n in done) == [(200, 8)] * 10
    assert any(at > signalled for at, _, _ in done), "no request was in flight at SIGTERM"
    log = (tmp_path / "log").read_text()
    assert "Shutting down" in log and "Finished server process" in log and "Traceback" not in log


def test_limits_must_be_positive() -> None:
    with pytest.raises(SlmembedError, match="--max-inputs must be at least 1, got 0"):
        Limits(max_inputs=0)
