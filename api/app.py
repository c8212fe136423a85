"""The sampler REST API: ``create_app(settings)``. A thin layer over the library.

The lifespan opens the model worker once (in-process by default, or a remote Open
Inference Protocol worker); until it is ready, ``/readyz`` is 503 and prediction routes
answer 503 with Retry-After. ``/healthz``, ``/readyz`` and ``/metrics`` need no API key;
every ``/v1`` route does when keys are configured.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import SecretStr

from wsi_sampler import __version__
from wsi_sampler.batch import discover
from wsi_sampler.deidentify import load_pseudonyms
from wsi_sampler.demo import write_demo_slide
from wsi_sampler.errors import WsiSamplerError
from wsi_sampler.redact import remember_secret
from wsi_sampler.slide_models import SlideModel, load_slide_model
from wsi_sampler.sources.dicomweb import DicomWebCredentials
from wsi_sampler.tissue import TissueParams
from wsi_sampler.worker import Worker, open_worker

from .config import Settings, load_settings
from .deps import Services
from .errors import MessageScrubber, install_error_handlers
from .jobs import JobLimits, JobManager
from .memory import limit_malloc_arenas
from .metrics import Metrics
from .middleware import RequestGuard, RequestMetrics
from .routes import deepzoom, jobs, qc, reports, sampling, slide_models, slides, viewer
from .schemas import ErrorBody
from .slides import SlideRegistry

__all__ = ["create_app"]

logger = logging.getLogger("wsi_sampler.api")
_WORKER_RETRY_S = 5.0
# Statuses any /v1 route may answer besides its own (documented once, for every route).
_COMMON: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorBody, "description": "Malformed request body (not JSON)"},
    401: {"model": ErrorBody, "description": "Missing or wrong API key (when keys are set)"},
    413: {"model": ErrorBody, "description": "Request body over max_body_kb"},
    422: {"model": ErrorBody, "description": "Invalid parameters"},
}


def dicomweb_credentials(settings: Settings) -> DicomWebCredentials:
    """The DICOMweb roots' credentials from the settings (TOML or WSI_DICOMWEB_*)."""
    def secret(value: SecretStr | None) -> str:
        return value.get_secret_value() if value is not None else ""

    return DicomWebCredentials(
        token=secret(settings.dicomweb_token), username=settings.dicomweb_username or "",
        password=secret(settings.dicomweb_password),
        ca_bundle=settings.dicomweb_ca_bundle or "")


def ensure_demo_slide(settings: Settings) -> None:
    """Write a generated demo slide into the first root when it holds no slide at all."""
    root = settings.slide_roots[0]
    root.mkdir(parents=True, exist_ok=True)
    if discover(root).slides:
        return
    path = write_demo_slide(root / "demo.svs")
    logger.info("slide folder %s was empty: wrote the demo slide %s", root, path)


async def _connect_worker(services: Services, factory: Callable[[], Worker]) -> None:
    """Open the worker; a remote one that is not up yet is retried in the background."""
    while True:
        try:
            services.worker = await asyncio.to_thread(factory)
            services.worker_error = None
            logger.info("model worker ready: %s", services.worker.card.name)
            return
        except WsiSamplerError as exc:
            services.worker_error = str(exc)
            logger.warning("model worker not ready (%s); retrying in %.0f s", exc,
                           _WORKER_RETRY_S)
        await asyncio.sleep(_WORKER_RETRY_S)


async def _start_services(app: FastAPI, cfg: Settings) -> Services:
    """The slide registry (listed once), the job manager and the services around them."""
    limit_malloc_arenas(cfg.malloc_arena_max)
    for secret in cfg.secrets():
        remember_secret(secret)
    if cfg.demo_slide:
        await asyncio.to_thread(ensure_demo_slide, cfg)
    cfg.uploads_dir.mkdir(parents=True, exist_ok=True)
    pseudonyms = load_pseudonyms(cfg.pseudonym_map) if cfg.pseudonym_map else None
    registry = SlideRegistry([*cfg.slide_roots, cfg.uploads_dir],
                             refresh_s=cfg.slide_index_refresh_s,
                             remote_roots=cfg.remote_slide_roots,
                             dicomweb_credentials=dicomweb_credentials(cfg),
                             deidentify=cfg.deidentify, pseudonyms=pseudonyms,
                             uploads=cfg.uploads_dir)
    await asyncio.to_thread(registry.start)
    limits = JobLimits(max_queued=cfg.max_queued_jobs, per_owner=cfg.max_jobs_per_key,
                       retention_s=cfg.job_retention_hours * 3600,
                       min_free_bytes=int(cfg.min_free_disk_mb * 2**20))
    jobs_ = JobManager(cfg.data_dir, registry, lambda: app.state.services.worker,
                       workers=cfg.job_workers, batch_size=cfg.batch_size, limits=limits)
    scrub = MessageScrubber([*registry.roots, cfg.data_dir], registry.remote_roots,
                            whole_paths=cfg.deidentify)
    jobs_.scrub = scrub
    services = Services(cfg, registry, jobs_, Metrics(), scrub,
                        slide_models=await asyncio.to_thread(_load_slide_models, cfg))
    jobs_.vlm_for = services.vlm_for
    jobs_.slide_models_for = services.slide_models_for
    jobs_.tissue_params = _checked_tissue_params(services)
    app.state.services = services
    return services


