"""An OpenAI-compatible embeddings API: FastAPI on uvicorn.

``POST /v1/embeddings`` (``input`` a string, a list of strings, a list of token ids or a list of token-id lists;
``encoding_format`` float or base64; ``dimensions`` truncates and renormalises; ``precision``, an extension:
float32, int8, uint8, binary or ubinary compact vectors as quantize.py defines them, as integer lists or, in base64,
their raw bytes; int8 and uint8 use the ranges of the server's calibration embeddings, cut to ``dimensions`` and
renormalised like the vectors), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health`` (each also as ``HEAD``).
One model, or several LoRA adapters over one base model (adapters.py), each under its own name. A request's texts are
tokenised as it arrives, on a thread of their own, and its token ids go into a queue; one worker takes all that is
pending for one model (up to ``max_batch`` inputs) and embeds it in one call, so concurrent requests share a batch on
the device while the next requests are tokenised. Answers are written by orjson straight from the arrays. Errors have
OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.

Bounds: inputs per request, characters (or token ids) per input and body bytes (400/413); inputs queued for the worker
(429 beyond it, at once); the time a request may wait for its embeddings (503); the time a client has to send a
request's headers (the connection is closed) and then its body (408), and the longest it may take none of its answer
(the connection is dropped); open connections (503). With an API key every path but ``/health`` wants
``Authorization: Bearer KEY``. On SIGTERM uvicorn stops accepting connections and finishes the requests in flight (the
worker keeps running until they are answered) before it exits.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import logging
import math
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import orjson
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from slmembed import endpoint, quantize
from slmembed.adapters import AdapterPool, Single
from slmembed.cuda_graphs import GraphedEncoder
from slmembed.data.texts import text_problem
from slmembed.embedder import Embedder, batching
from slmembed.errors import SlmembedError

log = logging.getLogger("slmembed.serve")

Input = str | list[int]  # a text, or its token ids
Served = Single | AdapterPool  # what a server serves (adapters.py)
Queued = tuple[str, list[list[int]], asyncio.Future]  # a request waiting for the worker: model, token ids, its answer


@dataclass(frozen=True)
class Limits:
    """Request bounds; a request beyond one gets an error (see the module docstring)."""

    max_inputs: int = 256  # inputs per request
    max_chars: int = 16_384  # characters per text, or ids per token-id list (longer inputs are truncated anyway)
    max_batch: int = 256  # inputs per encode call, merged across requests
    max_queue: int = 1024  # inputs accepted and not yet embedded (waiting or being encoded); beyond it, 429
    max_connections: int = 256  # open connections (uvicorn's limit_concurrency); beyond it, 503
    read_timeout: float = 30.0  # seconds to send a request's headers (from connecting or the last response), then body,
    # and the longest a client may take none of its answer
    request_timeout: float = 60.0  # seconds a request may wait for its embeddings; then 503

    def __post_init__(self) -> None:
        for name in ("max_inputs", "max_chars", "max_batch", "max_queue", "max_connections"):
            if getattr(self, name) < 1:
                raise SlmembedError(f"{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("read_timeout", "request_timeout"):
            if not 0 < getattr(self, name) < math.inf:
                raise SlmembedError(f"{_flag(name)} must be a positive number of seconds, got {getattr(self, name)}")
        if self.max_queue < self.max_inputs:  # a full request could never be accepted
            raise SlmembedError(f"--max-queue ({self.max_queue}) must be at least --max-inputs ({self.max_inputs})")

    @property
    def max_body(self) -> int:
        """Bytes of request body: every input at its longest, at 8 bytes a unit (a JSON-escaped character takes at
        most 6, a token id with its separator at most 8), plus 64 KiB."""
        return self.max_inputs * self.max_chars * 8 + 65_536


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


class ApiError(Exception):
    """An error answered with OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


