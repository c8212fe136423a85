"""``wsi-sampler predict-slide``: slide-level answers (probabilities, attention, heatmaps)
from slides or existing feature bags. Registered onto the main app by
:mod:`wsi_sampler.cli.main`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import InvalidRequestError, WsiSamplerError
from .options import (
    DeviceO,
    DeviceOpt,
    MppOverrideO,
    PrecisionO,
    RandomWeightsO,
    SlideModelO,
    SlideWeightsO,
    WeightsO,
)

if TYPE_CHECKING:
    from ..slide_models import HeatmapOptions, SlideModel
    from ..slide_models.predict import InputItem
    from ..worker import Worker

__all__ = ["load_slide_models", "register"]

log = logging.getLogger("wsi_sampler")
EXIT_FAILURES = 3

InputsA = Annotated[list[str], typer.Argument(
    show_default=False, help="Slide files, folders (their slides and feature bags), URLs "
    "(https://, s3://, dicomweb://) or feature bags (.h5: ours, TRIDENT's, CLAM's; CLAM's .pt).")]
EncoderO = Annotated[str | None, typer.Option(
    "--model", "-m", help="The patch encoder for slides [default: the slide model's "
    "patch_encoder].", show_default=False)]
OutO = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
TopKO = Annotated[int, typer.Option(help="Top-k and bottom-k attended patches kept as PNGs.",
                                    min=0, max=1000)]
ColormapO = Annotated[str, typer.Option(help="Heatmap colours: jet (CLAM's) or viridis.")]
AlphaO = Annotated[float, typer.Option(help="Heatmap opacity over the slide (CLAM: 0.4).",
                                       min=0.0, max=1.0)]
BlurO = Annotated[bool, typer.Option(help="Gaussian-blur the heatmap (CLAM's blur).")]


def load_slide_models(
    specs: list[str] | None, weights: list[Path] | None, *, random_weights: bool,
    device: str,
) -> list[SlideModel]:
    """The --slide-model cards with their --slide-weights, paired in order."""
    from ..slide_models import load_slide_model

    specs, weights = specs or [], weights or []
    if not specs:
        raise InvalidRequestError("give --slide-model CARD.json (a slide model card)")
    if weights and len(weights) != len(specs):
        raise InvalidRequestError(
            f"{len(specs)} --slide-model but {len(weights)} --slide-weights: give one "
            "checkpoint per slide model, in the same order (or none, to use each card's file)")
    checkpoints: list[Path | None] = list(weights) if weights else [None] * len(specs)
    paired = zip(specs, checkpoints, strict=True)
    return [load_slide_model(s, weights=w, device=device, allow_random_weights=random_weights)
            for s, w in paired]


def _encoder_spec(model: str | None, slide_model: SlideModel) -> str:
    if model is not None:
        return model
    enc = slide_model.card.patch_encoder
    if isinstance(enc, str):
        return enc
    raise InvalidRequestError(f"slide model {slide_model.name!r} describes its encoder inline: "
                              "give it as --model CARD.json")


def predict_slide_command(
    inputs: InputsA, slide_model: SlideModelO = None, slide_weights: SlideWeightsO = None,
    out: OutO = Path("predictions"), model: EncoderO = None, weights: WeightsO = None,
    random_weights: RandomWeightsO = False, device: DeviceO = DeviceOpt.auto,
    precision: PrecisionO = None, mpp_override: MppOverrideO = None, top_k: TopKO = 15,
    colormap: ColormapO = "jet", alpha: AlphaO = 0.4, blur: BlurO = False,
) -> None:
    """Slide-level answers: each input's class probabilities, raw attention (attention.h5),
    a CLAM-style heatmap, QuPath GeoJSON and the top/bottom attended patches. Slides are
    encoded first (their features.h5 is kept); feature bags go straight to the slide
    models. Exit 0 if every input succeeded, 3 if any failed."""
    from ..slide_models import HeatmapOptions, expand_inputs
    from ..slide_models.heatmap import COLORMAPS

    if colormap not in COLORMAPS:
        raise InvalidRequestError(f"--colormap must be one of {', '.join(COLORMAPS)}")
    models = load_slide_models(slide_model, slide_weights, random_weights=random_weights,
                               device=device.value)
    items = expand_inputs(inputs)
    encoder: Worker | None = None
    if any(i.kind == "slide" for i in items):
        from ..models import preflight
        from ..worker import open_worker

        spec = _encoder_spec(model, models[0])
        preflight(spec, weights, allow_random_weights=random_weights)
        encoder = open_worker(spec, weights=str(weights) if weights else None,
                              device=device.value, allow_random_weights=random_weights,
                              precision=precision.value if precision else None)
    options = HeatmapOptions(colormap=colormap, alpha=alpha, blur=blur, top_k=top_k)
    failed = _run(items, models, out, encoder, options, mpp_override)
    raise typer.Exit(EXIT_FAILURES if failed else 0)


def _run(items: list[InputItem], models: list[SlideModel], out: Path, encoder: Worker | None,
         options: HeatmapOptions, mpp_override: float | None) -> int:
    from ..slide_models import predict_slide

    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for n, item in enumerate(items, 1):
        t0 = time.perf_counter()
        try:
            answer = predict_slide(item.location, models, out, encoder=encoder,
                                   options=options, mpp_override=mpp_override,
                                   progress=_encoding_progress(f"[{n}/{len(items)}]"))
        except (WsiSamplerError, OSError, ValueError) as exc:
            failed += 1
            log.error("[%d/%d] failed: %s: %s", n, len(items), item.location, exc)
            continue
        calls = "; ".join(_call(r) for r in answer.records)
        log.info("[%d/%d] %s: %s (%.1f s)", n, len(items), answer.name, calls,
                 time.perf_counter() - t0)
    log.info("%d of %d inputs answered -> %s", len(items) - failed, len(items), out)
    return failed


def _encoding_progress(prefix: str) -> Callable[[int, int], None]:
    """A log line at every further fifth of a slide's patches encoded (long slides)."""
    shown = [0]

    def report(done: int, total: int) -> None:
        fifth = 5 * done // max(total, 1)
        if fifth > shown[0] and done < total:
            shown[0] = fifth
            log.info("%s encoding: %d of %d patches", prefix, done, total)
    return report


def _call(record: dict[str, Any]) -> str:
    """One answer in a log line: the class and its probability, or the embedding's size."""
    if record["predicted_class"] is None:
        return f"{record['slide_model']}: {record['embedding_dim']}-d slide embedding"
    return (f"{record['slide_model']}: {record['predicted_class']} "
            f"(p = {max(record['probabilities'].values()):.3f})")


def register(app: typer.Typer) -> None:
    app.command("predict-slide")(predict_slide_command)
