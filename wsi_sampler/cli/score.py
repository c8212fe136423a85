"""``wsi-sampler worker`` (serve a model over the Open Inference Protocol) and
``wsi-sampler score`` (batch scoring of a slide folder, with progress). Registered onto the
main app by :mod:`wsi_sampler.cli.main`."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

from ..errors import InvalidRequestError
from ..plan import PlanParams
from .options import (
    ArtifactModelO,
    ArtifactWeightsO,
    DeviceO,
    DeviceOpt,
    ExcludeArtifactsO,
    ExclusionArgs,
    FeaturesDtypeO,
    FeaturesDtypeOpt,
    MaxExcludedO,
    MethodOpt,
    MinTissueO,
    ModelO,
    MppOverrideO,
    PrecisionO,
    RandomWeightsO,
    SeedO,
    SegmenterWeightsO,
    SlideModelO,
    SlideWeightsO,
    StrictExclusionO,
    WeightsO,
    WorkerProtocolOpt,
    tissue_params,
)
from .vlm import (
    DEFAULT_MODEL,
    DEFAULT_PROMPT,
    PromptO,
    VariantO,
    VariantOpt,
    VlmModelO,
    VlmUrlO,
    bag_params,
    vlm_config,
)

if TYPE_CHECKING:
    from ..batch import BatchConfig, RunReport

__all__ = ["register"]

log = logging.getLogger("wsi_sampler")


def worker(
    model: ModelO = "tissue-qc",
    host: Annotated[str, typer.Option(help="Interface to bind (0.0.0.0 in containers).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port.")] = 8001,
    device: DeviceO = DeviceOpt.auto,
    precision: PrecisionO = None,
    weights: WeightsO = None,
    random_weights: RandomWeightsO = False,
    compile_model: Annotated[bool, typer.Option(
        "--compile", help="torch.compile the model (long GPU serving; the first batches "
        "pay the compile time).")] = False,
    max_delay_ms: Annotated[
        float, typer.Option(help="How long a request may wait for others to batch with.")
    ] = 2.0,
) -> None:
    """Serve a model over the Open Inference Protocol (KServe V2 REST + Triton binary)."""
    import uvicorn

    from api.worker_app import create_worker_app  # servers live in api/, loaded on demand

    from ..models import load_model

    loaded = load_model(model, weights=weights, device=device.value,
                        allow_random_weights=random_weights, compile_model=compile_model,
                        precision=precision.value if precision else None)
    log.info("model %s v%s on %s in %s (%s); serving on http://%s:%d/v2", loaded.name,
             loaded.card.version, loaded.device, loaded.precision,
             loaded.precision_info["reason"], host, port)
    app_ = create_worker_app(lambda: loaded, max_delay_s=max_delay_ms / 1000)
    uvicorn.run(app_, host=host, port=port, log_level="info")


class ExecutorOpt(str, Enum):
    local = "local"
    dask = "dask"


class ScoreStrategy(str, Enum):
    grid = "grid"
    random = "random"
    stratified = "stratified"


SlidesA = Annotated[str, typer.Argument(
    show_default=False, help="Folder of slides (searched recursively), an S3 prefix "
    "(s3://bucket/prefix/) or a DICOMweb server (dicomweb://host/prefix: every series).")]
OutO = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
WorkerUrlO = Annotated[
    str | None, typer.Option(help="Remote Open Inference Protocol worker instead.")]
StrategyO = Annotated[ScoreStrategy, typer.Option(help="Sampling strategy.")]
ExecutorO = Annotated[ExecutorOpt, typer.Option(help="local threads or a Dask cluster.")]
AddressO = Annotated[
    str | None, typer.Option(help="Dask scheduler (tcp://host:8786); none = LocalCluster.")]
WorkersO = Annotated[
    int | None, typer.Option(help="Slides in flight (local) / Dask workers (LocalCluster).")]
RetriesO = Annotated[int, typer.Option(help="Dask task retries per slide.")]
ResumeO = Annotated[bool, typer.Option(help="Skip slides already scored in OUT.")]
QuietO = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
WorkerTargetMppO = Annotated[float | None, typer.Option(
    help="µm/px the remote model expects (servers without our model card: MLServer, "
         "KServe, Triton).")]
WorkerPatchSizeO = Annotated[int | None, typer.Option(
    help="Input side in px, for remote models with a dynamic input shape.")]
WorkerProtocolO = Annotated[WorkerProtocolOpt, typer.Option(
    help="auto: binary tensors if the server lists them, else JSON.")]
ClamPtO = Annotated[bool, typer.Option(
    help="Encoders: also write CLAM's features.pt beside features.h5.")]
ReadMppO = Annotated[float | None, typer.Option(
    "--mpp", help="Read patches at this µm/px instead of the model's (a coarse scan).",
    min=0.05, max=100.0)]
ReadMagO = Annotated[float | None, typer.Option(
    "--magnification", help="The same as a magnification (10x = 1.0 µm/px).", min=0.1,
    max=200.0)]
ScoreNO = Annotated[int | None, typer.Option(
    "-n", "--n-patches", help="Patches per slide (random, stratified; with --vlm-url the "
    "cap of each MedGemma bag, default 126).")]
OverwriteO = Annotated[bool, typer.Option(
    help="Redo the slides OUT holds results of made with other parameters (default: "
         "refuse to mix them).")]
DeidentifyO = Annotated[bool, typer.Option(
    help="Name slides by pseudonym in every output (no paths, host or command line).")]
PseudonymsO = Annotated[Path | None, typer.Option(
    help="With --deidentify: a CSV path,pseudonym (else slide-<hash> names).")]


def score(
    slides: SlidesA, out: OutO, model: ModelO = "tissue-qc", weights: WeightsO = None,
    worker_url: WorkerUrlO = None, strategy: StrategyO = ScoreStrategy.grid,
    n_patches: ScoreNO = None, min_tissue: MinTissueO = 0.5, seed: SeedO = 0,
    executor: ExecutorO = ExecutorOpt.local, address: AddressO = None,
    workers: WorkersO = None, retries: RetriesO = 1, resume: ResumeO = True,
    mpp_override: MppOverrideO = None, device: DeviceO = DeviceOpt.auto,
    precision: PrecisionO = None, quiet: QuietO = False,
    worker_target_mpp: WorkerTargetMppO = None, worker_patch_size: WorkerPatchSizeO = None,
    worker_protocol: WorkerProtocolO = WorkerProtocolOpt.auto,
    vlm_url: VlmUrlO = None, vlm_model: VlmModelO = DEFAULT_MODEL, prompt: PromptO = None,
    variant: VariantO = VariantOpt.report,
    features_dtype: FeaturesDtypeO = FeaturesDtypeOpt.float32, clam_pt: ClamPtO = False,
    random_weights: RandomWeightsO = False, deidentify: DeidentifyO = False,
    pseudonyms: PseudonymsO = None, overwrite: OverwriteO = False,
    mpp: ReadMppO = None, magnification: ReadMagO = None,
    slide_model: SlideModelO = None, slide_weights: SlideWeightsO = None,
    tissue_method: Annotated[MethodOpt, typer.Option(
        help="Tissue detection: classical (auto, brightfield, fluorescence) or a deep "
             "segmenter (hest, hest-fast, grandqc; with --segmenter-weights).")] = MethodOpt.auto,
    segmenter_weights: SegmenterWeightsO = None,
    exclude_artifacts: ExcludeArtifactsO = None, artifact_weights: ArtifactWeightsO = None,
    artifact_model: ArtifactModelO = "grandqc-artifacts",
    max_excluded_share: MaxExcludedO = 0.5, strict_exclusion: StrictExclusionO = False,
    qc: Annotated[bool, typer.Option(
        help="Also each slide's QC summary and overlay (qc.json, qc.png) and the run's "
             "qc.csv: tissue and artefact areas, blur, stain vectors.")] = False,
) -> None:
    """Score every slide of a folder, an S3 prefix or a DICOMweb server. Exit 0 if all
    succeeded, 3 if any failed. Encoders write one features.h5 per slide (CLAM/TRIDENT
    layout). With --vlm-url, each slide's MedGemma bag is described by that model instead
    (report.json). Remote slides use the AWS credential chain (AWS_ENDPOINT_URL_S3 for
    MinIO/Ceph) and WSI_DICOMWEB_TOKEN / _USERNAME / _PASSWORD / _CA_BUNDLE. With
    --slide-model, each slide's features also go through those slide models (answers,
    attention and heatmaps beside features.h5)."""
    from ..batch import BatchConfig, run_batch
    from ..models import preflight

    tissue = tissue_params(tissue_method, segmenter_weights, ExclusionArgs(
        exclude_artifacts, artifact_weights, artifact_model, max_excluded_share,
        strict_exclusion))
    if vlm_url:
        _refuse_with_vlm(model=model != "tissue-qc", weights=weights is not None,
                         worker_url=worker_url is not None,
                         strategy=strategy is not ScoreStrategy.grid, clam_pt=clam_pt,
                         slide_model=bool(slide_model),
                         features_dtype=features_dtype is not FeaturesDtypeOpt.float32)
        cfg = BatchConfig(params=replace(bag_params(seed, None, n_patches, min_tissue, variant),
                                         tissue=tissue),
                          mpp_override=mpp_override, vlm=vlm_config(vlm_url, vlm_model),
                          prompt=prompt or DEFAULT_PROMPT)
    else:
        if worker_url is None:
            # a missing model or weights file: a one-line error before any work
            preflight(model, weights, allow_random_weights=random_weights)
        cfg = BatchConfig(
            model=model, weights=str(weights) if weights else None, worker_url=worker_url,
            device=device.value, precision=precision.value if precision else None,
            features_dtype=features_dtype.value, clam_pt=clam_pt,
            allow_random_weights=random_weights, mpp_override=mpp_override,
            params=PlanParams(strategy=strategy.value, n_patches=n_patches, seed=seed,
                              min_tissue_fraction=min_tissue, tissue=tissue),
            worker_target_mpp=worker_target_mpp, worker_patch_size=worker_patch_size,
            worker_protocol=worker_protocol.value)
    if qc:
        if vlm_url:
            raise InvalidRequestError("--qc goes with scoring, not with --vlm-url reports")
        cfg = replace(cfg, qc=True)
    if slide_model or slide_weights:
        cfg = replace(cfg, slide_models=_checked_slide_models(
            slide_model, slide_weights, model, worker_url, random_weights))
    cfg = _read_and_privacy(cfg, mpp, magnification, deidentify, pseudonyms)
    with _score_progress(quiet) as progress, _stop_on_ctrl_c() as stop:
        report = run_batch(slides, out, cfg, executor=executor.value, workers=workers,
                           address=address, retries=retries, resume=resume,
                           overwrite=overwrite, on_result=progress.result, stop=stop,
                           on_start=progress.start)
    _log_run(report, out, quiet)
    raise typer.Exit(130 if report.stopped else report.exit_code)


def _read_and_privacy(cfg: BatchConfig, mpp: float | None, magnification: float | None,
                      deidentify: bool, pseudonyms: Path | None) -> BatchConfig:
    """``cfg`` with the read resolution (--mpp / --magnification) and de-identification."""
    from ..deidentify import load_pseudonyms

    if mpp is not None and magnification is not None:
        raise InvalidRequestError("give --mpp or --magnification, not both")
    if mpp is not None or magnification is not None:
        cfg = replace(cfg, read_mpp=mpp if mpp is not None else 10.0 / float(magnification or 1))
    if deidentify or pseudonyms:
        cfg = replace(cfg, deidentify=True,
                      pseudonyms=load_pseudonyms(pseudonyms) if pseudonyms else None)
    return cfg


def _checked_slide_models(
    specs: list[str] | None, weights: list[Path] | None, encoder: str,
    worker_url: str | None, random_weights: bool,
) -> tuple[tuple[str, str | None], ...]:
    """Load each slide model once (cards and checkpoints fit) and check that it reads the
    features of the run's encoder, before any slide is read."""
    from ..models import preflight
    from ..slide_models.card import slide_catalogue_names
    from ..slide_models.predict import require_encoder
    from .predict import load_slide_models

    models = load_slide_models(specs, weights, random_weights=random_weights, device="cpu")
    # a remote worker's features are checked per slide (their width) as they arrive
    encoder_name = None if worker_url else preflight(encoder, allow_random_weights=True).name
    require_encoder(models, encoder_name, given_as="--model")
    checkpoints = [str(w) for w in weights] if weights else [None] * len(models)

    def where(spec: str) -> str:  # a built-in name stays a name; a card file an absolute path
        return spec if spec in slide_catalogue_names() else str(Path(spec).resolve())

    return tuple((where(s), w) for s, w in zip(specs or [], checkpoints, strict=True))