CLOSE = {"Connection": "close"}  # for answers given before the body was read: the rest of it is not waited for
RETRY = {"Retry-After": "1"}


class EmbeddingRequest(BaseModel):
    """The body of ``POST /v1/embeddings``."""

    model_config = ConfigDict(strict=True, extra="ignore")
    input: str | list[str] | list[int] | list[list[int]]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    precision: Literal["float32", "int8", "uint8", "binary", "ubinary"] = "float32"  # slmembed's extension
    user: str | None = None  # OpenAI's end-user id for abuse monitoring: accepted, ignored

    @property
    def inputs(self) -> list[Input]:
        """The inputs as a list: a string or one list of token ids is one input."""
        single = isinstance(self.input, str) or (bool(self.input) and isinstance(self.input[0], int))
        return [self.input] if single else self.input  # type: ignore[list-item, return-value]


class Batcher:
    """One worker that merges pending requests for the same model into one encode call (the oldest request's model
    goes first); ``embed`` tokenises a request on the tokenising thread and awaits its share."""

    def __init__(self, served: Served, limits: Limits, graphed: GraphedEncoder | None = None) -> None:
        self.served, self.limits, self.graphed = served, limits, graphed
        self.queue: asyncio.Queue[Queued] = asyncio.Queue()
        # One thread, apart from the encoding worker's, so that the device is not kept waiting on the tokenizer; one
        # only, because a fast tokenizer's truncation settings are set on it for each call (embedder._fast_tokenize).
        self.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="slmembed-tokenize")
        self.batches = self.texts = 0  # encode calls and inputs embedded so far, for /health
        self.pending = 0  # requests waiting for their vectors
        self.queued = 0  # inputs accepted and not yet embedded or dropped, at most limits.max_queue

    async def embed(self, name: str, inputs: list[Input]) -> tuple[np.ndarray, int]:
        """Unit vectors [len(inputs), D] from model ``name`` and the number of tokens they took; ApiError 429 if the
        queue is full, 503 if they take longer than the request timeout."""
        if self.queued + len(inputs) > self.limits.max_queue:
            raise ApiError(429, f"the server is overloaded ({self.queued} inputs queued, at most "
                           f"{self.limits.max_queue}); try again later", code="queue_full", kind="server_overloaded",
                           headers=RETRY)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.queued += len(inputs)
        self.pending += 1
        try:  # on timeout the future is cancelled: the worker drops the inputs if it has not started on them
            async with asyncio.timeout(self.limits.request_timeout):
                try:
                    ids = await loop.run_in_executor(self.tokenizing, self._ids, name, inputs)
                except BaseException:
                    self.queued -= len(inputs)
                    raise
                self.queue.put_nowait((name, ids, future))
                return await future
        except TimeoutError:
            raise ApiError(503, f"no embeddings within {self.limits.request_timeout:g} s: the server is overloaded; "
                           "try again later", code="timeout", kind="server_error", headers=RETRY) from None
        finally:
            self.pending -= 1

    def _ids(self, name: str, inputs: list[Input]) -> list[list[int]]:
        """Token ids of ``inputs``: texts tokenised as ``Embedder.encode`` does; token ids truncated and given EOS the
        same way."""
        embedder = self.served.embedder(name, active=False)  # the worker may be running another adapter meanwhile
        texts = [x for x in inputs if isinstance(x, str)]
        tokenized = iter(embedder.tokenize(texts) if texts else [])
        eos = [] if embedder.eos is None else [embedder.eos]
        room = embedder.spec.max_length - len(eos)
        return [next(tokenized) if isinstance(x, str) else x[:room] + eos for x in inputs]

    def _encode(self, name: str, ids: list[list[int]]) -> np.ndarray:
        embedder = self.served.embedder(name)
        with torch.inference_mode():
            vectors = self.graphed(ids) if self.graphed else None  # None: larger than a recorded batch
            if vectors is None:
                # In encode's chunks (``batching``): on a CPU, long texts padded into one chunk of 65k tokens took
                # 1.25x as long as in chunks of 2k (bench/NOTES.md).
                rows, tokens = batching(embedder)
                vectors = embedder.forward_ids(ids, max_tokens=tokens, max_rows=rows)
        return vectors.cpu().numpy()

    def _dropped(self, item: Queued) -> bool:
        """Whether a queued request timed out; its inputs then leave the queue unembedded."""
        if item[2].done():
            self.queued -= len(item[1])
        return item[2].done()

    async def run(self) -> None:
        backlog: list[Queued] = []  # taken from the queue, oldest first
        while True:
            if not backlog:
                backlog.append(await self.queue.get())
            while not self.queue.empty():
                backlog.append(self.queue.get_nowait())
            backlog = [item for item in backlog if not self._dropped(item)]
            if not backlog:
                continue
            # The oldest request's model, with its later requests while they fit; the others wait in order.
            name, pending, rest, size = backlog[0][0], [], [], 0
            for item in backlog:
                if item[0] == name and (not pending or size + len(item[1]) <= self.limits.max_batch):
                    pending.append(item)
                    size += len(item[1])
                else:
                    rest.append(item)
            backlog = rest
            ids = [x for _, item, _ in pending for x in item]
            try:
                vectors = await asyncio.to_thread(self._encode, name, ids)
            except Exception as exc:  # a failed batch fails its requests, not the server
                log.exception("encode failed")
                for _, _, future in pending:
                    if not future.done():
                        future.set_exception(exc)
                continue
            finally:
                self.queued -= size
            self.batches, self.texts = self.batches + 1, self.texts + len(ids)
            start = 0
            for _, item, future in pending:
                if not future.done():  # the request may have timed out
                    future.set_result((vectors[start : start + len(item)], sum(len(row) for row in item)))
                start += len(item)


