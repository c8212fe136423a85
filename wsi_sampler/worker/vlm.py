"""A vision-language model behind an OpenAI-compatible chat endpoint: a bag of patches in,
text out (vLLM, SGLang, TGI, Ollama, Google's MedGemma serving container).

The request is built as MedGemma's public notebook builds it (``shared/docs/DESIGN.md``,
"How the bag reaches the model"): one user message, the text prompt first, then one
``image_url`` part per patch in bag order, each a data URI (JPEG quality 95 by default, PNG
on request), an optional system message, ``temperature`` 0, to ``/v1/chat/completions``
through the official ``openai`` client. Limits are checked before anything is sent: images
per prompt (the server's ``--limit-mm-per-prompt``), request size and the token budget
(Gemma 3 spends 256 tokens per 896 px image). Every failure of the endpoint is a domain
error; an answer without text is one too, never an empty success.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..encoding import encode_image
from ..errors import InvalidRequestError, WorkerError, WorkerUnavailableError
from ..redact import public_url, remember_secret, upstream_reason, url_credentials
from ..types import RGBImage
from ._interrupt import CuttableHttp, Deadline

__all__ = ["VlmConfig", "VlmReport", "VlmRequest", "VlmWorker", "encode_data_uri"]

ImageEncoding = Literal["jpeg", "png"]
log = logging.getLogger(__name__)
# MedGemma 1.5 4B serves a 128K-token context (its model card; e.g. the Ollama listing of
# google/medgemma-1.5-4b-it: "128K context window"). Gemma 3's vision encoder turns each
# 896 x 896 image into 256 soft tokens (DESIGN.md, MedGemma recipe).
DEFAULT_CONTEXT_TOKENS = 131_072
TOKENS_PER_IMAGE = 256
# A token is at least ~3 bytes of English text on Gemma's tokenizer: an upper bound on
# the prompt's tokens without shipping the tokenizer.
_BYTES_PER_TOKEN = 3
_CONTEXT_WORDS = ("context length", "context window", "maximum context", "too long",
                  "too many tokens", "max_model_len", "exceeds")


@dataclass(frozen=True, kw_only=True)
class VlmConfig:
    """Where the model is served and what it accepts."""

    url: str
    """Base URL of the OpenAI-compatible API, e.g. ``http://gpu-box:8000/v1``."""
    model: str = "google/medgemma-1.5-4b-it"
    api_key_env: str = "WSI_VLM_API_KEY"
    """Environment variable holding the API key (unset: vLLM's placeholder ``EMPTY``)."""
    timeout_s: float = 600.0
    retries: int = 2
    max_images: int = 126
    """Images the server accepts per prompt (vLLM ``--limit-mm-per-prompt '{"image": N}'``)."""
    max_request_mb: float = 100.0
    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    tokens_per_image: int = TOKENS_PER_IMAGE
    max_tokens: int = 1024
    temperature: float = 0.0
    image_format: ImageEncoding = "jpeg"
    jpeg_quality: int = 95
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise InvalidRequestError(
                f"vlm_url must start with http:// or https://: {public_url(self.url)}")
        carried = url_credentials(self.url)
        if carried:
            raise InvalidRequestError(
                f"vlm_url must not carry credentials ({carried}): give the API key in the "
                f"environment variable {self.api_key_env}")
        if self.image_format not in ("jpeg", "png"):
            raise InvalidRequestError(f"image format must be jpeg or png: {self.image_format}")
        for name in ("max_images", "context_tokens", "tokens_per_image", "max_tokens"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be >= 1")
        if not (0 <= self.temperature <= 2 and 1 <= self.jpeg_quality <= 100):
            raise InvalidRequestError("temperature must be 0..2 and jpeg_quality 1..100")

    def api_key(self) -> str:
        key = os.environ.get(self.api_key_env)
        remember_secret(key)
        return key or "EMPTY"


@dataclass
class VlmReport:
    """The model's answer to one bag."""

    text: str
    model: str
    finish_reason: str | None
    usage: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "model": self.model, "finish_reason": self.finish_reason,
                "usage": self.usage, "seconds": round(self.seconds, 3)}


def encode_data_uri(image: RGBImage, image_format: ImageEncoding = "jpeg",
                    jpeg_quality: int = 95) -> str:
    """An RGB patch as a ``data:image/...;base64,`` URI."""
    data = encode_image(image, ".jpg" if image_format == "jpeg" else ".png",
                        jpeg_quality=jpeg_quality)
    return f"data:image/{image_format};base64,{base64.b64encode(data).decode()}"


