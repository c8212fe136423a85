"""The Open Inference Protocol (KServe V2 REST) with Triton's binary tensor extension.

Pure encode/decode, shared by our worker server and our client. A request or response body
is a JSON header, optionally followed by raw tensor bytes; the ``Inference-Header-Content-
Length`` HTTP header gives the JSON length, and each binary tensor's
``parameters.binary_data_size`` its byte length, in order. Tensors are little-endian,
C order. FP16 travels only as binary (JSON has no half floats).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import InvalidRequestError

__all__ = [
    "HEADER_LENGTH",
    "InferRequest",
    "ProtocolError",
    "decode_infer_request",
    "decode_infer_response",
    "encode_infer_request",
    "encode_infer_response",
    "numpy_to_oip",
    "oip_to_numpy",
]

HEADER_LENGTH = "Inference-Header-Content-Length"

_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_ELEMENTS = 1 << 31


class ProtocolError(InvalidRequestError):
    """A malformed inference request or response (a 400 on the server side)."""


def oip_to_numpy(datatype: str) -> np.dtype[Any]:
    try:
        return _DTYPES[datatype]
    except KeyError:
        raise ProtocolError(
            f"unsupported datatype {datatype!r} (supported: {', '.join(_DTYPES)})"
        ) from None


def numpy_to_oip(dtype: np.dtype[Any]) -> str:
    try:
        return _NAMES[np.dtype(dtype)]
    except KeyError:
        raise ProtocolError(f"numpy dtype {dtype} has no Open Inference Protocol type") from None


def _split_body(body: bytes, header_length: int | None) -> tuple[dict[str, Any], memoryview]:
    n = len(body) if header_length is None else header_length
    if n < 0 or n > len(body):
        raise ProtocolError(f"{HEADER_LENGTH} {header_length} does not fit a {len(body)}-byte body")
    try:
        header = json.loads(bytes(body[:n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"the JSON header does not parse ({exc})") from exc
    if not isinstance(header, dict):
        raise ProtocolError("the JSON header must be an object")
    return header, memoryview(body)[n:]


def _shape(raw: Any, what: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and d >= 0 for d in raw):
        raise ProtocolError(f"{what}: shape must be a list of non-negative integers")
    if math.prod(raw) > _MAX_ELEMENTS:
        raise ProtocolError(f"{what}: shape {raw} is too large")
    return tuple(raw)


def _read_tensor(spec: Any, blob: memoryview, offset: int, what: str) -> tuple[np.ndarray, int]:
    """Decode one tensor spec (JSON data or the next binary blob); return it, new offset."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ProtocolError(f"{what}: each tensor needs a name")
    name = spec["name"]
    shape = _shape(spec.get("shape"), f"{what} {name!r}")
    datatype = spec.get("datatype")
    dtype = oip_to_numpy(str(datatype))
    params = spec.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    expected = math.prod(shape) * dtype.itemsize
    if size is not None:
        if not isinstance(size, int) or size < 0:
            raise ProtocolError(f"{what} {name!r}: binary_data_size must be an integer >= 0")
        if size != expected:
            raise ProtocolError(
                f"{what} {name!r}: binary_data_size {size} != {expected} bytes for shape "
                f"{list(shape)} of {datatype}"
            )
        if offset + size > len(blob):
            missing = offset + size - len(blob)
            raise ProtocolError(f"{what} {name!r}: the body ends {missing} bytes early")
        arr = np.frombuffer(blob[offset : offset + size], dtype=dtype).reshape(shape)
        return arr, offset + size
    if datatype == "FP16":
        raise ProtocolError(f"{what} {name!r}: FP16 is only accepted as binary data")
    if "data" not in spec:
        raise ProtocolError(f"{what} {name!r}: neither data nor binary_data_size")
    try:
        arr = np.asarray(spec["data"], dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ProtocolError(f"{what} {name!r}: data is not {datatype} ({exc})") from exc
    if arr.size != math.prod(shape):
        raise ProtocolError(
            f"{what} {name!r}: {arr.size} values do not fill shape {list(shape)}"
        )
    return arr.reshape(shape), offset


@dataclass
class InferRequest:
    """A decoded inference request."""

    inputs: dict[str, np.ndarray]
    id: str | None = None
    requested: list[str] | None = None
    """Output names asked for (None = all)."""
    binary_outputs: set[str] = field(default_factory=set)
    binary_default: bool = False


def decode_infer_request(body: bytes, header_length: int | None) -> InferRequest:
    header, blob = _split_body(body, header_length)
    specs = header.get("inputs")
    if not isinstance(specs, list) or not specs:
        raise ProtocolError("the request needs a non-empty 'inputs' list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for spec in specs:
        arr, offset = _read_tensor(spec, blob, offset, "input")
        inputs[spec["name"]] = arr
    if offset != len(blob):
        raise ProtocolError(f"{len(blob) - offset} bytes of binary data belong to no input")
    params = header.get("parameters") or {}
    req = InferRequest(inputs=inputs, id=_request_id(header.get("id")),
                       binary_default=bool(params.get("binary_data_output", False)))
    outs = header.get("outputs")
    if outs is not None:
        if not isinstance(outs, list):
            raise ProtocolError("'outputs' must be a list")
        req.requested = []
        for o in outs:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise ProtocolError("each requested output needs a name")
            req.requested.append(o["name"])
            binary = (o.get("parameters") or {}).get("binary_data", req.binary_default)
            if binary:
                req.binary_outputs.add(o["name"])
    return req


def _request_id(raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or len(raw) > 256:
        raise ProtocolError("'id' must be a string of at most 256 characters")
    return raw


def _encode(
    header: dict[str, Any], key: str, tensors: dict[str, np.ndarray], binary: set[str] | bool
) -> tuple[bytes, int | None]:
    specs, blobs = [], []
    for name, arr in tensors.items():
        a = np.ascontiguousarray(arr)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        datatype = numpy_to_oip(a.dtype)
        spec: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(a.shape)}
        as_binary = binary if isinstance(binary, bool) else name in binary
        if as_binary or datatype == "FP16":
            raw = a.tobytes()
            spec["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            spec["data"] = a.ravel().tolist()
        specs.append(spec)
    header[key] = specs
    text = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return text, None
    return text + b"".join(blobs), len(text)


def encode_infer_response(
    model: str, version: str, request_id: str | None, outputs: dict[str, np.ndarray],
    binary: set[str] | bool,
) -> tuple[bytes, int | None]:
    """Body bytes and, when binary tensors follow, the JSON header length."""
    header: dict[str, Any] = {"model_name": model, "model_version": version}
    if request_id is not None:
        header["id"] = request_id
    return _encode(header, "outputs", outputs, binary)


def encode_infer_request(
    inputs: dict[str, np.ndarray], outputs: list[str], *, binary: bool,
    request_id: str | None = None,
) -> tuple[bytes, int | None]:
    header: dict[str, Any] = {
        "outputs": [{"name": o, "parameters": {"binary_data": binary}} for o in outputs],
    }
    if request_id is not None:
        header["id"] = request_id
    return _encode(header, "inputs", inputs, binary)


def decode_infer_response(
    body: bytes, header_length: int | None
) -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]]]:
    """The JSON header and the output tensors of a response."""
    header, blob = _split_body(body, header_length)
    outs: dict[str, npt.NDArray[Any]] = {}
    offset = 0
    for spec in header.get("outputs") or []:
        arr, offset = _read_tensor(spec, blob, offset, "output")
        outs[spec["name"]] = arr
    return header, outs