def _encode_vector(vector: np.ndarray, fmt: str) -> np.ndarray | str:
    """A vector as the answer carries it: base64 of its bytes, or the array itself, which orjson writes as a JSON list
    (float32 at the shortest digits that read back to the same float32)."""
    if fmt == "base64":  # OpenAI's: the little-endian float32 bytes (or the int8/uint8 bytes), base64-encoded
        raw = vector.astype("<f4") if vector.dtype == np.float32 else vector
        return base64.b64encode(raw.tobytes()).decode("ascii")
    return np.ascontiguousarray(vector)


class KeyGuard:
    """ASGI middleware: 401 for every HTTP request but ``/health`` without ``Authorization: Bearer KEY``, before
    routing, so unknown paths and the generated schema are guarded too."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                error = ApiError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                                 code="invalid_api_key", headers={**CLOSE, "WWW-Authenticate": "Bearer"})
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class HeadAsGet:
    """ASGI middleware: ``HEAD`` is answered as ``GET`` on every path (uvicorn sends the headers, not the body)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


def graphs_wanted(asked: bool | None, served: Served, embedder: Embedder) -> bool:
    """Whether to serve through CUDA graphs: as ``asked``, or, not asked (None), wherever they run: one model,
    packed (packing.py), on a GPU."""
    if asked is not None:
        return asked
    return len(served.names) == 1 and embedder.packed and embedder.device.type == "cuda"


