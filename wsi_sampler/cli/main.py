"""The ``wsi-sampler`` command line: a thin layer over the library.

User mistakes (missing files, unsupported slides, missing MPP, bad parameters) end in a
one-line ``error: ...`` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TimeRemainingColumn,
)

from .._io import atomic_write_bytes
from ..demo import DemoSlideSpec, tile_count, write_demo_slide
from ..encoding import PatchTransform, encoded_batches
from ..errors import InvalidRequestError, WsiSamplerError
from ..export import (
    run_metadata,
    write_clam_h5,
    write_csv,
    write_geojson,
    write_mask_png,
    write_metadata_json,
    write_overlay_png,
    write_tissue_geojson,
    write_wsinfer_h5,
)
from ..extract import Extractor, default_threads
from ..plan import PatchPlan, PlanParams, TissueMask, compute_tissue_mask, make_plan
from ..slide import Slide, open_slide
from ..tissue import TissueParams, load_geojson_geometry, load_mask_png, rasterize_geometry
from .deidentify import register as register_deidentify_commands
from .models import register as register_model_commands
from .options import (
    NO,
    ArtifactModelO,
    ArtifactWeightsO,
    BackendO,
    BackendOpt,
    ExcludeArtifactsO,
    ExclusionArgs,
    ImageFormat,
    MagO,
    MaskO,
    MaxExcludedO,
    MethodO,
    MethodOpt,
    MinTissueO,
    MppO,
    MppOverrideO,
    OverlapO,
    RoiO,
    SeedO,
    SegmenterWeightsO,
    SizeO,
    SlideArg,
    StainOpt,
    StrategyO,
    StrategyOpt,
    StrictExclusionO,
    TissueMppO,
    tissue_params,
)
from .predict import register as register_predict_commands
from .qc import register as register_qc_commands
from .score import register as register_score_commands
from .vlm import (
    DEFAULT_MODEL,
    DEFAULT_PROMPT,
    PromptO,
    VariantO,
    VariantOpt,
    VlmModelO,
    bag_params,
    write_messages,
)
from .vlm import register as register_vlm_commands

if TYPE_CHECKING:
    pass

log = logging.getLogger("wsi_sampler")
app = typer.Typer(
    name="wsi-sampler", no_args_is_help=True, pretty_exceptions_enable=False,
    help="Whole-slide patch sampling: slide info, tissue masks, patch plans, patch export.",
    # click's plain help: it wraps descriptions and never cuts an option's name at 80
    # columns (rich's tables did: "--worker-targe…")
    rich_markup_mode=None,
)
EXIT_USER_ERROR = 2


def _open(slide: str, backend: BackendOpt, mpp_override: float | None) -> Slide:
    return open_slide(slide, backend=backend.value, mpp_override=mpp_override)


def _plan_params(
    strategy: StrategyOpt, mpp: float | None, magnification: float | None, size: int | None,
    overlap: float, min_tissue: float, n_patches: int | None, seed: int,
    tissue_mpp: float | None, method: MethodOpt, variant: VariantOpt = VariantOpt.report,
    segmenter_weights: Path | None = None, exclusion: ExclusionArgs | None = None,
) -> PlanParams:
    tissue = tissue_params(method, segmenter_weights, exclusion)
    if strategy is StrategyOpt.medgemma:
        if mpp is not None or size not in (None, 896):
            raise InvalidRequestError("medgemma fixes --size (896) and draws --mpp; use "
                                      "--magnification to fix the magnification")
        p = bag_params(seed, magnification, n_patches, min_tissue, variant)
        return replace(p, tissue=tissue, tissue_mpp=tissue_mpp or p.tissue_mpp)
    return PlanParams(
        strategy=strategy.value, patch_size_px=size or 256, target_mpp=mpp,
        magnification=magnification, overlap=overlap, min_tissue_fraction=min_tissue,
        n_patches=n_patches, seed=seed, tissue_mpp=tissue_mpp or 8.0, tissue=tissue,
    )


def _tissue_for(
    s: Slide, params: PlanParams, mask: Path | None
) -> TissueMask:
    if mask is None:
        with _segmenter_progress() as progress:
            return compute_tissue_mask(s, tissue_mpp=params.tissue_mpp, params=params.tissue,
                                       progress=progress)
    # a user mask replaces detection: only the grid of a (classical, cheap) mask is needed,
    # not a deep segmenter's or the artefact model's run
    tm = compute_tissue_mask(s, tissue_mpp=params.tissue_mpp,
                             params=TissueParams(median_blur_um=0, close_um=0,
                                                 exclude_pen=False, exclude_dark=False))
    if mask.suffix.lower() in (".geojson", ".json"):
        user = rasterize_geometry(load_geojson_geometry(mask), tm.mask.shape, tm.scale)
    else:
        user = load_mask_png(mask, tm.mask.shape)
    return TissueMask(user, tm.mpp, tm.scale)


@contextmanager
def _segmenter_progress() -> Iterator[Callable[[int, int], None]]:
    """A progress bar for the artefact model's tiles (on stderr, shown once it runs)."""
    with Progress(BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True, disable=not sys.stderr.isatty()) as bar:
        task: list[TaskID] = []

        def update(done: int, total: int) -> None:
            if not task:
                task.append(bar.add_task("artefact model", total=total))
            bar.update(task[0], completed=done, total=total)

        yield update