def _refuse_with_vlm(**given: bool) -> None:
    """--vlm-url describes each slide's MedGemma bag: options of patch models contradict it."""
    clash = [f"--{name.replace('_', '-')}" for name, set_ in given.items() if set_]
    if clash:
        raise InvalidRequestError(
            f"--vlm-url describes each slide's MedGemma bag with that model; {', '.join(clash)} "
            "belong to scoring with a patch model: give one or the other")


@contextlib.contextmanager
def _stop_on_ctrl_c() -> Iterator[threading.Event]:
    """First Ctrl-C: finish the slides in flight, start no other, write the run's files.
    Second: stop now (a slide in flight leaves only its staging folder, which the next run
    removes; results in place are always whole)."""
    stop = threading.Event()

    def on_sigint(signum: int, frame: object) -> None:
        if stop.is_set():
            sys.stderr.write("stopped now; the next run resumes what finished\n")
            sys.stderr.flush()
            os._exit(130)
        stop.set()
        log.warning("stopping after the slides in flight (Ctrl-C again to stop now)")

    # Kept until the process ends: a second Ctrl-C while the run files are written stops
    # as cleanly as one during the run.
    signal.signal(signal.SIGINT, on_sigint)
    yield stop


def _log_run(report: RunReport, out: Path, quiet: bool) -> None:
    if quiet:
        return
    log.info("%d scored, %d already done, %d failed, %d skipped in %.1f s -> %s",
             len(report.done), report.resumed, len(report.failures), len(report.skipped),
             report.seconds, out)
    for f in report.failures:
        log.info("failed: %s: %s", f["slide"], f["message"])