def create_app(served: Served, limits: Limits = Limits(), api_key: str | None = None,
               calibration: np.ndarray | None = None, cuda_graphs: bool | None = None) -> FastAPI:
    """The FastAPI app serving ``served``'s models (adapters.py: one model, or adapters over one base) under their
    names; ``calibration`` (embeddings [N, D], one model only) gives int8 and uint8 requests their ranges;
    ``cuda_graphs`` (one model only) replays batches of up to ``limits.max_batch`` inputs as CUDA graphs
    (cuda_graphs.GraphedEncoder; compiled blocks, if compiled, are recorded in them); None: wherever they run (one
    model, packed, on a GPU), for a lone short text in 5.5 ms against 45 without them on an H100, 4.0 ms with
    compiled blocks (bench/NOTES.md)."""
    embedder = served.embedder(served.names[0])
    asked, cuda_graphs = cuda_graphs, graphs_wanted(cuda_graphs, served, embedder)
    if cuda_graphs and len(served.names) > 1:
        raise SlmembedError("--cuda-graphs applies to a server of one model (a graph holds its weights' addresses, "
                            "which loading and unloading adapters moves)")
    graphed = GraphedEncoder(embedder, max_rows=limits.max_batch) if cuda_graphs else None
    dim = int(embedder.encode(["warm-up"]).shape[1])  # also compiles the first forward before requests arrive
    if graphed is not None:
        try:
            with torch.inference_mode():
                graphed(embedder.tokenize(["warm-up"]))  # a lone short text's graph, recorded before requests arrive
        except Exception as exc:  # graphs by default only: a model whose forward does not record is served eagerly
            if asked:
                raise
            log.warning("serving without CUDA graphs: recording one failed (%s: %s)", type(exc).__name__, exc)
            graphed = None
    batcher = Batcher(served, limits, graphed)
    if calibration is not None and (calibration.shape[1] != dim or len(served.names) > 1):
        raise SlmembedError(f"the calibration embeddings have {calibration.shape[1]} dimensions, the model {dim}"
                            if len(served.names) == 1 else "--calibration applies to a server of one model")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = asyncio.create_task(batcher.run())
        yield  # uvicorn runs the shutdown only after the requests in flight are answered
        worker.cancel()
        batcher.tokenizing.shutdown(wait=False)

    # With a key, the browser pages are off (they cannot send it); the schema stays, behind the key.
    docs = {"docs_url": None, "redoc_url": None} if api_key else {}
    app = FastAPI(title="slmembed", description=__doc__, lifespan=lifespan, **docs)
    app.add_middleware(HeadAsGet)
    if api_key:
        app.add_middleware(KeyGuard, api_key=api_key)
    _add_error_handlers(app)
    _add_model_routes(app, served, batcher)
    _add_embeddings_route(app, served, batcher, limits, Answers(dim, embedder.vocab_size, calibration))
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: ours, FastAPI's (404, 405, ...) and, logged, any failure (500)."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), kind=kind).response()

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return ApiError(500, "the server failed to embed the input", kind="server_error").response()


def _add_model_routes(app: FastAPI, served: Served, batcher: Batcher) -> None:
    """``GET /health``, ``GET /v1/models`` and ``GET /v1/models/{id}``."""
    created = int(time.time())
    cards = {name: {"id": name, "object": "model", "created": created, "owned_by": "slmembed"}
             for name in served.names}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": served.names[0], "models": served.names, "pending": batcher.pending,
                "queued": batcher.queued, "batches": batcher.batches, "texts": batcher.texts, **served.stats()}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": list(cards.values())}

    @app.get("/v1/models/{name:path}")  # model ids may contain '/' (hub names)
    async def get_model(name: str) -> dict:
        if name not in cards:
            raise _not_served(name, served.names)
        return cards[name]


@dataclass
class Answers:
    """What ``POST /v1/embeddings`` answers with needs of the model: its embedding size and vocabulary, and the
    calibration embeddings with the int8/uint8 ranges cut from them per requested size, computed once each."""

    dim: int
    vocab: int
    calibration: np.ndarray | None
    bounds: dict[int, np.ndarray] = field(default_factory=dict)

    async def vectors(self, req: EmbeddingRequest, vectors: np.ndarray) -> np.ndarray:
        """``vectors`` as ``req`` asks for them: cut to its ``dimensions``, at its ``precision``."""
        dims = req.dimensions or self.dim
        if dims < self.dim:
            vectors = quantize.prefix(vectors, dims)
        if req.precision in quantize.CALIBRATED and dims not in self.bounds:
            self.bounds[dims] = quantize.ranges(quantize.prefix(self.calibration, dims))
        if req.precision != "float32":  # off the event loop: the first call imports sentence-transformers
            vectors = await asyncio.to_thread(quantize.quantize, vectors, req.precision, self.bounds.get(dims))
        return vectors