def _build_plan(
    s: Slide, params: PlanParams, roi: Path | None, mask: Path | None
) -> tuple[PatchPlan, TissueMask]:
    tm = _tissue_for(s, params, mask)
    geometry = load_geojson_geometry(roi) if roi else None
    return make_plan(s, params, tissue=tm, roi=geometry), tm


@app.command()
def info(
    slide: SlideArg, backend: BackendO = BackendOpt.auto, mpp_override: MppOverrideO = None
) -> None:
    """Print the slide's size, levels, MPP, vendor and fingerprint as JSON."""
    with _open(slide, backend, mpp_override) as s:
        typer.echo(json.dumps(s.info(), indent=2))


@app.command()
def tissue(
    slide: SlideArg,
    out: Annotated[Path, typer.Option(help="Mask PNG to write (255 = tissue).")],
    geojson: Annotated[Path | None, typer.Option(help="Also write tissue polygons.")] = None,
    tissue_mpp: Annotated[float, typer.Option(help="Mask resolution in µm/px.")] = 8.0,
    method: MethodO = MethodOpt.auto,
    segmenter_weights: SegmenterWeightsO = None,
    exclude_artifacts: ExcludeArtifactsO = None, artifact_weights: ArtifactWeightsO = None,
    artifact_model: ArtifactModelO = "grandqc-artifacts",
    max_excluded_share: MaxExcludedO = 0.5, strict_exclusion: StrictExclusionO = False,
    artifacts_out: Annotated[Path | None, typer.Option(
        help="With --artifact-weights: also the artefact class map (PNG, the QC overlay's "
             "colours on black) and, beside it, each class's area (.json).")] = None,
    backend: BackendO = BackendOpt.auto,
    mpp_override: MppOverrideO = None,
) -> None:
    """Detect tissue, exclude artefacts, and write the mask (and optionally QuPath-ready
    polygons and the artefact class map)."""
    params = tissue_params(method, segmenter_weights, ExclusionArgs(
        exclude_artifacts, artifact_weights, artifact_model, max_excluded_share,
        strict_exclusion))
    if artifacts_out is not None and artifact_weights is None:
        raise InvalidRequestError("--artifacts-out maps the artefact model's classes: give "
                                  "--artifact-weights")
    with _open(slide, backend, mpp_override) as s, _segmenter_progress() as progress:
        tm = compute_tissue_mask(s, tissue_mpp=tissue_mpp, params=params, progress=progress)
    write_mask_png(out, tm.mask)
    if geojson is not None:
        write_tissue_geojson(geojson, tm.mask, tm.scale)
    if artifacts_out is not None:
        _write_artifact_map(artifacts_out, tm)
    log.info("tissue: %.1f %% of %s at %.2f µm/px -> %s",
             100 * tm.mask.mean(), s.name, tm.mpp, out)
    if tm.exclusion is not None:
        log.info("exclusion: %s", json.dumps(tm.exclusion.report(tm.mpp)))
        if tm.excluded_share > params.max_excluded_share:
            log.warning("warning: exclusion removed %.0f %% of the tissue",
                        100 * tm.excluded_share)


