"""An OpenAI-compatible embeddings API: FastAPI on uvicorn.

``POST /v1/embeddings`` (``input`` a string or a list of strings, ``encoding_format`` float or base64, ``dimensions``
truncates and renormalises), ``GET /v1/models``, ``GET /health``. Requests go into a queue; one worker takes all that
is pending (up to ``max_batch`` texts) and embeds it in one ``encode`` call, so concurrent requests share a batch on
the device. Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``. Requests are bounded
(inputs per request, characters per input, body bytes); with an API key every endpoint but ``/health`` wants
``Authorization: Bearer KEY``. On SIGTERM uvicorn stops accepting connections and finishes the requests in flight
(the worker keeps running until they are answered) before it exits.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException

from slmembed.embedder import Embedder
from slmembed.errors import SlmembedError

log = logging.getLogger("slmembed.serve")


@dataclass(frozen=True)
class Limits:
    """Request bounds; a request beyond one gets a 4xx error."""

    max_inputs: int = 256  # texts per request
    max_chars: int = 16_384  # characters per text (longer texts would be truncated to the model's max length)
    max_batch: int = 256  # texts per encode call, merged across requests

    def __post_init__(self) -> None:
        for name in ("max_inputs", "max_chars", "max_batch"):
            if getattr(self, name) < 1:
                raise SlmembedError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")

    @property
    def max_body(self) -> int:
        """Bytes of request body: every text at its longest, JSON-escaped (at most 6 bytes a character), plus 64 KiB."""
        return self.max_inputs * self.max_chars * 6 + 65_536


class ApiError(Exception):
    """An error answered with OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class EmbeddingRequest(BaseModel):
    """The body of ``POST /v1/embeddings`` (token-id inputs are not accepted)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    input: str | list[str]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class Batcher:
    """One worker that merges pending requests into one ``encode`` call; ``embed`` awaits a request's share."""

    def __init__(self, embedder: Embedder, max_batch: int) -> None:
        self.embedder, self.max_batch = embedder, max_batch
        self.queue: asyncio.Queue[tuple[list[str], asyncio.Future]] = asyncio.Queue()
        self.batches = self.texts = 0  # encode calls and texts so far, for /health
        self.pending = 0  # requests waiting for their vectors

    async def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Unit vectors [len(texts), D] and the number of tokens they took."""
        future = asyncio.get_running_loop().create_future()
        self.pending += 1
        try:
            await self.queue.put((texts, future))
            return await future
        finally:
            self.pending -= 1

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        tokens = [len(ids) for ids in self.embedder.tokenize(texts)]
        return self.embedder.encode(texts, batch_size=self.max_batch), tokens

    async def run(self) -> None:
        carry = None  # a request that did not fit into the last batch opens the next one
        while True:
            pending = [carry or await self.queue.get()]
            carry, size = None, len(pending[0][0])
            while not self.queue.empty():
                item = self.queue.get_nowait()
                if size + len(item[0]) > self.max_batch:
                    carry = item
                    break
                pending.append(item)
                size += len(item[0])
            texts = [t for item, _ in pending for t in item]
            try:
                vectors, tokens = await asyncio.to_thread(self._encode, texts)
            except Exception as exc:  # a failed batch fails its requests, not the server
                log.exception("encode failed")
                for _, future in pending:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches, self.texts = self.batches + 1, self.texts + len(texts)
            start = 0
            for item, future in pending:
                if not future.done():  # the client may have gone away
                    future.set_result((vectors[start : start + len(item)], sum(tokens[start : start + len(item)])))
                start += len(item)


def _encode_vector(vector: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":  # OpenAI's: the little-endian float32 bytes, base64-encoded
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def create_app(embedder: Embedder, model_id: str, limits: Limits = Limits(), api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving ``embedder`` under the name ``model_id``."""
    batcher = Batcher(embedder, limits.max_batch)
    dim = int(embedder.encode(["warm-up"]).shape[1])  # also compiles the first forward before requests arrive
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = asyncio.create_task(batcher.run())
        yield  # uvicorn runs the shutdown only after the requests in flight are answered
        worker.cancel()

    app = FastAPI(title="slmembed", description=__doc__, lifespan=lifespan)

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

    def authorise(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id, "pending": batcher.pending, "batches": batcher.batches,
                "texts": batcher.texts}

    @app.get("/v1/models", dependencies=[Depends(authorise)])
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "slmembed"}]}

    @app.post("/v1/embeddings", dependencies=[Depends(authorise)])
    async def embeddings(request: Request) -> dict:
        req = _parse(await _read_body(request, limits.max_body), limits, model_id, dim)
        texts = [req.input] if isinstance(req.input, str) else req.input
        vectors, tokens = await batcher.embed(texts)
        if req.dimensions is not None and req.dimensions < dim:
            vectors = vectors[:, : req.dimensions]
            vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
        data = [{"object": "embedding", "index": i, "embedding": _encode_vector(v, req.encoding_format)}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": model_id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes, over the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes")
    return bytes(body)


def _parse(body: bytes, limits: Limits, model_id: str, dim: int) -> EmbeddingRequest:
    """Validate a request body against the schema and the limits; raise ApiError (4xx) naming the field."""
    try:
        req = EmbeddingRequest.model_validate_json(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        if err["type"] == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON: {err['msg']}") from None
        param = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("str", "list["))) or None
        if err["type"] == "missing":
            raise ApiError(400, f"missing required field {param!r}", param=param) from None
        if param is None:
            raise ApiError(400, f"the body must be a JSON object: {err['msg']}") from None
        hint = " (a string or a list of strings)" if param.startswith("input") else ""
        raise ApiError(400, f"invalid {param!r}{hint}: {err['msg']}", param=param) from None
    texts = [req.input] if isinstance(req.input, str) else req.input
    if req.model != model_id:
        raise ApiError(404, f"model {req.model!r} is not served here; this server serves {model_id!r}",
                       param="model", code="model_not_found")
    if not texts:
        raise ApiError(400, "'input' is an empty list", param="input")
    if len(texts) > limits.max_inputs:
        raise ApiError(400, f"'input' has {len(texts)} texts, over the limit of {limits.max_inputs}", param="input")
    for i, text in enumerate(texts):
        if not text:
            raise ApiError(400, f"input[{i}] is an empty string", param="input")
        if len(text) > limits.max_chars:
            raise ApiError(400, f"input[{i}] has {len(text)} characters, over the limit of {limits.max_chars}",
                           param="input")
    if req.dimensions is not None and not 1 <= req.dimensions <= dim:
        raise ApiError(400, f"'dimensions' must be between 1 and {dim}, got {req.dimensions}", param="dimensions")
    return req


def serve(embedder: Embedder, model_id: str, host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits(),
          api_key: str | None = None, graceful_timeout: float = 30.0) -> None:
    """Serve until SIGINT/SIGTERM; requests in flight are finished first (for up to ``graceful_timeout`` seconds)."""
    import uvicorn

    app = create_app(embedder, model_id, limits, api_key)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=graceful_timeout)
