"""A local OpenAI-compatible chat server for tests: no model runs here (no weights, no GPU).

It checks every request against the OpenAI chat schema using the ``openai`` package's own
request types (``CompletionCreateParams*``: unknown keys and malformed messages are a 400),
decodes every image part (data URIs only), records what it received, and answers like
vLLM: JSON or server-sent events (``stream=True``, with a final usage chunk). The ``model``
name picks a behaviour: ``echo`` (a short text describing the bag), ``context-too-long``
(vLLM's 400), ``fail-500``, ``slow`` (answers after 30 s), ``empty`` (no text), ``flood``
(a 1.2 MB answer whatever max_tokens says), ``hang`` (answers nothing until the client
goes, at most 2 minutes), ``echo-secret`` (a 500 whose message echoes the request's
``Authorization`` header, as careless proxies do) and ``garbage`` (a 200 whose events or
body are not JSON).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.chat.completion_create_params import (
    CompletionCreateParamsNonStreaming,
    CompletionCreateParamsStreaming,
)
from pydantic import TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

_STREAMING = TypeAdapter(CompletionCreateParamsStreaming)
_PLAIN = TypeAdapter(CompletionCreateParamsNonStreaming)
_KEYS = CompletionCreateParamsStreaming.__required_keys__ \
    | CompletionCreateParamsStreaming.__optional_keys__


@dataclass
class Received:
    """One validated request: its body, prompt text and decoded RGB images in order."""

    body: dict[str, Any]
    texts: list[str]
    images: list[np.ndarray]
    media_types: list[str]


@dataclass
class OpenAIStub:
    received: list[Received] = field(default_factory=list)
    hanging: int = 0
    """Requests of the ``hang`` model still waiting (their client has not gone)."""


def _materialise(value: Any) -> Any:
    """Consume pydantic's lazy iterators (this is where nested parts get validated)."""
    if isinstance(value, dict):
        return {k: _materialise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ValidatorIterator":
        return [_materialise(v) for v in value]
    return value


def validate_plain_request(body: dict[str, Any]) -> dict[str, Any]:
    """A non-streaming chat request, validated with the openai types and materialised."""
    result: dict[str, Any] = _materialise(_PLAIN.validate_python(body))
    return result


def _decode_image(url: str) -> tuple[np.ndarray, str]:
    head, _, data = url.partition(",")
    if not head.startswith("data:image/") or not head.endswith(";base64"):
        raise ValueError(f"image_url is not a base64 data URI: {head[:40]}")
    img = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("an image does not decode")
    return img[:, :, ::-1], head[5:-7]


def _validate(body: Any) -> Received:
    if not isinstance(body, dict) or "model" not in body or "messages" not in body:
        raise ValueError("model and messages are required")
    unknown = set(body) - _KEYS
    if unknown:
        raise ValueError(f"unknown request fields {sorted(unknown)}")
    adapter = _STREAMING if body.get("stream") else _PLAIN
    params = _materialise(adapter.validate_python(body))
    texts, images, media = [], [], []
    for message in params["messages"]:
        content = message.get("content")
        for part in [content] if isinstance(content, str) else content or []:
            if isinstance(part, str) or part.get("type") == "text":
                texts.append(part if isinstance(part, str) else part["text"])
            elif part.get("type") == "image_url":
                img, kind = _decode_image(part["image_url"]["url"])
                images.append(img)
                media.append(kind)
    return Received(body, texts, images, media)


def _answer_text(got: Received) -> str:
    shapes = sorted({f"{i.shape[1]}x{i.shape[0]}" for i in got.images})
    return (f"Received {len(got.images)} images ({', '.join(shapes)}). "
            f"Prompt: {got.texts[0] if got.texts else ''}")


def _chunk(model: str, text: str | None, finish: str | None) -> str:
    chunk = ChatCompletionChunk(
        id="chatcmpl-test", object="chat.completion.chunk", created=int(time.time()),
        model=model, choices=[{"index": 0, "delta": {"role": "assistant", "content": text},
                               "finish_reason": finish}])
    return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"


async def _events(model: str, text: str, n_images: int) -> AsyncIterator[str]:
    words = text.split(" ")
    for i, word in enumerate(words):
        yield _chunk(model, word + (" " if i < len(words) - 1 else ""), None)
        await asyncio.sleep(0)
    yield _chunk(model, None, "stop")
    usage = ChatCompletionChunk(
        id="chatcmpl-test", object="chat.completion.chunk", created=int(time.time()),
        model=model, choices=[], usage={"prompt_tokens": 256 * n_images + 10,
                                        "completion_tokens": len(words),
                                        "total_tokens": 256 * n_images + 10 + len(words)})
    yield f"data: {usage.model_dump_json(exclude_none=True)}\n\n"
    yield "data: [DONE]\n\n"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "BadRequestError",
                                   "code": status}}, status_code=status)


def create_openai_stub(stub: OpenAIStub) -> Starlette:
    async def completions(request: Request) -> Response:
        try:
            got = _validate(json.loads(await request.body()))
        except (ValueError, ValidationError) as exc:
            return _error(400, f"invalid request: {exc}")
        stub.received.append(got)
        model = got.body["model"]
        if model == "context-too-long":
            return _error(400, "This model's maximum context length is 8192 tokens. However, "
                               f"you requested {256 * len(got.images) + 1000} tokens.")
        if model == "fail-500":
            return _error(500, "CUDA out of memory")
        if model == "echo-secret":
            return _error(500, "upstream failed; you sent Authorization="
                               f"{request.headers.get('authorization')}\nsecond line")
        if model == "garbage":
            if got.body.get("stream"):
                return Response("data: {this is not json\n\n", media_type="text/event-stream")
            return Response("{this is not json", media_type="application/json")
        if model == "slow":
            await asyncio.sleep(30)
        if model == "hang":
            stub.hanging += 1
            deadline = time.monotonic() + 120
            while not await request.is_disconnected() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            stub.hanging -= 1
            return _error(504, "gave up")
        text = "" if model == "empty" else _answer_text(got)
        if model == "flood":  # far more than any max_tokens allows
            text = " ".join(["flood"] * 200_000)
        if got.body.get("stream"):
            return StreamingResponse(_events(model, text, len(got.images)),
                                     media_type="text/event-stream")
        answer = ChatCompletion(
            id="chatcmpl-test", object="chat.completion", created=int(time.time()),
            model=model, choices=[{"index": 0, "finish_reason": "stop",
                                   "message": {"role": "assistant", "content": text}}],
            usage={"prompt_tokens": 256 * len(got.images), "completion_tokens": 5,
                   "total_tokens": 256 * len(got.images) + 5})
        return JSONResponse(answer.model_dump(exclude_none=True))

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])


def main() -> None:
    """A dry run of reports without a model: ``python tests/_openai_server.py --port 8010``,
    then ``WSI_VLM_URL=http://127.0.0.1:8010/v1 WSI_VLM_MODEL=echo make run``."""
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, default=8010)
    args = parser.parse_args()
    uvicorn.run(create_openai_stub(OpenAIStub()), host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
