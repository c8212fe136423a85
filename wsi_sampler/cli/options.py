"""Option types shared by the ``wsi-sampler`` commands (one place, so every command spells
an option the same way)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..errors import InvalidRequestError
from ..tissue import TissueParams


class BackendOpt(str, Enum):
    auto = "auto"
    openslide = "openslide"
    tiffslide = "tiffslide"


class StrategyOpt(str, Enum):
    grid = "grid"
    random = "random"
    stratified = "stratified"
    medgemma = "medgemma"


class MethodOpt(str, Enum):
    auto = "auto"
    brightfield = "brightfield"
    fluorescence = "fluorescence"
    hest = "hest"
    hest_fast = "hest-fast"
    grandqc = "grandqc"


class StainOpt(str, Enum):
    macenko = "macenko"
    vahadane = "vahadane"
    reinhard = "reinhard"


class WorkerProtocolOpt(str, Enum):
    auto = "auto"
    binary = "binary"
    json = "json"


class ImageFormat(str, Enum):
    png = "png"
    jpeg = "jpeg"


SlideArg = Annotated[str, typer.Argument(
    help="Slide file, DICOM-WSI folder, or URL: https://…, s3://bucket/key, "
         "dicomweb://host/…/studies/<uid>/series/<uid> (see the README).")]
BackendO = Annotated[BackendOpt, typer.Option(help="Reader backend.")]
MppOverrideO = Annotated[
    float | None, typer.Option(help="Level-0 µm/px to use when the slide has no MPP metadata.")
]
StrategyO = Annotated[StrategyOpt, typer.Option(help="Sampling strategy.")]
MppO = Annotated[float | None, typer.Option("--mpp", help="Target µm/px of the patches.")]
MagO = Annotated[
    float | None, typer.Option(help="Target magnification (10x = 1.0 µm/px); medgemma: fixes it.")
]
SizeO = Annotated[int | None, typer.Option("--size", help="Patch side in px at the target MPP.")]
OverlapO = Annotated[float, typer.Option(help="Fraction shared by neighbouring patches.")]
MinTissueO = Annotated[float, typer.Option(help="Minimum tissue fraction of a patch.")]
NO = Annotated[
    int | None, typer.Option("-n", "--n-patches", help="Patches to keep (random, stratified; "
                             "medgemma's cap, default 126).")
]
SeedO = Annotated[int, typer.Option(help="Random seed: same seed, same plan.")]
TissueMppO = Annotated[float | None, typer.Option(help="Tissue-mask resolution in µm/px.")]
MethodO = Annotated[MethodOpt, typer.Option(
    help="Tissue detection method: classical (auto, brightfield, fluorescence) or a deep "
         "segmenter (hest, hest-fast: HEST at 2 µm/px, grandqc; with --segmenter-weights).")]
SegmenterWeightsO = Annotated[Path | None, typer.Option(
    help="--method hest, hest-fast or grandqc: the segmenter's weights (HEST: "
         "deeplabv3_seg_v4.ckpt from huggingface.co/MahmoodLab/hest-tissue-seg; GrandQC: "
         "Tissue_Detection_MPP10.pth from zenodo.org/records/14507273; nothing is "
         "downloaded).")]
RoiO = Annotated[Path | None, typer.Option(help="GeoJSON polygons (level-0 px) to sample within.")]
MaskO = Annotated[
    Path | None,
    typer.Option(help="Tissue mask to use instead of detection: an image covering the whole "
                 "slide (non-zero = tissue) or GeoJSON polygons in level-0 px."),
]


class DeviceOpt(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


ModelO = Annotated[str, typer.Option(
    "--model", "-m",
    help="tissue-qc, a built-in encoder (wsi-sampler models list) or a model card .json.")]
DeviceO = Annotated[DeviceOpt, typer.Option(help="auto = cuda if available, else cpu.")]


class PrecisionOpt(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


PrecisionO = Annotated[PrecisionOpt | None, typer.Option(
    help="Model arithmetic [default: WSI_PRECISION, else auto]. auto = bf16 on a GPU or a CPU "
    "with native bf16 (AVX512-BF16/AMX), else fp32; a lower precision is kept only if its "
    "numerics check against fp32 passes.", show_default=False)]
WeightsO = Annotated[Path | None, typer.Option(
    help="Weights file of the model (.safetensors, .bin, .pth), e.g. the pytorch_model.bin "
         "of a built-in encoder (wsi-sampler models list).")]
RandomWeightsO = Annotated[bool, typer.Option(
    help="Allow a timm model without weights (random weights: tests and benchmarks only).")]


class FeaturesDtypeOpt(str, Enum):
    float32 = "float32"
    float16 = "float16"


FeaturesDtypeO = Annotated[FeaturesDtypeOpt, typer.Option(
    help="Precision of the embeddings in features.h5 and features.pt (encoders). float16 "
    "halves the files, but CLAM's and TRIDENT's MIL code feed them as stored to a float32 "
    "model: keep float32 for them.")]
SlideModelO = Annotated[list[str] | None, typer.Option(
    "--slide-model", help="A slide model card .json (\"kind\": \"slide\"); repeat it for "
    "several heads over one encoder pass.", show_default=False)]
SlideWeightsO = Annotated[list[Path] | None, typer.Option(
    "--slide-weights", help="The checkpoint of each --slide-model, in the same order (CLAM's "
    "s_0_checkpoint.pt, MIL-Lab / TRIDENT state dicts or .safetensors, Lightning .ckpt).",
    show_default=False)]


ExcludeArtifactsO = Annotated[str | None, typer.Option(
    help="Artefact classes plans drop, comma-separated. With --artifact-weights: fold, "
    "dark_spot, pen, air_bubble, out_of_focus (default: all); without: the classical pen, "
    "dark (default: both).", show_default=False)]
ArtifactWeightsO = Annotated[Path | None, typer.Option(
    help="GrandQC's artefact model: GrandQC_MPP1_state_dict.pth from huggingface.co/"
    "MahmoodLab/hest-tissue-seg (run on tissue tiles at 1 µm/px: a GPU model, minutes a "
    "slide on a CPU; nothing is downloaded).", show_default=False)]
ArtifactModelO = Annotated[str, typer.Option(
    help="The artefact model's card: grandqc-artifacts (1 µm/px), grandqc-artifacts-mpp15 or "
    "-mpp2 (GrandQC_MPP15.pth / GrandQC_MPP2.pth), or a segmenter card .json.")]
MaxExcludedO = Annotated[float, typer.Option(
    help="When exclusion removes more of the tissue than this share (or all of it), the plan "
    "warns and keeps the patches it would drop, marked excluded.")]
StrictExclusionO = Annotated[bool, typer.Option(
    help="Drop excluded patches whatever the share (the plan may be empty).")]


@dataclass(frozen=True)
class ExclusionArgs:
    """The artefact-exclusion options as given on the command line."""

    exclude: str | None = None
    weights: Path | None = None
    model: str = "grandqc-artifacts"
    max_share: float = 0.5
    strict: bool = False


def tissue_params(method: MethodOpt, segmenter_weights: Path | None,
                  exclusion: ExclusionArgs | None = None) -> TissueParams:
    """The tissue detection the options ask for (``--segmenter-weights`` only with hest or
    grandqc), with their artefact exclusion."""
    if segmenter_weights is not None and method not in (MethodOpt.hest, MethodOpt.hest_fast,
                                                        MethodOpt.grandqc):
        raise InvalidRequestError("--segmenter-weights goes with --method hest, hest-fast or "
                                  "grandqc "
                                  "(--tissue-method for score)")
    ex = exclusion or ExclusionArgs()
    if ex.weights is not None and not ex.weights.is_file():
        raise InvalidRequestError(f"--artifact-weights {ex.weights}: no such file")
    return TissueParams(method=method.value,
                        segmenter_weights=str(segmenter_weights) if segmenter_weights else None,
                        exclude_artifacts=tuple((ex.exclude or "").split(",")),
                        artifact_weights=str(ex.weights) if ex.weights else None,
                        artifact_model=ex.model, max_excluded_share=ex.max_share,
                        strict_exclusion=ex.strict)
