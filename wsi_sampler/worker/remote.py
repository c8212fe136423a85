"""A client for any Open Inference Protocol server: ours, Triton, KServe, OpenVINO.

Tensor names, patch size and max batch come from the server (model metadata and, where the
server has it, Triton's model configuration), never from constants here. Inference is a
pure function of its input, so failed calls are retried with exponential backoff.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
import numpy as np
import numpy.typing as npt

from ..errors import InvalidRequestError, WorkerError, WorkerUnavailableError
from ..models import ModelCard, Normalization, OutputSpec, Predictions
from ..redact import public_url, upstream_reason
from .oip import HEADER_LENGTH, decode_infer_response, encode_infer_request

__all__ = ["RemoteWorker"]

T = TypeVar("T")
_RETRY_STATUS = {429, 502, 503, 504}
_DEFAULT_MAX_BATCH = 32


log = logging.getLogger(__name__)


class RemoteWorker:
    """Run a model on a remote Open Inference Protocol server.

    ``binary=None`` (default) uses Triton's binary tensor extension when the server lists it
    in ``GET /v2`` (Triton, our worker) and plain JSON otherwise (MLServer, KServe's Python
    server); ``True`` / ``False`` force either. ``target_mpp`` is needed only for servers that
    do not publish our model card in their model configuration (Triton, KServe).
    """

    def __init__(
        self, url: str, model: str, *, version: str | None = None, binary: bool | None = None,
        timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 0.2,
        target_mpp: float | None = None, patch_size_px: int | None = None,
        client: httpx.Client | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise InvalidRequestError(f"worker URL must start with http:// or https://: {url!r}")
        self.url = url.rstrip("/")
        # Answers never name our upstream; the log does (without user info or query).
        self.public_url = public_url(self.url)
        self.model = model
        self.retries = max(0, retries)
        self.backoff_s = backoff_s
        base = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
        self._base = base
        self._http = client or httpx.Client(base_url=self.url, timeout=timeout_s)
        self._owns_client = client is None
        try:
            self._wait_ready()
            self.binary = self._offers_binary() if binary is None else binary
            meta = self._get_json(base)
            config = self._get_json(f"{base}/config", missing_ok=True)
        except BaseException:
            self.close()
            raise
        self.input_name, self.card = self._describe(meta, config, target_mpp, patch_size_px)
        self.max_batch = self.card.max_batch

    # -- discovery ----------------------------------------------------------------------------
    def _offers_binary(self) -> bool:
        server = self._get_json("/v2", missing_ok=True) or {}
        return "binary_tensor_data" in (server.get("extensions") or [])

    def _describe(
        self, meta: dict[str, Any], config: dict[str, Any] | None, target_mpp: float | None,
        patch_size_px: int | None = None,
    ) -> tuple[str, ModelCard]:
        inputs = meta.get("inputs") or []
        if len(inputs) != 1 or inputs[0].get("datatype") != "UINT8":
            raise WorkerError(
                f"the model worker's {self._base}: expected one UINT8 input (N, H, W, 3), "
                f"the server lists {[(i.get('name'), i.get('datatype')) for i in inputs]}"
            )
        shape = list(inputs[0].get("shape") or [])
        if len(shape) == 4 and shape[1] == shape[2] == -1 and patch_size_px:
            shape[1] = shape[2] = patch_size_px  # a dynamic-size input: the caller says
        if len(shape) != 4 or shape[-1] != 3 or shape[1] != shape[2] or shape[1] < 1:
            raise WorkerError(
                f"the model worker's {self._base}: input shape {shape} is not (N, H, H, 3); for a "
                "dynamic size pass patch_size_px (--worker-patch-size)")
        params = (config or {}).get("parameters") or {}
        card_json = (params.get("model_card") or {}).get("string_value")
        if card_json:
            return str(inputs[0]["name"]), ModelCard.model_validate(json.loads(card_json))
        if target_mpp is None:
            raise WorkerError(
                f"the model worker's {self._base} publishes no model card; pass target_mpp "
                "(the µm/px the model expects: --worker-target-mpp, worker_target_mpp)"
            )
        max_batch = int((config or {}).get("max_batch_size") or _DEFAULT_MAX_BATCH)
        outputs = tuple(
            OutputSpec(name=o["name"], dim=int(o["shape"][-1])) for o in meta.get("outputs") or []
        )
        card = ModelCard(
            name=self.model, architecture="remote", patch_size_px=int(shape[1]),
            target_mpp=target_mpp, normalization=Normalization(), outputs=outputs,
            max_batch=max(1, max_batch),
        )
        return str(inputs[0]["name"]), card

    # -- HTTP with retries --------------------------------------------------------------------
    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return call()
            except (httpx.TransportError, _Retry) as exc:
                if attempt == self.retries:
                    log.warning("model worker %s: %s failed after %d attempts (%s)",
                                self.public_url, what, attempt + 1, type(exc).__name__)
                    raise WorkerUnavailableError(
                        f"the model worker: {what} failed after {attempt + 1} attempts "
                        f"({upstream_reason(str(exc)) or type(exc).__name__})"
                    ) from exc
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _check(self, resp: httpx.Response) -> httpx.Response:
        if resp.status_code in _RETRY_STATUS:
            raise _Retry(f"HTTP {resp.status_code}")
        if resp.status_code >= 400:
            try:
                message = resp.json().get("error") or resp.text
            except (ValueError, AttributeError):
                message = resp.text
            reason = upstream_reason(str(message))
            log.warning("model worker %s answered HTTP %d: %s", self.public_url,
                        resp.status_code, reason)
            raise WorkerError(
                f"the model worker refused the request (HTTP {resp.status_code}): {reason}",
                status=resp.status_code,
            )
        return resp

    def _wait_ready(self) -> None:
        path = f"{self._base}/ready"
        self._retrying("readiness check", lambda: self._check(self._http.get(path)))

    def _get_json(self, path: str, *, missing_ok: bool = False) -> Any:
        def call() -> Any:
            resp = self._http.get(path)
            if missing_ok and resp.status_code in (400, 404):
                return None
            return self._check(resp).json()

        return self._retrying(f"GET {path}", call)

    # -- inference ----------------------------------------------------------------------------
    def infer(self, patches: npt.NDArray[np.uint8]) -> Predictions:
        size = self.card.patch_size_px
        if patches.dtype != np.uint8 or patches.shape[1:] != (size, size, 3):
            raise InvalidRequestError(
                f"model {self.model} takes (N, {size}, {size}, 3) uint8, got "
                f"{patches.shape} {patches.dtype}"
            )
        parts = [self._infer_chunk(patches[i : i + self.max_batch])
                 for i in range(0, len(patches), self.max_batch)]
        names = [o.name for o in self.card.outputs]
        if not parts:
            return {o.name: np.zeros((0, o.width), np.float32) for o in self.card.outputs}
        return {n: np.concatenate([p[n] for p in parts]).astype(np.float32) for n in names}

    def _infer_chunk(self, patches: npt.NDArray[np.uint8]) -> Predictions:
        names = [o.name for o in self.card.outputs]
        request_id = uuid.uuid4().hex
        body, header_len = encode_infer_request(
            {self.input_name: patches}, names, binary=self.binary, request_id=request_id
        )
        headers = {"Content-Type": "application/octet-stream" if header_len else "application/json"}
        if header_len is not None:
            headers[HEADER_LENGTH] = str(header_len)

        def call() -> httpx.Response:
            return self._check(self._http.post(f"{self._base}/infer", content=body,
                                               headers=headers))

        resp = self._retrying("inference", call)
        length = resp.headers.get(HEADER_LENGTH)
        header, outs = decode_infer_response(resp.content, int(length) if length else None)
        if header.get("id") not in (None, request_id):
            raise WorkerError(f"the model worker answered request {header.get('id')!r}, "
                              f"not {request_id!r}")
        missing = [n for n in names if n not in outs]
        if missing:
            raise WorkerError(f"the model worker returned no output {missing}")
        return {n: np.asarray(outs[n], np.float32) for n in names}

    def close(self) -> None:
        if self._owns_client:
            self._http.close()

    def __enter__(self) -> RemoteWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Retry(Exception):
    """A response worth retrying (overloaded or restarting server)."""