def _write_artifact_map(path: Path, tm: TissueMask) -> None:
    """The artefact class map (PNG) and each class's area (.json beside it)."""
    from ..encoding import encode_image
    from ..qc import artifact_map

    image, areas = artifact_map(tm)
    atomic_write_bytes(path, encode_image(image))
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(areas, indent=2).encode())


@app.command()
def plan(
    slide: SlideArg,
    out: Annotated[Path, typer.Option(help="coords file: .h5 (CLAM), .csv, .geojson or .json")],
    h5_format: Annotated[str, typer.Option(help="h5 flavour: clam or wsinfer.")] = "clam",
    overlay: Annotated[Path | None, typer.Option(help="Thumbnail PNG with the patches.")] = None,
    strategy: StrategyO = StrategyOpt.grid, mpp: MppO = None, magnification: MagO = None,
    size: SizeO = None, overlap: OverlapO = 0.0, min_tissue: MinTissueO = 0.5,
    n_patches: NO = None, seed: SeedO = 0, tissue_mpp: TissueMppO = None,
    method: MethodO = MethodOpt.auto, segmenter_weights: SegmenterWeightsO = None,
    exclude_artifacts: ExcludeArtifactsO = None, artifact_weights: ArtifactWeightsO = None,
    artifact_model: ArtifactModelO = "grandqc-artifacts",
    max_excluded_share: MaxExcludedO = 0.5, strict_exclusion: StrictExclusionO = False,
    roi: RoiO = None, mask: MaskO = None,
    backend: BackendO = BackendOpt.auto, mpp_override: MppOverrideO = None,
    variant: VariantO = VariantOpt.report,
    messages: Annotated[Path | None, typer.Option(
        help="medgemma: also write a ready-to-send /v1/chat/completions body (JSON) for "
             "the bag: prompt first, then the patches as JPEG data URIs.")] = None,
    prompt: PromptO = None, vlm_model: VlmModelO = DEFAULT_MODEL,
) -> None:
    """Plan patches (coordinates only) and write them."""
    params = _plan_params(strategy, mpp, magnification, size, overlap, min_tissue, n_patches,
                          seed, tissue_mpp, method, variant, segmenter_weights, ExclusionArgs(
                              exclude_artifacts, artifact_weights, artifact_model,
                              max_excluded_share, strict_exclusion))
    write = _plan_writer(out, h5_format)  # every output checked before any work
    if messages is not None and strategy is not StrategyOpt.medgemma:
        raise InvalidRequestError("--messages exports the MedGemma bag: --strategy medgemma")
    with _open(slide, backend, mpp_override) as s:
        p, tm = _build_plan(s, params, roi, mask)  # planned once, for every output
        write(out, p, s)
        if overlay is not None:
            write_overlay_png(overlay, s.thumbnail(max_size=2048), p, tm.mask)
        if messages is not None:
            write_messages(messages, s, p, model=vlm_model, prompt=prompt or DEFAULT_PROMPT)
    log.info("plan: %d patches, %s (%s, %.3f µm/px, %d px) -> %s", len(p), _counts(p),
             p.strategy, p.target_mpp, p.patch_size_px, out)
    if note := p.note():
        log.warning("warning: %s", note)


