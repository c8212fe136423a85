"""The model worker as an Open Inference Protocol server (KServe V2 REST + Triton binary).

``create_worker_app(load)`` loads the model once in the lifespan (in a thread, so
``/v2/health/ready`` answers 503 until it is loaded) and micro-batches concurrent requests.
``tritonclient[http]`` works against it unchanged. Errors are ``{"error": "..."}`` with a
4xx status; nothing a client sends produces a 5xx.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from wsi_sampler import __version__
from wsi_sampler.errors import InvalidRequestError, WsiSamplerError
from wsi_sampler.models import Model
from wsi_sampler.worker import MicroBatcher
from wsi_sampler.worker.oip import (
    HEADER_LENGTH,
    decode_infer_request,
    encode_infer_response,
)

from .worker_stats import ModelStats

__all__ = ["create_worker_app"]

logger = logging.getLogger("wsi_sampler.worker")
_MAX_BODY = 1 << 30


class _NotFound(WsiSamplerError, LookupError):
    pass


class _NotReady(WsiSamplerError):
    pass


class _State:
    def __init__(self) -> None:
        self.model: Model | None = None
        self.batcher: MicroBatcher | None = None
        self.load_error: str | None = None
        self.stats: ModelStats | None = None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _card_outputs(model: Model) -> list[dict[str, Any]]:
    return [{"name": o.name, "datatype": "FP32", "shape": [-1, o.width]}
            for o in model.card.outputs]


def _metadata(model: Model) -> dict[str, Any]:
    size = model.card.patch_size_px
    return {
        "name": model.name,
        "versions": [model.card.version],
        "platform": "pytorch_libtorch",
        "inputs": [{"name": "patches", "datatype": "UINT8", "shape": [-1, size, size, 3]}],
        "outputs": _card_outputs(model),
    }


def _config(model: Model) -> dict[str, Any]:
    """Triton's model configuration, carrying our card as a string parameter."""
    size = model.card.patch_size_px
    return {
        "name": model.name,
        "platform": "pytorch_libtorch",
        "max_batch_size": model.card.max_batch,
        "input": [{"name": "patches", "data_type": "TYPE_UINT8", "dims": [size, size, 3]}],
        "output": [{"name": o.name, "data_type": "TYPE_FP32", "dims": [o.width]}
                   for o in model.card.outputs],
        "parameters": {"model_card": {"string_value": model.card.to_json()}},
    }


def create_worker_app(
    load: Callable[[], Model], *, max_delay_s: float = 0.002, title: str = "wsi-sampler worker"
) -> FastAPI:
    """An OIP app serving the model ``load()`` returns (called once, at startup)."""
    state = _State()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_load(state, load, max_delay_s))
        try:
            yield
        finally:
            task.cancel()
            if state.batcher is not None:
                await state.batcher.stop()

    app = FastAPI(title=title, version=__version__, lifespan=lifespan)
    app.state.worker = state
    _install_errors(app)
    _install_routes(app, state)
    return app


async def _load(state: _State, load: Callable[[], Model], max_delay_s: float) -> None:
    try:
        model = await asyncio.to_thread(load)
    except WsiSamplerError as exc:
        state.load_error = str(exc)
        logger.error("model failed to load: %s", exc)
        return
    batcher = MicroBatcher(model.predict, max_batch=model.card.max_batch, max_delay_s=max_delay_s)
    batcher.start()
    state.model, state.batcher = model, batcher
    state.stats = ModelStats(model.name, model.card.version)
    logger.info("model %s ready on %s", model.name, model.device)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(_NotFound)
    async def not_found(_: Request, exc: _NotFound) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(_NotReady)
    async def not_ready(_: Request, exc: _NotReady) -> JSONResponse:
        return _error(503, str(exc))

    @app.exception_handler(InvalidRequestError)
    async def invalid(_: Request, exc: InvalidRequestError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "; ".join(str(e.get("msg")) for e in exc.errors()))


def _model_for(state: _State, name: str, version: str | None) -> Model:
    model = state.model
    if model is None:
        raise _NotReady(state.load_error or "the model is still loading")
    if name != model.name:
        raise _NotFound(f"unknown model {name!r} (serving {model.name!r})")
    if version not in (None, "", model.card.version):
        raise _NotFound(f"model {name!r} has no version {version!r} ({model.card.version})")
    return model


