"""Shared state of one app and the dependencies routes declare to reach it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, ParamSpec, TypeVar

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from wsi_sampler.errors import InvalidRequestError
from wsi_sampler.slide_models import SlideModel
from wsi_sampler.slide_models.predict import require_encoder
from wsi_sampler.tissue import TissueParams
from wsi_sampler.types import TissueMethod
from wsi_sampler.worker import Worker
from wsi_sampler.worker.vlm import VlmConfig, VlmWorker

from .config import Settings
from .errors import MessageScrubber, TooBusyError, WorkerNotReadyError, describe_error
from .jobs import JobManager
from .metrics import Metrics
from .schemas import ReportRequest, with_tissue_method
from .slides import SlideRegistry
from .tiles import TileServer

__all__ = ["ServicesDep", "Services"]

P = ParamSpec("P")
T = TypeVar("T")


@dataclass
class Services:
    settings: Settings
    registry: SlideRegistry
    jobs: JobManager
    metrics: Metrics
    scrub: MessageScrubber
    worker: Worker | None = None
    worker_error: str | None = None
    slide_models: dict[str, SlideModel] = field(default_factory=dict)
    _streams: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _slide_work: asyncio.Semaphore = field(init=False)
    tiles: TileServer = field(init=False)

    def __post_init__(self) -> None:
        self._slide_work = asyncio.Semaphore(self.settings.max_concurrent_slide_work)
        self.tiles = TileServer(self.registry, cache_mb=self.settings.tile_cache_mb,
                                decoded_mb=self.settings.tile_decode_cache_mb)

    async def slide_work(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run slide work (tissue masks, thumbnails, plans) in a thread, at most
        ``max_concurrent_slide_work`` at once; the others wait on the event loop, holding
        no thread, so memory and CPU stay bounded under bursts."""
        async with self._slide_work:
            return await run_in_threadpool(fn, *args, **kwargs)

    @property
    def tissue_params(self) -> TissueParams:
        """Tissue detection and artefact exclusion as the service config sets them."""
        cfg = self.settings
        return TissueParams(method=cfg.tissue_method,
                            segmenter_weights=cfg.segmenter_weights or None,
                            artifact_weights=cfg.artifact_weights or None,
                            artifact_model=cfg.artifact_model,
                            exclude_artifacts=tuple(cfg.exclude_artifacts),
                            max_excluded_share=cfg.max_excluded_share)

    def tissue_for(self, method: TissueMethod | None) -> TissueParams:
        """The service's tissue settings, detecting with a request's ``method`` (None: the
        service's own; see :func:`~api.schemas.with_tissue_method`)."""
        return with_tissue_method(self.tissue_params, method)

    def require_worker(self) -> Worker:
        if self.worker is None:
            reason = f": {self.worker_error}" if self.worker_error else ""
            raise WorkerNotReadyError(f"the model worker is not ready{reason}")
        return self.worker

    def slide_models_for(self, names: list[str] | None) -> list[SlideModel]:
        """The configured slide models called ``names`` (None: all of them), checked to read
        the features of the service's encoder."""
        if not self.slide_models:
            raise InvalidRequestError("this service has no slide models (configure "
                                      "slide_models / WSI_SLIDE_MODELS)")
        unknown = [n for n in names or [] if n not in self.slide_models]
        if unknown:
            raise InvalidRequestError(f"no slide model {unknown[0]!r} (this service has "
                                      f"{', '.join(self.slide_models)})")
        chosen = [self.slide_models[n] for n in (names or list(self.slide_models))]
        require_encoder(chosen, self.require_worker().card.name,
                        given_as="this service's model")
        return chosen

    def acquire_stream(self) -> None:
        """Take a streaming slot or raise TooBusyError (HTTP 429 with Retry-After)."""
        with self._lock:
            if self._streams >= self.settings.max_concurrent_streams:
                raise TooBusyError(
                    f"{self._streams} streams are running, the limit is "
                    f"{self.settings.max_concurrent_streams}; retry shortly"
                )
            self._streams += 1
            self.metrics.active_streams.set(self._streams)

    async def stream_work(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Take a stream slot first (a 429 costs nothing), then run ``fn`` as slide work;
        the slot is released if that fails (on success the stream releases it)."""
        self.acquire_stream()
        try:
            return await self.slide_work(fn, *args, **kwargs)
        except BaseException:
            self.release_stream()
            raise

    def release_stream(self) -> None:
        with self._lock:
            self._streams -= 1
            self.metrics.active_streams.set(self._streams)

    def vlm_for(self, req: ReportRequest) -> VlmWorker:
        """A client of the configured vision-language model, with the request's options."""
        cfg = self.settings
        if not cfg.vlm_url:
            raise WorkerNotReadyError("no vision-language model is configured: set vlm_url "
                                      "(WSI_VLM_URL) to an OpenAI-compatible endpoint")
        return VlmWorker(VlmConfig(
            url=cfg.vlm_url, model=cfg.vlm_model, api_key_env=cfg.vlm_api_key_env,
            timeout_s=cfg.vlm_timeout_s, max_images=cfg.vlm_max_images,
            context_tokens=cfg.vlm_context_tokens,
            max_tokens=req.max_tokens or cfg.vlm_max_tokens, image_format=req.image_format,
            system_prompt=req.system_prompt))

    def describe(self, exc: BaseException) -> tuple[int, str]:
        """(HTTP status, client-safe message) of an exception."""
        return describe_error(exc, self.scrub)


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_owner(request: Request) -> str:
    """Who is asking, for job ownership: the API key's digest (set by the request guard),
    '' when the service has no keys."""
    return str(getattr(request.state, "owner", ""))


OwnerDep = Annotated[str, Depends(get_owner)]