def _counts(p: PatchPlan) -> str:
    """The plan's counts named for what they are (a MedGemma bag also holds fill cells)."""
    above = f"{p.n_candidates} grid cells reach min_tissue_fraction"
    filled = int(p.selection.get("n_filled", 0) or 0)
    return f"{above}, {filled} more filled by tissue rank" if filled else above


PlanWriter = Callable[[Path, PatchPlan, Slide], None]
_PLAN_WRITERS: dict[str, PlanWriter] = {
    ".csv": lambda out, p, s: write_csv(out, p),
    ".geojson": lambda out, p, s: write_geojson(out, p, slide_key=s.fingerprint),
    ".json": lambda out, p, s: atomic_write_bytes(out, json.dumps(p.to_dict()).encode()),
}
_H5_WRITERS: dict[str, PlanWriter] = {
    "clam": write_clam_h5, "wsinfer": lambda out, p, s: write_wsinfer_h5(out, p)}


def _plan_writer(out: Path, h5_format: str) -> PlanWriter:
    """The writer for ``out``'s suffix; a wrong suffix or h5 flavour is refused now."""
    suffix = out.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        if h5_format not in _H5_WRITERS:
            raise InvalidRequestError(f"--h5-format must be clam or wsinfer, not {h5_format}")
        return _H5_WRITERS[h5_format]
    if suffix not in _PLAN_WRITERS:
        raise InvalidRequestError(f"{out}: unknown output type (.h5, .csv, .geojson, .json)")
    return _PLAN_WRITERS[suffix]


@app.command()
def patches(
    slide: SlideArg,
    out: Annotated[Path, typer.Option(help="Folder for the patch images and index.csv.")],
    image_format: Annotated[ImageFormat, typer.Option(
        "--format", help="png (lossless) or jpeg (stored JPEG tiles as they are where a "
        "patch is one).")] = ImageFormat.png,
    strategy: StrategyO = StrategyOpt.grid, mpp: MppO = None, magnification: MagO = None,
    size: SizeO = None, overlap: OverlapO = 0.0, min_tissue: MinTissueO = 0.5,
    n_patches: NO = None, seed: SeedO = 0, tissue_mpp: TissueMppO = None,
    method: MethodO = MethodOpt.auto, segmenter_weights: SegmenterWeightsO = None,
    exclude_artifacts: ExcludeArtifactsO = None, artifact_weights: ArtifactWeightsO = None,
    artifact_model: ArtifactModelO = "grandqc-artifacts",
    max_excluded_share: MaxExcludedO = 0.5, strict_exclusion: StrictExclusionO = False,
    roi: RoiO = None, mask: MaskO = None,
    backend: BackendO = BackendOpt.auto, mpp_override: MppOverrideO = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    overwrite: Annotated[bool, typer.Option(
        help="Replace the patches of an earlier run in OUT (default: OUT must be empty).")
    ] = False,
    stain_normalize: Annotated[StainOpt | None, typer.Option(
        help="Normalise each patch's stain first: macenko or vahadane (built-in H&E "
             "reference or --stain-reference), reinhard (needs --stain-reference).",
        show_default=False)] = None,
    stain_reference: Annotated[Path | None, typer.Option(
        help="The image whose stain --stain-normalize matches (PNG, JPEG, TIFF).")] = None,
    stain_augment: Annotated[float | None, typer.Option(
        help="HED colour jitter for training sets (Tellez et al. 2018): each stain scaled "
             "by 1 ± this and shifted by ± this, drawn per patch (0.05 light, 0.2 strong).",
        show_default=False)] = None,
    augment_seed: Annotated[int, typer.Option(
        help="Seed of --stain-augment's draws: same seed, same patches.")] = 0,
) -> None:
    """Extract planned patches as image files plus index.csv, overlay and run metadata."""
    transform = _patch_transform(stain_normalize, stain_reference, stain_augment,
                                 augment_seed)
    params = _plan_params(strategy, mpp, magnification, size, overlap, min_tissue, n_patches,
                          seed, tissue_mpp, method, segmenter_weights=segmenter_weights,
                          exclusion=ExclusionArgs(exclude_artifacts, artifact_weights,
                                                  artifact_model, max_excluded_share,
                                                  strict_exclusion))
    _claim_patch_folder(out, overwrite)
    started = time.perf_counter()
    with _open(slide, backend, mpp_override) as s:
        p, tm = _build_plan(s, params, roi, mask)
        if note := p.note():
            log.warning("warning: %s", note)
        planned = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        ext = ".png" if image_format is ImageFormat.png else ".jpg"
        _write_patch_files(Extractor(s, p), out, ext, quiet, transform)
        write_csv(out / "index.csv", p, {"file": [f"{i:06d}{ext}" for i in range(len(p))]})
        write_overlay_png(out / "overlay.png", s.thumbnail(max_size=2048), p, tm.mask)
        write_mask_png(out / "tissue_mask.png", tm.mask)
        config = params.to_dict() | {"stain_normalize": stain_normalize and stain_normalize.value,
                                      "stain_augment": stain_augment,
                                      "augment_seed": augment_seed if stain_augment else None}
        meta = run_metadata(slide=s, plan=p, config=config, timings_s={
            "plan": planned - started, "extract": time.perf_counter() - planned})
        write_metadata_json(out / "run_metadata.json", meta)
    log.info("patches: %d written to %s", len(p), out)