def _install_routes(app: FastAPI, state: _State) -> None:
    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        ok = state.model is not None
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "wsi-sampler", "version": __version__,
                "extensions": ["binary_tensor_data", "model_configuration", "statistics"]}

    @app.get("/v2/models/stats")
    async def all_stats() -> dict[str, Any]:
        return {"model_stats": [state.stats.to_dict()] if state.stats else []}

    @app.post("/v2/repository/index")
    async def repository_index() -> list[dict[str, str]]:
        """Read-only: the one model this worker serves (loading/unloading is not offered)."""
        if state.model is None:
            return []
        return [{"name": state.model.name, "version": state.model.card.version,
                 "state": "READY"}]

    for suffix in ("", "/versions/{version}"):
        _model_routes(app, state, "/v2/models/{name}" + suffix)


def _model_routes(app: FastAPI, state: _State, base: str) -> None:
    @app.get(base)
    async def metadata(name: str, version: str | None = None) -> dict[str, Any]:
        return _metadata(_model_for(state, name, version))

    @app.get(base + "/ready")
    async def model_ready(name: str, version: str | None = None) -> JSONResponse:
        _model_for(state, name, version)
        return JSONResponse({"name": name, "ready": True})

    @app.get(base + "/config")
    async def config(name: str, version: str | None = None) -> dict[str, Any]:
        return _config(_model_for(state, name, version))

    @app.get(base + "/stats")
    async def stats(name: str, version: str | None = None) -> dict[str, Any]:
        _model_for(state, name, version)
        return {"model_stats": [state.stats.to_dict()] if state.stats else []}

    @app.post(base + "/infer")
    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        model = _model_for(state, name, version)
        assert state.batcher is not None
        body = await _read_body(request)
        header_len = _header_length(request)
        req = await asyncio.to_thread(decode_infer_request, body, header_len)
        patches = _patches(model, req.inputs)
        t0 = time.perf_counter_ns()
        try:
            outputs = await state.batcher.submit(patches)
        finally:
            if state.stats is not None:
                state.stats.record(patches=len(patches), ns=time.perf_counter_ns() - t0,
                                   ok=sys.exc_info()[0] is None)
        wanted = req.requested if req.requested is not None else list(outputs)
        unknown = [n for n in wanted if n not in outputs]
        if unknown:
            raise InvalidRequestError(f"unknown output {unknown} (outputs: {list(outputs)})")
        selected = {n: outputs[n] for n in wanted}
        binary = req.binary_outputs if req.requested is not None else req.binary_default
        payload, json_len = encode_infer_response(
            model.name, model.card.version, req.id, selected, binary
        )
        if json_len is None:
            return Response(payload, media_type="application/json")
        return Response(payload, media_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(json_len)})


async def _read_body(request: Request) -> bytes:
    """The body, decompressed when the client sent ``Content-Encoding: gzip|deflate`` (as
    tritonclient's ``request_compression_algorithm`` does); at most _MAX_BODY bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > _MAX_BODY:
        raise InvalidRequestError(f"request body of {declared} bytes exceeds {_MAX_BODY}")
    body = await request.body()
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidRequestError(f"Content-Encoding {encoding!r} is not supported "
                                  "(identity, gzip, deflate)")
    return await asyncio.to_thread(_inflate, body, encoding)


def _inflate(body: bytes, encoding: str) -> bytes:
    # 32 + 15: zlib or gzip header detected automatically; -15: raw deflate streams.
    for wbits in (32 + zlib.MAX_WBITS, -zlib.MAX_WBITS):
        inflater = zlib.decompressobj(wbits)
        try:
            data = inflater.decompress(body, _MAX_BODY + 1)
        except zlib.error:
            continue
        if len(data) > _MAX_BODY or inflater.unconsumed_tail:
            raise InvalidRequestError(f"the {encoding} body inflates past {_MAX_BODY} bytes")
        return data
    raise InvalidRequestError(f"the request body is not valid {encoding} data")


def _header_length(request: Request) -> int | None:
    raw = request.headers.get(HEADER_LENGTH)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise InvalidRequestError(f"{HEADER_LENGTH} must be an integer, got {raw!r}") from None


def _patches(model: Model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    if set(inputs) != {"patches"}:
        raise InvalidRequestError(
            f"model {model.name} takes one input 'patches', got {list(inputs)}"
        )
    patches = inputs["patches"]
    model.check_input(patches)
    if len(patches) > model.card.max_batch:
        raise InvalidRequestError(
            f"batch of {len(patches)} exceeds max_batch_size {model.card.max_batch}; split it"
        )
    return patches