def _add_embeddings_route(app: FastAPI, served: Served, batcher: Batcher, limits: Limits, answers: Answers) -> None:
    """``POST /v1/embeddings``."""

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        try:
            body = await asyncio.wait_for(_read_body(request, limits.max_body), limits.read_timeout)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {limits.read_timeout:g} s",
                           code="request_timeout", headers=CLOSE) from None
        req = _parse(body, limits, served, answers.dim, answers.vocab)
        if req.precision in quantize.CALIBRATED and answers.calibration is None:
            raise ApiError(400, f"precision {req.precision!r} needs calibration ranges, and this server has none: "
                           "start it with --calibration", param="precision")
        vectors, tokens = await batcher.embed(req.model, req.inputs)
        vectors = await answers.vectors(req, vectors)
        data = [{"object": "embedding", "index": i, "embedding": _encode_vector(v, req.encoding_format)}
                for i, v in enumerate(vectors)]
        # orjson writes the arrays directly: FastAPI's encoder walks every float in Python (2-4 ms for four vectors of
        # 640, against 0.07 ms), which bounds the requests a second one event loop can answer.
        return Response(orjson.dumps({"object": "list", "data": data, "model": req.model,
                                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
                                     option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def _not_served(name: str, names: list[str]) -> ApiError:
    served = ", ".join(repr(n) for n in names)
    return ApiError(404, f"model {name!r} is not served here; this server serves {served}", param="model",
                    code="model_not_found")


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes, over the limit of {limit}", headers=CLOSE)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"request body is over the limit of {limit} bytes", headers=CLOSE)
    except ClientDisconnect:  # nobody to answer; not a server error worth a traceback
        raise ApiError(400, "the client closed the connection before sending the whole body") from None
    return bytes(body)


def _parse(body: bytes, limits: Limits, served: Served, dim: int, vocab: int) -> EmbeddingRequest:
    """Validate a request body against the schema and the limits; raise ApiError (4xx) naming the field. Token-id
    inputs are refused for a model that wraps its inputs in a prompt."""
    try:
        req = EmbeddingRequest.model_validate_json(body)
    except ValidationError as exc:
        raise _invalid(exc) from None
    if req.model not in served.names:
        raise _not_served(req.model, served.names)
    _check_inputs(req, limits, vocab, token_ids=served.spec(req.model).prompt is None)
    if req.dimensions is not None and not 1 <= req.dimensions <= dim:
        raise ApiError(400, f"'dimensions' must be between 1 and {dim}, got {req.dimensions}", param="dimensions")
    return req


def _invalid(exc: ValidationError) -> ApiError:
    """The 400 for a body that does not fit the schema, naming its first problem."""
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {err['msg']}")
    param = str(err["loc"][0]) if err["loc"] else None
    if err["type"] == "missing":
        return ApiError(400, f"missing required field {param!r}", param=param)
    if param is None:
        return ApiError(400, f"the body must be a JSON object: {err['msg']}")
    if param == "input":  # the union's own errors (one per alternative) would not help
        return ApiError(400, "'input' must be a string, a list of strings, a list of token ids (integers) or a "
                        "list of token-id lists", param=param)
    return ApiError(400, f"invalid {param!r}: {err['msg']}", param=param)


def _check_inputs(req: EmbeddingRequest, limits: Limits, vocab: int, token_ids: bool) -> None:
    """Refuse (400) an empty or too long ``input``, an input that is not a text as slmembed takes texts, or too
    long, or token ids outside the vocabulary or, unless ``token_ids``, at all."""
    inputs = req.inputs
    if not inputs:
        raise ApiError(400, "'input' is an empty list", param="input")
    if len(inputs) > limits.max_inputs:
        raise ApiError(400, f"'input' has {len(inputs)} inputs, over the limit of {limits.max_inputs}", param="input")
    flat = isinstance(req.input, list) and isinstance(req.input[0], int)  # one list of token ids
    for i, item in enumerate(inputs):
        where = "input" if flat else f"input[{i}]"
        unit = "characters" if isinstance(item, str) else "token ids"
        problem = text_problem(item) if isinstance(item, str) else None if item else "is empty"
        if problem:
            raise ApiError(400, f"{where} {problem}", param="input")
        if len(item) > limits.max_chars:
            raise ApiError(400, f"{where} has {len(item)} {unit}, over the limit of {limits.max_chars}",
                           param="input")
        if isinstance(item, list):
            if not token_ids:
                raise ApiError(400, "this model wraps each input in a prompt template, which token ids cannot be: "
                               "send text", param="input")
            if min(item) < 0 or max(item) >= vocab:
                j = next(j for j, t in enumerate(item) if not 0 <= t < vocab)
                raise ApiError(400, f"{where}[{j}] is {item[j]}, not a token id of this model (0 to {vocab - 1})",
                               param="input")


def _protocol(read_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection that has not sent a request's headers within ``read_timeout``
    seconds of opening or of its last response, and dropping one whose client has taken none of what waits to be sent
    to it for that long. uvicorn's own keep-alive timer is reset by every byte, and asyncio waits for ever for a client
    to read, so without this a client sending a byte now and then, or never reading, would hold its connection for
    ever. A request being answered is otherwise left alone: the app bounds the time to read its body and to embed it."""

    class Protocol(H11Protocol):
        deadline: asyncio.TimerHandle | None = None  # for the next request's headers
        stall: asyncio.TimerHandle | None = None  # for the client to take some of what waits to be sent

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            transport.set_write_buffer_limits(high=0)  # writing pauses (and is watched) while any byte waits
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            for timer in (self.deadline, self.stall):
                if timer is not None:
                    timer.cancel()
            super().connection_lost(exc)

        def pause_writing(self) -> None:
            super().pause_writing()
            self._watch(None)

        def resume_writing(self) -> None:
            if self.stall is not None:
                self.stall.cancel()
            super().resume_writing()

        def _watch(self, waiting: int | None) -> None:
            """Drop the connection if none of the ``waiting`` bytes were taken since the last look."""
            left = self.transport.get_write_buffer_size()
            if waiting is not None and left >= waiting:
                self.transport.abort()
            else:
                self.stall = self.loop.call_later(read_timeout, self._watch, left)

        def _arm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
            self.deadline = self.loop.call_later(read_timeout, self._expire)

        def _expire(self) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()

    return Protocol


def serve(served: Served, sockets: list[socket.socket], limits: Limits = Limits(), api_key: str | None = None,
          graceful_timeout: float = 30.0, calibration: np.ndarray | None = None,
          cuda_graphs: bool | None = None) -> None:
    """Serve on ``sockets`` (``endpoint.listening``'s) until SIGINT/SIGTERM; requests in flight are finished first
    (for up to ``graceful_timeout`` seconds)."""
    import uvicorn

    app = create_app(served, limits, api_key, calibration, cuda_graphs)
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=graceful_timeout,
                            limit_concurrency=limits.max_connections, http=_protocol(limits.read_timeout))
    urls = ", ".join(f"http://{endpoint.address(*sock.getsockname()[:2])}" for sock in sockets)
    logging.getLogger("uvicorn.error").info("Uvicorn running on %s (Press CTRL+C to quit)", urls)  # as uvicorn says it
    with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run: re-raised after a Ctrl+C has stopped the server
        uvicorn.Server(config).run(sockets=sockets)
