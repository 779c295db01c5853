"""`slmembed serve` as a real process on loopback, called with the official openai client, raw HTTP and raw sockets:
results match direct embeddings (token-id inputs those of their text), bad requests get OpenAI-shaped 4xx errors,
concurrent requests share batches, slow clients are cut off without holding a worker, a full queue gets 429 at once and
waits are bounded, the API key guards every path but /health, and SIGTERM finishes the requests in flight. A key, name,
host or port that cannot work is refused in one line before the model loads."""

from __future__ import annotations

import base64
import contextlib
import errno
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
import torch
from openai import AuthenticationError, BadRequestError, NotFoundError, OpenAI, RateLimitError

from slmembed.config import Recipe
from slmembed.endpoint import address
from slmembed.errors import SlmembedError
from slmembed.export import export
from slmembed.loading import load_embedder
from slmembed.serve import Limits
from slmembed.train import train

TEXTS = ["A man is playing a guitar.", "Hi", "Two dogs run across a snowy field near the old barn.", "Ein Satz."]
LONG = "The committee met on Tuesday to discuss the budget for the coming year, and after hours of debate "
SERVER_LIMITS = Limits(max_inputs=8, max_chars=300, max_connections=32, read_timeout=1)  # the `server` fixture's


class Server:
    def __init__(self, proc: subprocess.Popen, host: str, port: int, log: Path) -> None:
        self.proc, self.host, self.port, self.log = proc, host, port, log

    def exchange(self, method: str, path: str, body: bytes | str | dict | None = None,
                 headers: dict | None = None) -> tuple[int, dict, dict | str | None]:
        """One raw HTTP request; returns the status, the headers (lower-case names) and the body (JSON if it is)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        payload = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=payload, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw, got = resp.read(), {k.lower(): v for k, v in resp.getheaders()}
        conn.close()
        return resp.status, got, json.loads(raw or b"null") if "json" in got.get("content-type", "") else raw.decode()

    def request(self, method: str, path: str, body: bytes | str | dict | None = None,
                headers: dict | None = None) -> tuple[int, dict]:
        """One raw HTTP request; returns the status and the JSON body."""
        status, _, data = self.exchange(method, path, body, headers)
        return status, data

    def health(self) -> dict:
        return self.request("GET", "/health")[1]

    def wait_for(self, check, what: str, seconds: float = 60) -> dict:
        """Poll /health until ``check(health)`` holds; return that health."""
        deadline = time.monotonic() + seconds
        while not check(health := self.health()):
            assert time.monotonic() < deadline, f"{what}: not within {seconds} s ({health})"
            time.sleep(0.01)
        return health

    def client(self, key: str = "unused") -> OpenAI:
        return OpenAI(api_key=key, base_url=f"http://{address(self.host, self.port)}/v1", max_retries=0)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def serving(model: str | Path | list[Path], *args: str, env: dict | None = None, log: Path,
            host: str | None = None) -> Iterator[Server]:
    """Start `slmembed serve` (of one model, or a list of runs; on --host ``host`` if given) and wait until /health
    answers; stop it (SIGTERM) afterwards."""
    port = _free_port(host or "127.0.0.1")
    runs = model if isinstance(model, list) else [model] if (Path(model) / "adapter").is_dir() else []
    served = [a for run in runs for a in ("--run", str(run))] if runs else ["--model", str(model)]
    where = ["--host", host] if host else []
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "slmembed", "serve", *served, "--port", str(port), *where,
                                 *args], stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    server = Server(proc, host or "127.0.0.1", port, log)
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


def _train_tiny(tiny_models, data_dir, run: Path, lr: float = 5e-3, **model) -> Path:
    """A short real training run of the tiny Llama."""
    recipe = Recipe()
    recipe.model.name, recipe.model.max_length = str(tiny_models["llama"]), 32
    for key, value in model.items():
        setattr(recipe.model, key, value)
    recipe.data.sources, recipe.data.max_triplets = ["cad_snli"], 64
    recipe.train.batch_size, recipe.train.max_steps, recipe.train.lr, recipe.train.bf16 = 8, 4, lr, False
    train(recipe, run, data_dir=str(data_dir), progress=False)
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_models, data_dir) -> Path:
    return _train_tiny(tiny_models, data_dir, tmp_path_factory.mktemp("serve") / "run")


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory) -> Iterator[Server]:
    """A server for the training run folder, with small limits to test them (SERVER_LIMITS)."""
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with serving(run_dir, "--max-inputs", "8", "--max-chars", "300", "--max-connections", "32", "--read-timeout", "1",
                 log=log) as srv:
        yield srv


@pytest.fixture(scope="module")
def direct(run_dir):
    return load_embedder(None, adapter=run_dir)  # the server's device and dtype defaults


def _cosines(a, b) -> np.ndarray:
    return (np.asarray(a) * np.asarray(b)).sum(1)


INPUT_KINDS = "'input' must be a string, a list of strings, a list of token ids (integers) or a list of token-id lists"
DEEP = b"[" * 10_000 + b"]" * 10_000  # JSON nested 10,000 deep


def test_openai_client_gets_the_direct_embeddings(server, direct) -> None:
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["run"]
    model = client.models.retrieve("run")
    assert (model.id, model.object, model.owned_by) == ("run", "model", "slmembed")
    with pytest.raises(NotFoundError, match="not served here") as missing:
        client.models.retrieve("text-embedding-3-small")
    assert missing.value.code == "model_not_found"
    expected = direct.encode(TEXTS)
    answers = {}
    for fmt in ("float", "base64", None):  # unasked, the client asks for base64 and decodes it itself
        resp = client.embeddings.create(model="run", input=TEXTS, **({"encoding_format": fmt} if fmt else {}))
        assert [d.index for d in resp.data] == [0, 1, 2, 3]
        got = [np.frombuffer(base64.b64decode(d.embedding), "<f4") if fmt == "base64" else d.embedding
               for d in resp.data]
        assert _cosines(got, expected).min() > 0.999
        assert resp.usage.prompt_tokens == sum(len(ids) for ids in direct.tokenize(TEXTS))
        answers[fmt] = np.array(got, dtype=np.float32)
    # The JSON numbers are the float32 vectors' shortest decimal forms: read as float32 they are the same bits.
    np.testing.assert_array_equal(answers["float"].view(np.uint32), answers["base64"].view(np.uint32))
    single = client.embeddings.create(model="run", input=TEXTS[2], user="alice")  # `user` is accepted and ignored
    assert len(single.data) == 1 and _cosines([single.data[0].embedding], expected[2:3])[0] > 0.999
    short = np.array(client.embeddings.create(model="run", input=TEXTS, dimensions=8).data[0].embedding)
    cut = expected[0, :8] / np.linalg.norm(expected[0, :8])
    assert short.shape == (8,) and np.linalg.norm(short) == pytest.approx(1, abs=1e-5) and short @ cut > 0.999
    with pytest.raises(BadRequestError, match="over the limit of 8"):
        client.embeddings.create(model="run", input=["x"] * 9)
    with pytest.raises(NotFoundError, match="not served here") as missing:
        client.embeddings.create(model="gpt-4", input="x")
    assert missing.value.code == "model_not_found"
    assert "Uvicorn running on http://127.0.0.1:" in server.log.read_text()  # loopback by default


def test_token_id_inputs_embed_as_their_text(server, direct) -> None:
    """Token ids as the tokenizer gives them embed exactly as their text does: truncated to the model's length and
    given EOS the same way, and counted the same in usage."""
    client = server.client()
    texts = [*TEXTS, " ".join(["snow"] * 60)]  # the last is over the run's 32 tokens: cut in both forms
    ids = [direct.tokenizer(t)["input_ids"] for t in texts]
    assert len(ids[-1]) > direct.spec.max_length
    by_text, by_ids = (client.embeddings.create(model="run", input=x) for x in (texts, ids))
    got = [d.embedding for d in by_ids.data]
    assert _cosines(got, [d.embedding for d in by_text.data]).min() > 1 - 1e-5
    assert _cosines(got, direct.encode(texts)).min() > 0.999
    tokens = sum(len(row) for row in direct.tokenize(texts))  # EOS included, the last cut to 32
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == tokens
    one_ids, one_text = (client.embeddings.create(model="run", input=x) for x in (ids[2], texts[2]))
    assert len(one_ids.data) == 1  # one list of ids is one input
    assert _cosines([one_ids.data[0].embedding], [one_text.data[0].embedding])[0] > 1 - 1e-5
    assert one_ids.usage.prompt_tokens == len(ids[2]) + 1  # and its EOS


@pytest.mark.parametrize("body, status, param, message", [
    (b'{"model": "run", "input": ["a"', 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "Input should be an object"),
    pytest.param(b'{"model": "run", "input": ' + DEEP + b"}", 400, None, "not valid JSON", id="deep input"),
    pytest.param(b'{"model": "run", "x": ' + DEEP + b', "input": "a"}', 400, None, "not valid JSON", id="deep extra"),
    (b'{"model": "run", "input": "\\ud800"}', 400, None, "not valid JSON"),  # lone surrogates, escaped
    (b'{"model": "run", "input": ["a", "b\\udc00c"]}', 400, None, "not valid JSON"),
    (b'{"model": "run", "input": ["\xed\xa0\x80"]}', 400, None, "not valid JSON"),  # and as UTF-8 bytes
    ({"model": "run"}, 400, "input", "missing required field 'input'"),
    ({"model": "run", "input": 5}, 400, "input", INPUT_KINDS),
    ({"model": "run", "input": [1, "a"]}, 400, "input", INPUT_KINDS),
    ({"model": "run", "input": [[1], 2]}, 400, "input", INPUT_KINDS),
    ({"model": "run", "input": [True, 2]}, 400, "input", INPUT_KINDS),
    ({"model": "run", "input": [[1.5]]}, 400, "input", INPUT_KINDS),
    ({"model": "run", "input": "a", "dimensions": "8"}, 400, "dimensions", "valid integer"),
    ({"model": "run", "input": "a", "dimensions": 0}, 400, "dimensions", "between 1 and 32, got 0"),
    ({"model": "run", "input": "a", "dimensions": 33}, 400, "dimensions", "between 1 and 32, got 33"),
    ({"model": "run", "input": "a", "encoding_format": "hex"}, 400, "encoding_format", "'float' or 'base64'"),
    ({"model": "run", "input": "a", "user": 7}, 400, "user", "valid string"),
    ({"model": "run", "input": []}, 400, "input", "empty list"),
    ({"model": "run", "input": ["a", ""]}, 400, "input", "input[1] is empty"),
    ({"model": "run", "input": [[5], []]}, 400, "input", "input[1] is empty"),
    ({"model": "run", "input": ["a", " \n\t "]}, 400, "input", "input[1] is only whitespace"),
    ({"model": "run", "input": ["a"] * 9}, 400, "input", "9 inputs, over the limit of 8"),
    ({"model": "run", "input": ["a", "b" * 301]}, 400, "input", "input[1] has 301 characters, over the limit of 300"),
    ({"model": "run", "input": [1] * 301}, 400, "input", "input has 301 token ids, over the limit of 300"),
    ({"model": "run", "input": [7, 49152]}, 400, "input",
     "input[1] is 49152, not a token id of this model (0 to 49151)"),
    ({"model": "run", "input": [[7], [5, -1]]}, 400, "input", "input[1][1] is -1, not a token id"),
    ({"model": "nope", "input": "a"}, 404, "model", "not served here"),
])
def test_bad_requests_get_openai_shaped_errors(server, body, status, param, message) -> None:
    got, data = server.request("POST", "/v1/embeddings", body)
    assert got == status, data
    assert set(data) == {"error"} and set(data["error"]) == {"message", "type", "param", "code"}
    assert data["error"]["type"] == "invalid_request_error" and data["error"]["param"] == param
    assert message in data["error"]["message"]
    assert "Traceback" not in server.log.read_text()


def test_oversized_body_unknown_path_and_wrong_method(server) -> None:
    status, headers, data = server.exchange("POST", "/v1/embeddings", b" " * (SERVER_LIMITS.max_body + 1))
    assert status == 413 and "over the limit" in data["error"]["message"] and headers["connection"] == "close"
    assert server.request("GET", "/v1/nothing")[1]["error"]["type"] == "not_found_error"
    status, data = server.request("DELETE", "/v1/embeddings")
    assert status == 405 and "error" in data


def test_head_answers_as_get(server) -> None:
    """HEAD gets GET's status and headers, and no body, on every path: the GET routes, the schema and docs pages,
    an unknown path and a POST-only one."""
    for path in ("/health", "/v1/models", "/v1/models/run", "/openapi.json", "/docs", "/v1/nothing", "/v1/embeddings"):
        status, headers, _ = server.exchange("GET", path)
        head_status, head_headers, body = server.exchange("HEAD", path)
        assert (head_status, head_headers["content-type"]) == (status, headers["content-type"]), path
        assert head_headers["content-length"] == headers["content-length"] and body in (None, ""), path
    assert server.exchange("HEAD", "/health")[0] == 200 and server.exchange("HEAD", "/v1/embeddings")[0] == 405


def test_clients_that_stop_reading_are_dropped(server) -> None:
    """A client that pipelines requests for the schema and never reads the answers: once the server has more for it
    than the sockets hold, and it takes none of that for --read-timeout (1 s), its connection is dropped (reset), not
    held with its answers; other clients are served meanwhile and after."""
    requests = 4000  # 15 MB of answers
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    failed: list[OSError] = []

    def send() -> None:
        try:
            sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * requests)
        except OSError as exc:
            failed.append(exc)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        deadline = time.monotonic() + 30
        while not (failed or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)):
            assert time.monotonic() < deadline, "the connection of a client that does not read was kept"
            assert server.exchange("GET", "/v1/models")[0] == 200
            time.sleep(0.2)
        sock.settimeout(10)
        answers = b""
        with contextlib.suppress(ConnectionResetError):
            while data := sock.recv(1 << 20):
                answers += data
        assert answers.count(b"HTTP/1.1 200 ") < requests
    finally:
        with contextlib.suppress(OSError):  # wakes the sender if it still waits
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        sender.join(10)
    assert server.exchange("GET", "/v1/models")[0] == 200


def test_slow_clients_are_cut_off_and_hold_no_worker(server) -> None:
    """With --read-timeout 1: a client that sends nothing, or its headers a byte at a time (also for its second request
    on a kept-alive connection), is disconnected; one that stalls or dribbles its body gets 408; each about a second
    after it connected or got its first answer, while a normal client is served meanwhile and no slow one has reached
    the queue."""
    head = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n"
    plans = {  # what a client sends at once, then one byte every 0.1 s
        "idle": (b"", b""),
        "slow headers": (b"", head),
        "stalled body": (head + b'{"model": "run", "input": "', b""),
        "slow body": (head + b'{"model": "run", "input": "', b"a" * 40),
        "slow second request": (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", head),
    }
    socks = {name: socket.create_connection(("127.0.0.1", server.port)) for name in plans}
    start = time.monotonic()
    replies, closed, trickled = dict.fromkeys(plans, b""), {}, dict.fromkeys(plans, 0)
    for name, sock in socks.items():
        sock.sendall(plans[name][0])
        sock.setblocking(False)
    for step in range(40):  # 4 s at most
        for name, sock in socks.items():
            if name in closed:
                continue
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                data = None
            except ConnectionResetError:
                data = b""
            if data == b"":
                closed[name] = time.monotonic() - start
            elif data:
                replies[name] += data
            elif trickled[name] < len(plans[name][1]):
                with contextlib.suppress(OSError):  # closed meanwhile: the next recv says so
                    sock.send(plans[name][1][trickled[name] : trickled[name] + 1])
                trickled[name] += 1
        if step == 3:  # meanwhile, another client is served, and the slow ones hold no place in the queue
            status, data = server.request("POST", "/v1/embeddings", {"model": "run", "input": TEXTS})
            assert status == 200 and len(data["data"]) == 4
            assert server.health()["pending"] == server.health()["queued"] == 0
        if len(closed) == len(plans):
            break
        time.sleep(0.1)
    for sock in socks.values():
        sock.close()
    assert set(closed) == set(plans), f"not disconnected within 4 s: {set(plans) - set(closed)}"
    assert all(0.9 < at < 2.5 for at in closed.values()), closed
    assert replies["idle"] == replies["slow headers"] == b""  # the headers never came: nothing to answer
    assert replies["slow second request"].startswith(b"HTTP/1.1 200 ")
    assert replies["slow second request"].count(b"HTTP/1.1 ") == 1
    for name in ("stalled body", "slow body"):
        head, _, body = replies[name].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower(), replies[name]
        assert json.loads(body)["error"]["code"] == "request_timeout"


def test_connection_limit_answers_503_until_idle_connections_are_cut(server) -> None:
    """32 connections that send nothing fill --max-connections 32: a request gets 503 (uvicorn's); the read timeout
    closes them a second after they opened, and requests are served again."""
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(SERVER_LIMITS.max_connections)]
    start = time.monotonic()
    try:
        time.sleep(0.2)  # all accepted
        assert server.exchange("GET", "/v1/models")[0] == 503
        for _ in range(40):  # 4 s at most
            status = server.exchange("GET", "/v1/models")[0]
            if status != 503:
                break
            time.sleep(0.1)
        assert status == 200 and 0.8 < time.monotonic() - start < 4
        for sock in idle:
            sock.settimeout(1)
            assert sock.recv(1) == b""  # closed by the server
    finally:
        for sock in idle:
            sock.close()


def test_concurrent_requests_share_batches_and_keep_their_own_answers(server, direct) -> None:
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'the weather'} and more" for i in range(96)]
    expected = direct.encode(texts)
    before = server.health()
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
    after = server.health()
    assert after["texts"] - before["texts"] == 96
    assert after["batches"] - before["batches"] < 24  # requests were merged into shared encode calls


def test_api_key_guards_every_path_but_health(run_dir, tmp_path) -> None:
    """With $SLMEMBED_API_KEY, every path but /health (the schema, the docs pages and unknown paths too) answers 401
    without `Bearer KEY`; with it the API and the schema work and the docs pages are off. The exported folder is
    given a prompt, as a run trained with one has, so token-id inputs are refused there."""
    exported = tmp_path / "exported"
    export(run_dir, exported)
    saved = json.loads((exported / "embed.json").read_text())
    saved["spec"]["prompt"] = "query: {}"
    (exported / "embed.json").write_text(json.dumps(saved))
    paths = [("GET", "/v1/models", None), ("GET", "/v1/models/exported", None),
             ("POST", "/v1/embeddings", {"model": "exported", "input": "a"}), ("GET", "/openapi.json", None),
             ("GET", "/docs", None), ("GET", "/redoc", None), ("GET", "/v1/nothing", None)]
    with serving(exported, env={"SLMEMBED_API_KEY": "s3cret"}, log=tmp_path / "log") as srv:
        assert srv.request("GET", "/health")[0] == 200
        for method, path, body in paths:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                            {"Authorization": "Basic s3cret"}):
                status, got, data = srv.exchange(method, path, body, headers)
                assert status == 401 and data["error"]["code"] == "invalid_api_key", (path, headers)
                assert got["www-authenticate"] == "Bearer"
        key = {"Authorization": "Bearer s3cret"}
        assert [srv.exchange(*call, key)[0] for call in paths] == [200, 200, 200, 200, 404, 404, 404]
        with pytest.raises(AuthenticationError):
            srv.client("wrong").models.list()
        client = srv.client("s3cret")
        resp = client.embeddings.create(model="exported", input=TEXTS)
        expected = load_embedder(str(exported)).encode(TEXTS)  # with the prompt
        assert _cosines([d.embedding for d in resp.data], expected).min() > 0.999
        with pytest.raises(BadRequestError, match="prompt template"):
            client.embeddings.create(model="exported", input=[[1, 2]])


@pytest.mark.slow
def test_full_queue_gets_429_at_once_and_waits_are_bounded(tmp_path) -> None:
    """SmolLM2 on the CPU, --max-queue 9, --request-timeout 0.5: request A (8 long texts) keeps the worker busy for
    seconds; B (1 text) queues behind it and fills the queue; C gets 429 at once. A and B get 503 at the timeout
    while A's texts are still being encoded; the worker then drops B's text unembedded and the queue is empty again."""
    long_texts = [f"{i}: {LONG * 6}" for i in range(8)]
    args = ("--device", "cpu", "--dtype", "float32", "--max-inputs", "8", "--max-queue", "9",
            "--request-timeout", "0.5")
    with serving("smollm2-135m", *args, log=tmp_path / "log") as srv:
        before = srv.health()
        answers: dict[str, tuple[int, dict, float]] = {}

        def call(name: str, inputs: list[str]) -> None:
            sent = time.monotonic()
            status, data = srv.request("POST", "/v1/embeddings", {"model": "smollm2-135m", "input": inputs})
            answers[name] = status, data, time.monotonic() - sent

        threads = [threading.Thread(target=call, args=args) for args in (("A", long_texts), ("B", ["Hi"]))]
        threads[0].start()
        srv.wait_for(lambda h: h["queued"] == 8, "A accepted")
        threads[1].start()
        srv.wait_for(lambda h: h["queued"] == 9, "B accepted")
        sent = time.monotonic()
        with pytest.raises(RateLimitError) as full:
            srv.client().embeddings.create(model="smollm2-135m", input="Hello")
        assert time.monotonic() - sent < 0.5 and srv.health()["queued"] == 9  # answered at once, A still encoding
        assert (full.value.type, full.value.code) == ("server_overloaded", "queue_full")
        assert full.value.response.headers["retry-after"] == "1"
        for t in threads:
            t.join()
        assert srv.health()["queued"] == 9, "A was encoded within 0.5 s: the test needs a slower encode"
        for name in "AB":
            status, data, took = answers[name]
            assert status == 503 and data["error"]["code"] == "timeout" and 0.5 <= took < 2, answers[name]
        after = srv.wait_for(lambda h: h["queued"] == 0, "the worker finished A")
        assert (after["texts"] - before["texts"], after["batches"] - before["batches"]) == (8, 1)  # B was dropped


@pytest.mark.slow
def test_sigterm_finishes_requests_in_flight(tmp_path) -> None:
    texts = [f"{i}: {LONG * 2}" for i in range(8)]
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


def test_limits_must_be_consistent() -> None:
    with pytest.raises(SlmembedError, match="--max-inputs must be at least 1, got 0"):
        Limits(max_inputs=0)
    with pytest.raises(SlmembedError, match="--read-timeout must be a positive number of seconds, got 0"):
        Limits(read_timeout=0)
    with pytest.raises(SlmembedError, match="--request-timeout must be a positive number of seconds, got inf"):
        Limits(request_timeout=float("inf"))
    with pytest.raises(SlmembedError, match=r"--max-queue \(8\) must be at least --max-inputs \(9\)"):
        Limits(max_inputs=9, max_queue=8)


def test_compact_vectors_match_direct_embeddings_quantized(server, run_dir, direct, tmp_path) -> None:
    """`precision` int8/uint8 (ranges from the server's --calibration embeddings, cut like the vectors when
    `dimensions` is asked) and binary/ubinary are sentence-transformers' vectors of the direct embeddings; without
    calibration int8 gets 400 and binary still works."""
    from sentence_transformers.util.quantization import quantize_embeddings

    calibration = direct.encode([f"calibration text {i} about {w}" for i, w in enumerate(["cats", "rain"] * 20)])
    np.save(tmp_path / "calibration.npy", calibration)
    expected = direct.encode(TEXTS)
    status, body = server.request("POST", "/v1/embeddings", {"model": "run", "input": TEXTS, "precision": "int8"})
    assert status == 400 and "start it with --calibration" in body["error"]["message"]
    status, body = server.request("POST", "/v1/embeddings", {"model": "run", "input": TEXTS, "precision": "ubinary"})
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.uint8)
    assert status == 200 and (np.unpackbits(got, axis=1) == np.unpackbits(quantize_embeddings(expected, "ubinary"),
                                                                          axis=1)).mean() > 0.98
    with serving(run_dir, "--calibration", str(tmp_path / "calibration.npy"), log=tmp_path / "log") as calibrated:
        for precision, dims in (("int8", None), ("uint8", None), ("int8", 8)):
            cut, cal = expected, calibration
            if dims:
                cut, cal = (x[:, :dims] / np.linalg.norm(x[:, :dims], axis=1, keepdims=True)
                            for x in (expected, calibration))
            reference = quantize_embeddings(cut, precision, calibration_embeddings=cal).astype(np.int16)
            request = {"model": "run", "input": TEXTS, "precision": precision, **({"dimensions": dims} if dims else {})}
            status, body = calibrated.request("POST", "/v1/embeddings", request)
            got = np.array([d["embedding"] for d in body["data"]], dtype=np.int16)
            assert status == 200 and got.shape == reference.shape
            assert np.abs(got - reference).max() <= 1 and (got == reference).mean() > 0.9  # buckets, float noise
            status, body = calibrated.request("POST", "/v1/embeddings", {**request, "encoding_format": "base64"})
            raw = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), precision) for d in body["data"]])
            np.testing.assert_array_equal(raw.astype(np.int16), got)
        status, body = calibrated.request("POST", "/v1/embeddings", {"model": "run", "input": "x", "precision": "int4"})
        assert status == 400 and body["error"]["param"] == "precision"


def test_many_adapters_over_one_base_answer_each_under_mixed_load(run_dir, tiny_models, data_dir, tmp_path) -> None:
    """Three runs' adapters served together, at most two held (least recently used unloaded): concurrent requests
    for all three, in a mixed order, each get their own adapter's embeddings (the run's merged model, embedded
    directly), batched per adapter; /models lists them and /health shows the unloads."""
    runs = [run_dir, _train_tiny(tiny_models, data_dir, tmp_path / "hot", lr=5e-2),
            _train_tiny(tiny_models, data_dir, tmp_path / "mean", lr=2e-2, pooling="mean")]
    names = [r.name for r in runs]
    direct = {r.name: load_embedder(None, adapter=r).encode(TEXTS) for r in runs}
    assert min(_cosines(direct["run"], direct["hot"]).min(), _cosines(direct["run"], direct["mean"]).min()) < 0.99
    with serving(runs, "--max-adapters", "2", log=tmp_path / "log") as srv:
        client = srv.client()
        assert [m.id for m in client.models.list().data] == names
        jobs = [(names[(i * 7) % 3], TEXTS[i % 4 :] or TEXTS) for i in range(36)]
        results: list = [None] * len(jobs)

        def ask(i: int) -> None:
            name, texts = jobs[i]
            results[i] = client.embeddings.create(model=name, input=texts, encoding_format="float")

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for (name, texts), resp in zip(jobs, results, strict=True):
            assert resp.model == name
            got = [d.embedding for d in resp.data]
            own = _cosines(got, direct[name][TEXTS.index(texts[0]) :])
            assert own.min() > 0.995  # unmerged LoRA against the merged one
            for other in names:
                if other != name:
                    assert (own > _cosines(got, direct[other][TEXTS.index(texts[0]) :])).all()
        health = srv.health()
        assert health["models"] == names and len(health["adapters_loaded"]) <= 2
        assert health["adapter_unloads"] >= 1  # three adapters through two places
        assert health["adapter_loads"] == health["adapter_unloads"] + len(health["adapters_loaded"])
        assert health["batches"] < len(jobs)  # requests for the same adapter shared batches
        status, body = srv.request("POST", "/v1/embeddings", {"model": "run2", "input": "x"})
        assert status == 404 and "this server serves 'run', 'hot', 'mean'" in body["error"]["message"]


def test_several_models_refuse_one_model_options(run_dir, tmp_path, capsys) -> None:
    from slmembed.cli import main

    for extra, message in ((["--name", "x"], "--name applies to a server of one model"),
                           (["--compile"], "--compile applies to a server of one model"),
                           (["--cuda-graphs", "--device", "auto"], "--cuda-graphs")):
        assert main(["serve", "--run", str(run_dir), "--run", f"other={run_dir}", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert main(["serve", "--run", str(run_dir), "--run", str(run_dir)]) == 2
    assert capsys.readouterr().err == ("slmembed: error: two runs would be served under one name (run, run): name "
                                       "them with --run NAME=RUN\n")


@pytest.fixture
def no_model(monkeypatch):
    """`slmembed serve` run in-process, failing the test if it gets as far as loading the model; no key in the
    environment unless a test sets one."""
    from slmembed import cli

    def loaded(*args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "_served", loaded)
    monkeypatch.delenv("SLMEMBED_API_KEY", raising=False)


def _refusal(capsys, *args: str) -> str:
    """stderr of an in-process `slmembed serve --model smollm2-135m ARGS`, checked to be one line with exit status
    2."""
    from slmembed.cli import main

    try:
        status = main(["serve", "--model", "smollm2-135m", *args])
    except SystemExit as exc:  # argparse's refusals
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2 and len(err.splitlines()) == 1 and err.startswith("slmembed: error: "), err
    return err


@pytest.mark.parametrize("args, env, message", [
    (["--api-key", ""], {}, "--api-key is set but empty: give the key clients must send, or leave it unset"),
    (["--api-key", ""], {"SLMEMBED_API_KEY": "s3cret"}, "--api-key is set but empty"),  # no falling back
    (["--api-key", " \t"], {}, "--api-key is set but blank"),
    ([], {"SLMEMBED_API_KEY": ""}, "$SLMEMBED_API_KEY is set but empty"),
    ([], {"SLMEMBED_API_KEY": "  "}, "$SLMEMBED_API_KEY is set but blank"),
    (["--api-key", "s3cret "], {}, "--api-key has leading or trailing whitespace, which HTTP drops from a header"),
    ([], {"SLMEMBED_API_KEY": "\ts3cret"}, "$SLMEMBED_API_KEY has leading or trailing whitespace"),
    (["--api-key", "s3cr\u00e9t"], {}, "--api-key has a character (at position 5) that cannot be sent in an HTTP"),
    ([], {"SLMEMBED_API_KEY": "s3\ncret"}, "$SLMEMBED_API_KEY has a character (at position 3)"),
])
def test_unusable_api_key_is_refused_before_the_model_loads(no_model, monkeypatch, capsys, args, env,
                                                             message) -> None:
    """A key that is set but could not guard the server (empty, as `--api-key "$KEY"` with KEY unset gives, blank,
    padded, or not sendable in a header) is refused, naming where it came from but not the key."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    err = _refusal(capsys, *args)
    assert message in err and "s3cr" not in err


