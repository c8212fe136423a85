"""Command-line surface of the vision-language flow: ``wsi-sampler describe`` and the VLM
options ``score`` and ``plan --messages`` share. Registered onto the main app by
:mod:`wsi_sampler.cli.main`."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .._io import atomic_write_text
from ..errors import EmptyPlanError, InvalidRequestError
from ..plan import PatchPlan, PlanParams, medgemma_params
from ..report import prepare_bag, report_events
from ..slide import Slide, open_slide
from ..worker.vlm import VlmConfig, VlmRequest, VlmWorker
from .options import (
    ArtifactModelO,
    ArtifactWeightsO,
    ExcludeArtifactsO,
    ExclusionArgs,
    MaxExcludedO,
    MethodO,
    MethodOpt,
    SegmenterWeightsO,
    SlideArg,
    StrictExclusionO,
    tissue_params,
)

__all__ = ["VariantOpt", "register", "vlm_config"]

log = logging.getLogger("wsi_sampler")


class VariantOpt(str, Enum):
    report = "report"
    notebook = "notebook"


class ImageEncodingOpt(str, Enum):
    jpeg = "jpeg"
    png = "png"


VlmUrlO = Annotated[str | None, typer.Option(
    help="OpenAI-compatible endpoint serving the model, e.g. http://gpu-box:8000/v1.")]
VlmModelO = Annotated[str, typer.Option(help="Model name the endpoint serves.")]
PromptO = Annotated[str | None, typer.Option(help="Text sent before the bag's images.")]
VariantO = Annotated[VariantOpt, typer.Option(
    help="MedGemma recipe: report (5x/10x/20x drawn, <= 126, spatial order) or notebook "
         "(Google's notebook: 10x, <= 125, random.sample order).")]
DEFAULT_MODEL = "google/medgemma-1.5-4b-it"
DEFAULT_PROMPT = ("These are tissue patches of one whole-slide image, in their spatial order. "
                  "Describe the histopathology you see.")
_UNSENT = "http://127.0.0.1/v1"  # the --messages export builds a request but sends nothing


def vlm_config(url: str, model: str = DEFAULT_MODEL, **overrides: object) -> VlmConfig:
    """A :class:`VlmConfig`; ``None`` overrides keep the defaults."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return VlmConfig(url=url, model=model, **given)  # type: ignore[arg-type]


def bag_params(seed: int, magnification: float | None, n_patches: int | None,
               min_tissue: float, variant: VariantOpt) -> PlanParams:
    return medgemma_params(seed=seed, magnification=magnification, max_patches=n_patches,
                           min_tissue_fraction=min_tissue, variant=variant.value)


def describe(
    slide: SlideArg,
    vlm_url: VlmUrlO = None,
    prompt: PromptO = None,
    vlm_model: VlmModelO = DEFAULT_MODEL,
    system_prompt: Annotated[str | None, typer.Option(help="Optional system message.")] = None,
    variant: VariantO = VariantOpt.report,
    seed: Annotated[int, typer.Option(help="Seed of the magnification draw and sample.")] = 0,
    magnification: Annotated[float | None, typer.Option(help="Fix 5, 10 or 20x.")] = None,
    n_patches: Annotated[int | None, typer.Option("-n", help="Cap of the bag.")] = None,
    min_tissue: Annotated[float, typer.Option(help="Tissue fraction of a full cell.")] = 0.5,
    image_format: Annotated[ImageEncodingOpt, typer.Option(help="Data URI images.")] = (
        ImageEncodingOpt.jpeg),
    max_tokens: Annotated[int | None, typer.Option(help="Longest answer, tokens.")] = None,
    max_images: Annotated[int | None, typer.Option(
        help="Images the endpoint takes per prompt (vLLM --limit-mm-per-prompt).")] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds to wait for the model.")] = None,
    out: Annotated[Path | None, typer.Option(help="Also write report.json here.")] = None,
    mpp_override: Annotated[float | None, typer.Option(help="Level-0 µm/px if missing.")] = None,
    method: MethodO = MethodOpt.auto, segmenter_weights: SegmenterWeightsO = None,
    exclude_artifacts: ExcludeArtifactsO = None, artifact_weights: ArtifactWeightsO = None,
    artifact_model: ArtifactModelO = "grandqc-artifacts",
    max_excluded_share: MaxExcludedO = 0.5, strict_exclusion: StrictExclusionO = False,
) -> None:
    """Send a slide's MedGemma bag to a vision-language model and print its answer as it
    streams (API key from WSI_VLM_API_KEY). The bag is sampled from the tissue that
    --method finds, less the artefacts --exclude-artifacts names, as plan does."""
    if not vlm_url or not prompt:
        raise InvalidRequestError("describe needs --vlm-url and --prompt")
    cfg = vlm_config(vlm_url, vlm_model, system_prompt=system_prompt, max_tokens=max_tokens,
                     max_images=max_images, timeout_s=timeout, image_format=image_format.value)
    params = replace(bag_params(seed, magnification, n_patches, min_tissue, variant),
                     tissue=tissue_params(method, segmenter_weights, ExclusionArgs(
                         exclude_artifacts, artifact_weights, artifact_model,
                         max_excluded_share, strict_exclusion)))
    vlm = VlmWorker(cfg)
    try:
        with open_slide(slide, mpp_override=mpp_override) as s:
            plan = prepare_bag(s, params, vlm, prompt)
            identity = {"slide": s.name, "fingerprint": s.fingerprint}
            bag: dict[str, object] = {}
            for event in report_events(s, plan, vlm, prompt):
                if event["type"] == "bag":
                    bag = {k: v for k, v in event.items() if k != "type"}
                _show(event | identity | ({"bag": bag} if event["type"] == "report" else {}),
                      out)
    finally:
        vlm.close()


def _show(event: dict[str, object], out: Path | None) -> None:
    if event["type"] == "bag":
        log.info("bag: %s patches at %sx (%s)", event["n_patches"], event["magnification"],
                 event["selection"]["rule"])  # type: ignore[index]
    elif event["type"] == "delta":
        sys.stdout.write(str(event["text"]))
        sys.stdout.flush()
    else:
        sys.stdout.write("\n")
        if out is not None:
            atomic_write_text(out, json.dumps(event, indent=2))
            log.info("report -> %s", out)


def write_messages(path: Path, slide: Slide, plan: PatchPlan, *, model: str, prompt: str,
                   image_format: str = "jpeg") -> None:
    """Write a ready-to-send ``/v1/chat/completions`` body for the bag ``plan``."""
    from ..report import encode_bag

    if not len(plan):
        raise EmptyPlanError(f"{slide.name}: {plan.why_empty()}")
    builder = VlmRequest(vlm_config(_UNSENT, model, image_format=image_format))
    builder.check_bag(len(plan), prompt)
    body = builder.request_body(builder.messages(encode_bag(slide, plan, builder), prompt))
    atomic_write_text(path, json.dumps(body))
    log.info("messages: %d images -> %s", len(body["messages"][-1]["content"]) - 1, path)


def register(app: typer.Typer) -> None:
    app.command()(describe)