class _Progress:
    """Progress of a run: a rich bar on a terminal (done/total, patches/s, ETA, the last
    slide), a log line per slide otherwise, nothing if quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.started, self.patches = quiet, time.monotonic(), 0
        self.bar: Progress | None = None
        self.task: TaskID | None = None

    def start(self, total: int) -> None:
        if self.quiet or not sys.stderr.isatty():
            return
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                            MofNCompleteColumn(), TimeRemainingColumn(), transient=False)
        self.bar.start()
        self.task = self.bar.add_task("scoring slides", total=total)

    def result(self, rec: dict[str, object], i: int, n: int) -> None:
        if self.quiet:
            return
        self.patches += int(rec.get("patches", 0) or 0)  # type: ignore[call-overload]
        rate = self.patches / max(time.monotonic() - self.started, 1e-6)
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, completed=i, total=n, description=(
                f"scoring slides, {rate:.0f} patches/s, last: {rec['slide']}"))
        else:
            log.info("[%d/%d] %s %s (%.0f patches/s)", i, n, rec["status"], rec["slide"],
                     rate)
        _warn(rec)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@contextlib.contextmanager
def _score_progress(quiet: bool) -> Iterator[_Progress]:
    progress = _Progress(quiet)
    try:
        yield progress
    finally:
        progress.close()


def _warn(rec: dict[str, object]) -> None:
    """A slide's warnings and notes, one line each."""
    for text in [*list(rec.get("warnings") or []), rec.get("message")]:  # type: ignore[call-overload]
        if text and rec.get("status") == "done":
            log.warning("warning: %s: %s", rec["slide"], text)


def register(app: typer.Typer) -> None:
    app.command()(worker)
    app.command()(score)
