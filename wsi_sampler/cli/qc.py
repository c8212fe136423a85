"""``wsi-sampler qc SLIDE``: the slide's quality-control summary (JSON) and overlay (PNG).
Registered onto the main app by :mod:`wsi_sampler.cli.main`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from .._io import atomic_write_text
from .options import (
    ArtifactModelO,
    ArtifactWeightsO,
    BackendO,
    BackendOpt,
    ExcludeArtifactsO,
    ExclusionArgs,
    MethodO,
    MethodOpt,
    MppOverrideO,
    SegmenterWeightsO,
    SlideArg,
    tissue_params,
)

__all__ = ["register"]

log = logging.getLogger("wsi_sampler")

JsonO = Annotated[Path | None, typer.Option("--out", help="Also write the summary here (JSON).")]
OverlayO = Annotated[Path | None, typer.Option(
    help="The QC overlay PNG: tissue green, removed by the exclusion red; ink magenta and dark "
         "blue, or with --artifact-weights fold orange, dark spot blue, pen magenta, air "
         "bubble cyan, out of focus yellow.")]


GeoJsonO = Annotated[Path | None, typer.Option(
    "--geojson", help="What QC found as QuPath annotations: the tissue and each class the "
    "overlay draws, with its area (GeoJSON, level-0 px).")]


def qc(slide: SlideArg, out: JsonO = None, overlay: OverlayO = None, geojson: GeoJsonO = None,
       tissue_mpp: Annotated[float, typer.Option(help="Mask resolution in µm/px.")] = 8.0,
       method: MethodO = MethodOpt.auto, segmenter_weights: SegmenterWeightsO = None,
       exclude_artifacts: ExcludeArtifactsO = None,
       artifact_weights: ArtifactWeightsO = None,
       artifact_model: ArtifactModelO = "grandqc-artifacts",
       backend: BackendO = BackendOpt.auto, mpp_override: MppOverrideO = None) -> None:
    """Tissue and artefact areas, patch blur/pen/dark/stain measures and the stain vectors,
    printed as JSON (what was removed, and why, on the overlay)."""
    from ..encoding import encode_image
    from ..geojson import dumps
    from ..qc import draw_qc_overlay, qc_collection, slide_qc
    from ..slide import open_slide

    params = tissue_params(method, segmenter_weights, ExclusionArgs(
        exclude_artifacts, artifact_weights, artifact_model))
    with open_slide(slide, backend=backend.value, mpp_override=mpp_override) as s:
        summary, masks = slide_qc(s, tissue_mpp=tissue_mpp, params=params)
        if overlay is not None:
            png = encode_image(draw_qc_overlay(s.thumbnail(max_size=2048), masks))
            overlay.write_bytes(png)
    if geojson is not None:
        atomic_write_text(geojson, dumps(qc_collection(masks)))
    text = json.dumps(summary.to_dict(), indent=2)
    if out is not None:
        atomic_write_text(out, text + "\n")
    typer.echo(text)
    for warning in summary.warnings:
        log.warning("warning: %s", warning)


def register(app: typer.Typer) -> None:
    app.command("qc")(qc)