def test_cuda_graphs_on_the_cpu_are_refused_before_the_model_loads(no_model, capsys) -> None:
    assert _refusal(capsys, "--cuda-graphs", "--device", "cpu") == (
        "slmembed: error: --cuda-graphs records on a GPU; this server is on the cpu: leave --cuda-graphs out\n")


@pytest.mark.parametrize("args, message", [
    (["--name", ""], "argument --name: expected a non-blank name without surrounding whitespace, got ''"),
    (["--name", "  "], "argument --name: expected a non-blank name"),
    (["--name", "run "], "argument --name: expected a non-blank name without surrounding whitespace, got 'run '"),
    (["--host", ""], "--host is empty: give the address to listen on (127.0.0.1, the default, is this machine only"),
    (["--host", " "], "--host is empty"),
    (["--host", "no-such-host.invalid", "--port", "8123"],
     "cannot listen on no-such-host.invalid:8123: the host does not resolve"),
    (["--host", "192.0.2.1", "--port", "8123"],  # TEST-NET-1: no machine's own address
     "cannot listen on 192.0.2.1:8123: cannot assign the address: it is not one of this machine's"),
])
def test_bad_name_or_host_is_refused_before_the_model_loads(no_model, capsys, args, message) -> None:
    assert message in _refusal(capsys, *args)