class VlmRequest:
    """Builds and checks chat requests for a bag (nothing is sent)."""

    def __init__(self, config: VlmConfig) -> None:
        self.config = config

    def check_bag(self, n_images: int, prompt: str) -> None:
        """Refuse a bag the endpoint cannot take, saying what to change."""
        cfg = self.config
        if not prompt.strip():
            raise InvalidRequestError("the prompt is empty")
        if n_images > cfg.max_images:
            raise InvalidRequestError(
                f"the bag has {n_images} images, the endpoint takes at most {cfg.max_images} "
                "per prompt (vlm_max_images, vLLM --limit-mm-per-prompt); sample fewer with "
                "n_patches or raise the server's limit"
            )
        text = prompt + (cfg.system_prompt or "")
        needed = n_images * cfg.tokens_per_image + math.ceil(
            len(text.encode()) / _BYTES_PER_TOKEN) + cfg.max_tokens
        if needed > cfg.context_tokens:
            raise InvalidRequestError(
                f"the request needs up to {needed:,} tokens ({n_images} images x "
                f"{cfg.tokens_per_image} + prompt + max_tokens {cfg.max_tokens}), more than "
                f"the model's context of {cfg.context_tokens:,}; use fewer patches or tokens"
            )

    def messages(self, data_uris: Sequence[str], prompt: str) -> list[dict[str, Any]]:
        """The chat messages: optional system message, then one user message (prompt
        first, then the images in bag order). Checks the request size."""
        size = sum(len(u) for u in data_uris) + len(prompt.encode())
        if size > self.config.max_request_mb * 2**20:
            raise InvalidRequestError(
                f"the request would be {size / 2**20:.1f} MiB, more than vlm_max_request_mb="
                f"{self.config.max_request_mb:g}; use fewer patches or JPEG images"
            )
        content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
        content += [{"type": "image_url", "image_url": {"url": u}} for u in data_uris]
        messages: list[dict[str, Any]] = []
        if self.config.system_prompt:
            messages.append({"role": "system", "content": self.config.system_prompt})
        messages.append({"role": "user", "content": content})
        return messages

    def request_body(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """A ready-to-send ``/v1/chat/completions`` body (for users who call the model)."""
        return {"model": self.config.model, "messages": messages,
                "max_tokens": self.config.max_tokens, "temperature": self.config.temperature}


class VlmWorker(VlmRequest):
    """Sends bags of patches to an OpenAI-compatible chat endpoint.

    ``timeout_s`` bounds a whole call, retries included (a hanging endpoint is cut at the
    deadline, not per attempt); :meth:`cancel` cuts a call in flight from another thread
    (the API calls it when its client goes away)."""

    def __init__(self, config: VlmConfig) -> None:
        import openai

        super().__init__(config)
        self._http = CuttableHttp()
        self.client = openai.OpenAI(
            base_url=config.url, api_key=config.api_key(), timeout=config.timeout_s,
            max_retries=0,  # ours below, inside one deadline
            http_client=openai.DefaultHttpxClient(event_hooks=self._http.event_hooks))

    def cancel(self) -> None:
        """Cut the call in flight: it fails at once with WorkerUnavailableError."""
        self._http.cancel()

    def _create(self, deadline: Deadline, **body: Any) -> Any:
        """``chat.completions.create`` within ``deadline``: a transient failure (connection,
        5xx, 429) is retried while attempts and time are left and no one cancelled."""
        import openai

        transient = (openai.APIConnectionError, openai.InternalServerError,
                     openai.RateLimitError)
        for attempt in range(self.config.retries + 1):
            try:
                return self.client.with_options(timeout=deadline.remaining()
                                                ).chat.completions.create(**body)
            except transient:
                if attempt >= self.config.retries or deadline.expired or \
                        self._http.cancelled.is_set():
                    raise
            time.sleep(min(0.5 * 2**attempt, deadline.remaining()))
        raise AssertionError("unreachable")

    def stream(self, messages: list[dict[str, Any]]) -> Iterator[str | VlmReport]:
        """Yield text deltas as the endpoint streams them, then the full :class:`VlmReport`."""
        t0 = time.perf_counter()
        parts: list[str] = []
        state: dict[str, Any] = {"finish": None, "model": self.config.model, "usage": {},
                                 "max_chars": self.config.max_tokens * MAX_CHARS_PER_TOKEN}
        with Deadline(self.config.timeout_s, self._http) as deadline, \
                _translated(self.config, deadline, self._http):
            chunks = self._create(deadline, **self.request_body(messages), stream=True,
                                  stream_options={"include_usage": True})
            with chunks:  # closed whatever happens: a broken stream or a client gone
                yield from _deltas(chunks, parts, state)
        yield _report("".join(parts), state["model"], state["finish"], state["usage"],
                      time.perf_counter() - t0)

    def complete(self, messages: list[dict[str, Any]]) -> VlmReport:
        """The whole answer at once (no streaming)."""
        t0 = time.perf_counter()
        with Deadline(self.config.timeout_s, self._http) as deadline, \
                _translated(self.config, deadline, self._http):
            answer = self._create(deadline, **self.request_body(messages))
        choice = answer.choices[0] if answer.choices else None
        usage = answer.usage.model_dump(exclude_none=True) if answer.usage else {}
        text = choice.message.content or "" if choice else ""
        finish = choice.finish_reason if choice else None
        limit = self.config.max_tokens * MAX_CHARS_PER_TOKEN
        if len(text) > limit:
            text, finish = text[:limit], "length"
        return _report(text, answer.model, finish, usage, time.perf_counter() - t0)

    def close(self) -> None:
        self.client.close()

    def __del__(self) -> None:  # as openai's own client does: no socket outlives the worker
        with contextlib.suppress(Exception):
            self.client.close()


# The most text relayed per token asked for: a token is a few characters; an endpoint
# that sends far more than max_tokens allows is cut there (finish reason "length").
MAX_CHARS_PER_TOKEN = 32


def _deltas(chunks: Any, parts: list[str], state: dict[str, Any]) -> Iterator[str]:
    """The text deltas of a chat stream, at most ``state["max_chars"]`` characters in all;
    ``parts`` and ``state`` collect the rest."""
    room = int(state["max_chars"])
    for chunk in chunks:
        state["model"] = chunk.model or state["model"]
        if chunk.usage is not None:
            state["usage"] = chunk.usage.model_dump(exclude_none=True)
        for choice in chunk.choices:
            state["finish"] = choice.finish_reason or state["finish"]
            text = choice.delta.content or ""
            if len(text) > room:
                log.warning("the vision-language model sent more text than max_tokens "
                            "allows; cut at %d characters", state["max_chars"])
                state["finish"] = "length"
                text = text[:room]
            if text:
                room -= len(text)
                parts.append(text)
                yield text
            if room <= 0 and state["finish"] == "length":
                return


def _report(text: str, model: str, finish: str | None, usage: dict[str, Any],
            seconds: float) -> VlmReport:
    if not text.strip():
        raise WorkerError(f"the vision-language model returned no text (finish reason: "
                          f"{finish}); nothing to report", status=502)
    return VlmReport(text, model, finish, usage, seconds)


@contextlib.contextmanager
def _translated(config: VlmConfig, deadline: Deadline, http: CuttableHttp) -> Iterator[None]:
    """Turn the openai client's errors into domain errors that say what to do. Answers
    quote no upstream URL and only a short redacted reason; the whole upstream text goes
    to the DEBUG log."""
    try:
        yield
    except Exception as exc:
        if deadline.expired:
            raise WorkerUnavailableError(
                f"the vision-language model did not answer within {config.timeout_s:g} s "
                "(the whole request, retries included; vlm_timeout_s)") from exc
        if http.cancelled.is_set():
            raise WorkerUnavailableError("the call to the vision-language model was "
                                         "cancelled (its client went away)") from exc
        translated = translate_openai_error(exc, config)
        if translated is None:
            raise
        log.warning("vision-language model at %s: %s", public_url(config.url), translated)
        log.debug("vision-language model at %s failed: %r", public_url(config.url), exc)
        raise translated from exc


def translate_openai_error(exc: BaseException, config: VlmConfig) -> Exception | None:
    """The domain error for an ``openai`` exception (None: not one of the client's)."""
    import openai

    where = "the vision-language model"
    if isinstance(exc, openai.APITimeoutError):
        return WorkerUnavailableError(f"{where} did not answer within {config.timeout_s:g} s")
    if isinstance(exc, openai.APIConnectionError):
        return WorkerUnavailableError(f"{where} cannot be reached ({type(exc).__name__})")
    if isinstance(exc, (json.JSONDecodeError, openai.APIResponseValidationError)):
        return WorkerError(f"{where} answered something that is not an OpenAI chat "
                           "completion (not JSON, or not the expected fields)", status=502)
    if not isinstance(exc, openai.APIStatusError):
        return None
    detail = _error_message(exc)
    if exc.status_code in (400, 413, 422):
        if any(word in detail.lower() for word in _CONTEXT_WORDS):
            return InvalidRequestError(f"{where} says the bag does not fit its context: "
                                       f"{detail}; use fewer patches (n_patches)")
        return InvalidRequestError(f"{where} refused the request: {detail}")
    if exc.status_code in (401, 403):
        return WorkerError(f"{where} refused the API key (set {config.api_key_env}), "
                           f"HTTP {exc.status_code}", status=exc.status_code)
    if exc.status_code == 404:
        return WorkerError(f"{where} does not serve model {config.model!r} (HTTP 404)",
                           status=404)
    return WorkerError(f"{where} answered HTTP {exc.status_code}: {detail}",
                       status=exc.status_code)


def _error_message(exc: Any) -> str:
    """The server's own message, short and redacted: vLLM answers {"error": {"message": ...}}
    or {"message": ...}."""
    body = getattr(exc, "body", None)
    message = None
    if isinstance(body, dict):
        inner = body.get("error")
        message = inner.get("message") if isinstance(inner, dict) else body.get("message")
    return upstream_reason(str(message or getattr(exc, "message", "") or type(exc).__name__))