_PATCH_RUN_FILES = re.compile(r"^(\d{6}\.(png|jpg)|index\.csv|overlay\.png|tissue_mask\.png"
                              r"|run_metadata\.json)$")


def _claim_patch_folder(out: Path, overwrite: bool) -> None:
    """``out`` must be empty (it could hold another slide's patches, which this run would
    partly overwrite); with ``overwrite`` the files of an earlier run are removed first."""
    if not out.exists():
        return
    if not out.is_dir():
        raise InvalidRequestError(f"--out {out} is a file, not a folder")
    present = list(out.iterdir())
    if present and not overwrite:
        raise InvalidRequestError(f"--out {out} is not empty ({len(present)} entries, maybe "
                                  "another slide's patches): use an empty folder or "
                                  "--overwrite")
    for entry in present:
        if entry.is_file() and _PATCH_RUN_FILES.match(entry.name):
            entry.unlink()


def _patch_transform(method: StainOpt | None, reference: Path | None, sigma: float | None,
                     seed: int) -> PatchTransform | None:
    """Stain normalisation then augmentation, as the ``patches`` options ask (or None)."""
    from ..stain import StainNormalizer, load_stain_reference
    from ..stain_augment import StainAugmenter

    if reference is not None and method is None:
        raise InvalidRequestError("--stain-reference goes with --stain-normalize")
    steps: list[PatchTransform] = []
    if method is not None:
        image = None
        if reference is not None:
            if not reference.is_file():
                raise InvalidRequestError(f"--stain-reference {reference}: no such file")
            image = load_stain_reference(reference)
        normalizer = StainNormalizer(method.value, image)
        steps.append(lambda images, indices: normalizer(images))
    if sigma is not None:
        steps.append(StainAugmenter(sigma, seed=seed))
    if not steps:
        return None

    def transform(images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        for step in steps:
            images = step(images, indices)
        return images

    return transform


def _write_patch_files(extractor: Extractor, out: Path, ext: str, quiet: bool,
                       transform: PatchTransform | None = None) -> None:
    show = not quiet and sys.stderr.isatty()
    columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with Progress(*columns, disable=not show, transient=True) as progress, \
            ThreadPoolExecutor(default_threads(), thread_name_prefix="wsi-encode") as pool:
        task = progress.add_task("patches", total=len(extractor.plan))
        for indices, images in encoded_batches(extractor, ext, pool, transform=transform):
            for i, data in zip(indices, images, strict=True):
                atomic_write_bytes(out / f"{i:06d}{ext}", data)
            progress.advance(task, len(indices))


@app.command("demo-slide")
def demo_slide(
    out: Annotated[Path, typer.Argument(help="Path of the .svs file to write.")],
    width: Annotated[int, typer.Option(help="Level-0 width in px.")] = 16_000,
    height: Annotated[int, typer.Option(help="Level-0 height in px.")] = 12_000,
    mpp: Annotated[float, typer.Option(help="Level-0 µm/px.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of the generated tissue, pen marks and "
                                      "artefact: same seed, same slide.")] = 0,
    pen: Annotated[bool, typer.Option(help="Draw blue and green pen strokes.")] = True,
    artefact: Annotated[bool, typer.Option(help="Draw a black artefact.")] = True,
) -> None:
    """Write a generated pyramidal JPEG Aperio SVS with tissue, for demos and tests."""
    spec = DemoSlideSpec(width=width, height=height, mpp=mpp, seed=seed, pen=pen,
                         artefact=artefact)
    if sys.stderr.isatty():
        with Progress("[progress.description]{task.description}", BarColumn(),
                      MofNCompleteColumn(), TimeRemainingColumn(), transient=True) as bar:
            task = bar.add_task("writing tiles", total=tile_count(spec))
            write_demo_slide(out, spec, progress=lambda done, _: bar.update(task,
                                                                             completed=done))
    else:
        write_demo_slide(out, spec)
    log.info("demo slide %dx%d at %.3f µm/px -> %s", width, height, mpp, out)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface (default from config).")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default from config).")] = None,
    config: Annotated[
        Path | None, typer.Option(help="TOML file with a \\[service] table (WSI_CONFIG).")
    ] = None,
) -> None:
    """Start the REST API (settings: WSI_* env over configs/default.toml)."""
    import os

    import uvicorn
    from pydantic import ValidationError

    from api.app import create_app  # servers live in api/, loaded on demand
    from api.config import load_settings

    from .._io import require_writable_folder

    if config is not None:
        os.environ["WSI_CONFIG"] = str(config)
    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    try:
        settings = load_settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidRequestError(f"invalid settings: {problems}") from None
    except (ValueError, OSError) as exc:
        raise InvalidRequestError(f"invalid settings: {exc}") from None
    require_writable_folder(settings.data_dir, "the data folder (data_dir, WSI_DATA_DIR)")
    base = f"http://{settings.host}:{settings.port}"
    log.info("wsi-sampler API on %s  -  interactive docs: %s/docs", base, base)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