def test_taken_or_privileged_port_is_refused_before_the_model_loads(no_model, monkeypatch, capsys) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = _refusal(capsys, "--port", str(port))
    assert err == f"slmembed: error: cannot listen on 127.0.0.1:{port}: the port is in use (another server?)\n"

    def denied(sock: socket.socket, where: tuple) -> None:  # as for a user without the privilege
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(socket.socket, "bind", denied)
    err = _refusal(capsys, "--host", "localhost", "--port", "80")
    assert err.startswith("slmembed: error: cannot listen on localhost:80 (")
    assert err.endswith("): permission denied (ports below 1024 need privileges)\n")


def test_port_in_use_exits_2_with_one_line(tmp_path) -> None:
    """As a real process: one line on stderr, nothing from uvicorn, exit status 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "slmembed", "serve", "--model", "smollm2-135m", "--port",
                               str(port)], capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"slmembed: error: cannot listen on 127.0.0.1:{port}: the port is in use (another server?)\n"


def test_ipv6_loopback_serves(run_dir, direct, tmp_path) -> None:
    """--host ::1 listens on IPv6 loopback and says so with the address in brackets."""
    try:
        _free_port("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with serving(run_dir, host="::1", log=tmp_path / "log") as srv:
        resp = srv.client().embeddings.create(model="run", input=TEXTS, encoding_format="float")
        assert _cosines([d.embedding for d in resp.data], direct.encode(TEXTS)).min() > 0.999
        assert f"Uvicorn running on http://[::1]:{srv.port} " in srv.log.read_text()


def test_the_worker_embeds_in_encodes_chunks(direct) -> None:
    """A batch the worker runs the ordinary way is cut as ``encode`` cuts it (``embedder.batching``: on the CPU 64
    texts and 2,048 padded tokens a chunk), not into one chunk of ``max_batch`` texts, with the direct vectors."""
    from slmembed.adapters import Single
    from slmembed.embedder import batching
    from slmembed.serve import Batcher

    texts = [f"text {i} " + "word " * (5 + i % 40) for i in range(150)]
    ids = direct.tokenize(texts)
    cuts = []
    chunks = direct.chunks
    with pytest.MonkeyPatch.context() as patch:
        def cut(ids, tokens, rows=None):
            cuts.append((tokens, rows))
            return chunks(ids, tokens, rows)

        patch.setattr(direct, "chunks", cut)
        got = Batcher(Single(direct, "tiny"), Limits(max_batch=256))._encode("tiny", ids)
    rows, tokens = batching(direct)
    assert cuts == [(tokens, rows)] and (rows, tokens) == (64, 2048)
    assert len(chunks(ids, tokens, rows)) >= 3  # the old cut (256 texts a chunk) made one
    np.testing.assert_allclose(got, direct.encode(texts), atol=1e-5)


def test_cuda_graphs_refuse_a_server_of_several_adapters(run_dir) -> None:
    """A graph holds the weights' addresses, which loading and unloading adapters moves: one model only."""
    from slmembed.adapters import AdapterPool
    from slmembed.serve import create_app

    pool = AdapterPool({"a": run_dir, "b": run_dir})
    with pytest.raises(SlmembedError, match=r"^--cuda-graphs applies to a server of one model"):
        create_app(pool, cuda_graphs=True)