def _checked_tissue_params(services: Services) -> TissueParams:
    """The configured artefact exclusion, checked at startup: a missing weights file or an
    unknown class stops the service with the reason; the model loads on first use."""
    cfg = services.settings
    for key in ("segmenter_weights", "artifact_weights"):
        if getattr(cfg, key) and not Path(getattr(cfg, key)).is_file():
            raise ValueError(f"{key}: {getattr(cfg, key)}: no such file")
    params = services.tissue_params
    if cfg.artifact_weights:
        logger.info("artefact exclusion: %s (%s)", cfg.artifact_model,
                    ", ".join(params.deep_exclusion()))
    return params


def _load_slide_models(cfg: Settings) -> dict[str, SlideModel]:
    """The configured slide models, loaded strictly at startup (a card or checkpoint that
    does not fit stops the service with the reason)."""
    models: dict[str, SlideModel] = {}
    for entry in cfg.slide_models:
        model = load_slide_model(entry.card, weights=entry.weights, device=cfg.device)
        if model.name in models:
            raise ValueError(f"slide_models: two slide models are called {model.name!r}")
        models[model.name] = model
        logger.info("slide model %s (%s over %s features): %s", model.name,
                    model.card.architecture, model.encoder_card.name,
                    ", ".join(model.card.class_names))
    return models


def _install_middleware(app: FastAPI, cfg: Settings) -> None:
    # Outermost first: metrics see every answer; CORS preflights need no key; the guard
    # checks keys and body sizes before a route reads the body.
    app.add_middleware(RequestGuard, settings=cfg)
    if cfg.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins,
                           allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(RequestMetrics,
                       metrics=lambda: getattr(getattr(app.state, "services", None),
                                               "metrics", None))


def create_app(
    settings: Settings | None = None, *, worker_factory: Callable[[], Worker] | None = None
) -> FastAPI:
    """The API app. ``worker_factory`` replaces the configured worker (tests, embedding)."""
    cfg = settings or load_settings()

    def default_factory() -> Worker:
        return open_worker(cfg.model, weights=cfg.model_weights or None,
                           worker_url=cfg.worker_url or None, device=cfg.device,
                           target_mpp=cfg.worker_target_mpp,
                           patch_size_px=cfg.worker_patch_size, protocol=cfg.worker_protocol,
                           precision=cfg.precision)

    factory = worker_factory or default_factory

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await _start_services(app, cfg)
        task = asyncio.create_task(_connect_worker(services, factory))
        try:
            yield
        finally:
            task.cancel()
            services.tiles.close()
            services.registry.close()
            services.jobs.close()
            if services.worker is not None:
                services.worker.close()

    app = FastAPI(
        title="wsi-sampler", version=__version__, lifespan=lifespan,
        description="Whole-slide tissue detection, patch sampling, patch and prediction "
                    "streaming. Coordinates are level-0 pixels; sizes are physical.",
    )
    _install_middleware(app, cfg)
    install_error_handlers(app)
    _install_health(app)
    for router in (slides.router, qc.router, deepzoom.router, sampling.router,
                   slide_models.router, reports.router, jobs.router):
        app.include_router(router, responses=_COMMON)
    app.include_router(viewer.router)
    return app


def _install_health(app: FastAPI) -> None:
    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, object]:
        """The process is up."""
        return {"status": "ok", "version": __version__, "time": time.time()}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "Worker not ready"}})
    async def readyz(request: Request) -> JSONResponse:
        """The model worker is ready to predict."""
        services: Services = request.app.state.services
        if services.worker is None:
            return JSONResponse({"status": "not ready", "error": services.worker_error},
                                status_code=503, headers={"Retry-After": "2"})
        body = {"status": "ready", "model": services.worker.card.name}
        precision = getattr(services.worker, "precision_info", None)
        if precision is not None:  # in-process models (a remote worker decides its own)
            body["precision"] = precision
        return JSONResponse(body)

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def metrics(request: Request) -> Response:
        """Prometheus metrics."""
        services: Services = request.app.state.services
        services.metrics.queue_depth.set(services.jobs.queue_depth)
        return Response(generate_latest(services.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)