register_vlm_commands(app)
register_score_commands(app)
register_model_commands(app)
register_deidentify_commands(app)
register_predict_commands(app)
register_qc_commands(app)


def _log_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    # Objects of damaged files finalised at exit (tiffslide's zarr stores, their event
    # loops) report errors nobody can act on; the one-line error already said what failed.
    log.debug("ignored at shutdown: %s", unraisable.exc_value)


def main() -> None:
    """Console entry point: run the app, turning user mistakes into one-line errors."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # tifffile logs every damaged structure it meets; the translated error says it once.
    for noisy in ("tifffile", "asyncio", "zarr", "fsspec", "pydicom", "wsidicom"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    # httpx logs every request at INFO (a remote worker: one line per batch); botocore says
    # where it found S3 credentials, at INFO too; openai says "Retrying request in …".
    for chatty in ("httpx", "httpcore", "openai", "botocore", "aiobotocore", "s3fs", "urllib3"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    sys.unraisablehook = _log_unraisable
    # zarr abandons its read coroutines when a damaged tile fails; Python then warns about
    # each at exit, after our one-line error.
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                            category=RuntimeWarning)
    try:
        app()
    except WsiSamplerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_USER_ERROR) from None
    except OSError as exc:
        typer.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
        raise SystemExit(EXIT_USER_ERROR) from None