@pytest.mark.parametrize("asked,names,packed,device,wanted", [
    (None, ["m"], True, "cuda", True),  # not asked: on wherever they run
    (None, ["m"], True, "cpu", False),
    (None, ["m"], False, "cuda", False),  # an encoder, or a decoder packing.py does not run
    (None, ["a", "b"], True, "cuda", False),  # adapters: their weights move
    (False, ["m"], True, "cuda", False),  # --no-cuda-graphs
    (True, ["m"], False, "cpu", True),  # --cuda-graphs: as asked (refused later where it cannot run)
])
def test_cuda_graphs_are_on_by_default_wherever_they_run(asked, names, packed, device, wanted) -> None:
    from types import SimpleNamespace

    from slmembed.serve import graphs_wanted

    served = SimpleNamespace(names=names)
    embedder = SimpleNamespace(packed=packed, device=torch.device(device))
    assert graphs_wanted(asked, served, embedder) is wanted


@pytest.mark.parametrize("args, handed", [([], None), (["--compile"], None),
                                          (["--compile", "--no-cuda-graphs"], False)])
def test_compile_leaves_the_graphs_to_their_default(monkeypatch, args: list[str], handed: bool | None) -> None:
    """`serve --compile` hands the server ``cuda_graphs=None`` like a plain `serve` (graphs wherever they run, then
    recording the compiled blocks: 4.0 ms for a lone text on an H100 against 5.5 without compiling), not False."""
    import socket

    from slmembed import cli, serve

    got = {}
    monkeypatch.setattr(cli, "_served", lambda args, model, runs: "served")
    monkeypatch.setattr(serve, "serve", lambda served, sockets, **kwargs: got.update(kwargs, served=served))
    monkeypatch.delenv("SLMEMBED_API_KEY", raising=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    assert cli.main(["serve", "--model", "smollm2-135m", "--port", port, "--device", "cpu", *args]) == 0
    assert got["served"] == "served" and got["cuda_graphs"] is handed


def test_serve_takes_cuda_graphs_and_no_cuda_graphs() -> None:
    from slmembed.cli import parser

    parse = parser().parse_args
    assert parse(["serve", "--model", "m"]).cuda_graphs is None
    assert parse(["serve", "--model", "m", "--cuda-graphs"]).cuda_graphs is True
    assert parse(["serve", "--model", "m", "--no-cuda-graphs"]).cuda_graphs is False
