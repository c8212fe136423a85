"""Request and response bodies of the sampler API (the OpenAPI schema comes from these)."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any, Literal, get_args

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from wsi_sampler import PlanParams, medgemma_params
from wsi_sampler.errors import InvalidRequestError
from wsi_sampler.medgemma import MEDGEMMA_PATCH_PX
from wsi_sampler.tissue import CLASSICAL_METHODS, DEEP_METHODS, TissueParams
from wsi_sampler.types import TissueMethod
from wsi_sampler.units import PATCH_MPP_RANGE, SLIDE_MPP_RANGE, TISSUE_MPP_RANGE

__all__ = [
    "ErrorBody",
    "binary_content",
    "JobRequest",
    "JobList",
    "JobStatus",
    "PlanResponse",
    "ReportRequest",
    "SamplingRequest",
    "SlideInfo",
    "SlideList",
    "SlideSummary",
]


ArtifactName = Literal["pen", "dark", "fold", "dark_spot", "air_bubble", "out_of_focus"]
TISSUE_METHOD_HELP = (
    "Tissue detection for this request: auto, brightfield or fluorescence (classical), or "
    "the service's own deep segmenter (hest / hest-fast with HEST's weights, grandqc with "
    "GrandQC's). None = the service's tissue_method")


TissueMethodQ = Annotated[TissueMethod | None, Query(description=TISSUE_METHOD_HELP)]


def with_tissue_method(service: TissueParams, method: TissueMethod | None) -> TissueParams:
    """The service's tissue settings detecting with ``method`` (None: as they are). A deep
    segmenter needs its weights, so only the service's own (HEST's weights serve hest and
    hest-fast); a classical method drops the segmenter and keeps the exclusion."""
    if method is None or method == service.method:
        return service
    if method in CLASSICAL_METHODS:
        return replace(service, method=method, segmenter_weights=None)
    if service.segmenter_weights and DEEP_METHODS.get(service.method) == DEEP_METHODS[method]:
        return replace(service, method=method)
    raise InvalidRequestError(
        f"tissue_method {method!r} needs {DEEP_METHODS[method]}, which this service does not "
        f"have (its tissue_method is {service.method!r}): ask for "
        f"{', '.join(CLASSICAL_METHODS)}, or configure tissue_method and segmenter_weights "
        "(WSI_TISSUE_METHOD, WSI_SEGMENTER_WEIGHTS)")


GEOJSON_CONTENT: dict[str, Any] = {"application/geo+json": {"schema": {
    "type": "object", "required": ["type", "features"],
    "properties": {"type": {"const": "FeatureCollection"},
                   "features": {"type": "array", "items": {"type": "object"}}}}}}
"""OpenAPI ``content`` of a GeoJSON FeatureCollection answer (:mod:`wsi_sampler.geojson`)."""


def binary_content(*media_types: str) -> dict[str, dict[str, Any]]:
    """OpenAPI ``content`` of a non-JSON response: bytes (``format: binary``) in each media
    type, which client generators turn into a file / bytes result instead of dropping it."""
    return {m: {"schema": {"type": "string", "format": "binary"}} for m in media_types}


class ErrorBody(BaseModel):
    error: str
    detail: list[dict[str, Any]] | None = None


class SlideSummary(BaseModel):
    id: str = Field(description="Opaque, stable id.")
    name: str
    path: str = Field(description="Path relative to its slide root (a DICOMweb series: "
                                  "studies/<study UID>/series/<series UID>).")
    format: str
    size_bytes: int | None = Field(description="File size; null for a DICOMweb series.")
    source: Literal["local", "s3", "dicomweb"] = Field(
        "local", description="Where the slide lives: a local folder, an S3 prefix, or a "
                             "DICOMweb server.")
    uploaded: bool = Field(False, description="An upload (DELETE /v1/slides/{id} removes "
                                              "it); the other slides are not deletable here")


class RootError(BaseModel):
    source: Literal["s3", "dicomweb"]
    root: int = Field(description="Position of the root in remote_slide_roots (0-based).")
    error: str = Field(description="Why its last listing failed; its slides are those of "
                                   "the last listing that worked (none if none did).")


class SlideList(BaseModel):
    items: list[SlideSummary]
    total: int
    offset: int
    limit: int
    unavailable_roots: list[RootError] = Field(
        default_factory=list, description="Remote roots whose last listing failed.")


class SlideInfo(BaseModel):
    id: str
    name: str
    format: str
    width: int
    height: int
    level_count: int
    level_dimensions: list[list[int]]
    level_downsamples: list[float]
    mpp_x: float | None
    mpp_y: float | None
    objective_power: float | None
    vendor: str | None
    backend: str
    associated_images: list[str]
    fingerprint: str


# What the medgemma preset fixes: a request may repeat these values (or send the field's
# plain default, as generated clients do); any other value contradicts the preset. Its
# tissue mask resolution is the request's tissue_mpp (8 µm/px by default, 2.0 = the recipe's
# 5x mask exactly).
_MEDGEMMA_FIXED: dict[str, object] = {"patch_size_px": MEDGEMMA_PATCH_PX, "overlap": 0.0,
                                      "target_mpp": None}


_NUMBERS = (int, float)


def _is_number_field(annotation: object) -> bool:
    return annotation in _NUMBERS or any(a in _NUMBERS for a in get_args(annotation))


class JsonRequest(BaseModel):
    """A request body whose numbers are JSON numbers: pydantic alone reads ``{"seed":
    false}`` as 0 and ``"5"`` as 5; here a boolean or a string for a number is a 422."""

    @field_validator("*", mode="before")
    @classmethod
    def _json_numbers(cls, value: object, info: ValidationInfo) -> object:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and isinstance(value, (bool, str)) and \
                _is_number_field(field.annotation):
            raise ValueError(f"expected a JSON number, got {type(value).__name__}")
        return value


class SamplingRequest(JsonRequest):
    """What to sample. Sizes are physical (µm/px, magnification) or px at that resolution.
    ``target_mpp`` and ``magnification`` name the same thing: give one of them at most."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "not": {"required": ["target_mpp", "magnification"]}})
    strategy: Literal["grid", "random", "stratified", "medgemma"] = "grid"
    patch_size_px: int = Field(256, ge=8, le=8192)
    target_mpp: float | None = Field(None, ge=PATCH_MPP_RANGE[0], le=PATCH_MPP_RANGE[1])
    magnification: float | None = Field(None, ge=10 / PATCH_MPP_RANGE[1],
                                        le=10 / PATCH_MPP_RANGE[0])
    overlap: float = Field(0.0, ge=0, lt=1)
    min_tissue_fraction: float = Field(0.5, ge=0, le=1)
    n_patches: int | None = Field(None, ge=1, le=10_000_000,
                                  description="random/stratified: how many; medgemma: the cap")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    tissue_mpp: float = Field(8.0, ge=TISSUE_MPP_RANGE[0], le=TISSUE_MPP_RANGE[1])
    mpp_override: float | None = Field(
        None, ge=SLIDE_MPP_RANGE[0], le=SLIDE_MPP_RANGE[1],
        description="µm/px for slides without MPP metadata")
    medgemma_variant: Literal["report", "notebook"] = Field(
        "report", description="medgemma: 'report' (technical report: magnification drawn "
        "5x/10x/20x, at most 126, spatial order) or 'notebook' (Google's public notebook: "
        "10x, at most 125, random.sample order)")
    exclude_artifacts: list[ArtifactName] | None = Field(
        None, max_length=8, description="Artefact classes to drop: pen, dark (classical); "
        "fold, dark_spot, pen, air_bubble, out_of_focus where the service has an artefact "
        "model (artifact_weights). None = the service's default")
    max_excluded_share: float | None = Field(
        None, ge=0, le=1, description="When exclusion removes more of the tissue than this "
        "(or all of it), the plan keeps the patches it would drop, marked excluded, and says "
        "so in message. None = the service's default (0.5)")
    strict_exclusion: bool = Field(False, description="Drop excluded patches whatever the "
                                   "share (the plan may be empty)")
    tissue_method: TissueMethod | None = Field(None, description=TISSUE_METHOD_HELP)

    def tissue_params(self, service: TissueParams | None = None) -> TissueParams:
        """The service's tissue settings with this request's method and exclusion choices."""
        base = with_tissue_method(service or TissueParams(), self.tissue_method)
        return replace(
            base, strict_exclusion=self.strict_exclusion,
            exclude_artifacts=(tuple(self.exclude_artifacts) if self.exclude_artifacts
                               is not None else base.exclude_artifacts),
            max_excluded_share=(self.max_excluded_share if self.max_excluded_share
                                is not None else base.max_excluded_share))

    def _medgemma_conflicts(self) -> list[str]:
        fields = type(self).model_fields
        return sorted(
            f"{name}={getattr(self, name)!r}" for name, preset in _MEDGEMMA_FIXED.items()
            if name in self.model_fields_set
            and getattr(self, name) not in (preset, fields[name].default)
        )

    def to_params(self, tissue: TissueParams | None = None) -> PlanParams:
        """The plan parameters (``tissue``: the service's tissue settings)."""
        exclusion = self.tissue_params(tissue)
        if self.strategy == "medgemma":
            conflicts = self._medgemma_conflicts()
            if conflicts:
                raise InvalidRequestError(
                    f"the medgemma preset fixes 896 px patches and no overlap; "
                    f"{', '.join(conflicts)} contradicts it. Choose its magnification "
                    "with 'magnification' and its cap with 'n_patches'"
                )
            return replace(medgemma_params(
                seed=self.seed, magnification=self.magnification, max_patches=self.n_patches,
                min_tissue_fraction=self.min_tissue_fraction, variant=self.medgemma_variant,
                tissue_mpp=self.tissue_mpp,
            ), tissue=exclusion)
        return PlanParams(
            strategy=self.strategy, patch_size_px=self.patch_size_px, target_mpp=self.target_mpp,
            magnification=self.magnification, overlap=self.overlap,
            min_tissue_fraction=self.min_tissue_fraction, n_patches=self.n_patches,
            seed=self.seed, tissue_mpp=self.tissue_mpp, tissue=exclusion,
        )


class ReportRequest(JsonRequest):
    """A slide's MedGemma bag, described by the configured vision-language model."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=20_000,
                        description="Text sent before the bag's images")
    system_prompt: str | None = Field(None, max_length=20_000)
    medgemma_variant: Literal["report", "notebook"] = "report"
    seed: int = Field(0, ge=0, le=2**32 - 1)
    magnification: float | None = Field(None, ge=10 / PATCH_MPP_RANGE[1],
                                        le=10 / PATCH_MPP_RANGE[0])
    n_patches: int | None = Field(None, ge=1, le=1000, description="Cap of the bag")
    min_tissue_fraction: float = Field(0.5, ge=0, le=1)
    mpp_override: float | None = Field(None, ge=SLIDE_MPP_RANGE[0], le=SLIDE_MPP_RANGE[1])
    image_format: Literal["jpeg", "png"] = "jpeg"
    max_tokens: int | None = Field(None, ge=1, le=32_768)
    tissue_method: TissueMethod | None = Field(None, description=TISSUE_METHOD_HELP)

    def to_params(self, tissue: TissueParams | None = None) -> PlanParams:
        """The bag's plan (``tissue``: the service's tissue settings, as plans use them)."""
        return replace(medgemma_params(seed=self.seed, magnification=self.magnification,
                                       max_patches=self.n_patches,
                                       min_tissue_fraction=self.min_tissue_fraction,
                                       variant=self.medgemma_variant),
                       tissue=with_tissue_method(tissue or TissueParams(), self.tissue_method))


class PatchRequest(SamplingRequest):
    image_format: Literal["png", "jpeg", "raw"] = Field(
        "png", description="png (lossless), jpeg or raw: uint8 (H, W, 3) RGB arrays as .npy "
        "(no encoding; for machines feeding a model). jpeg: a patch that is exactly one "
        "stored JPEG tile (native level, tile-aligned, patch size = tile size) is that tile "
        "as the scanner stored it (decodes to the raw patch); other patches are encoded at "
        "quality 95")


class PlannedPatch(BaseModel):
    x0: int
    y0: int
    tissue_fraction: float
    excluded: bool | None = Field(
        None, exclude_if=lambda v: v is None,  # absent, not null, on the usual plan
        description="Present when artefact exclusion removed more than "
        "max_excluded_share of the tissue: the plan then keeps the patches it would have "
        "dropped, and marks them true (see selection.exclusion)")


class PlanResponse(BaseModel):
    slide_id: str
    strategy: str
    seed: int
    magnification: float | None
    target_mpp: float
    patch_size_px: int
    width0: int
    height0: int
    level: int
    downsample: float
    n_candidates: int = Field(description="Grid cells reaching min_tissue_fraction")
    n_patches: int
    selection: dict[str, Any] = Field(
        description="How the patches were chosen: 'rule' (min_tissue_fraction, "
        "filled_by_tissue_rank, edge_cells or no_tissue), n_above_threshold, n_filled; and "
        "'exclusion' when artefact exclusion removed tissue: detector, classes, "
        "tissue_mm2_before / _after, excluded_share, excluded_mm2 and found_mm2 per class, "
        "max_excluded_share, strict, kept_marked, n_marked")
    message: str | None = Field(None, description="Set when the plan is empty, holds "
                                "fewer patches than n_patches asked, or exclusion removed "
                                "more than max_excluded_share of the tissue, saying why")
    patches: list[PlannedPatch]


class SlidePredictionRequest(SamplingRequest):
    """A slide-level answer: the slide's patches through the service's encoder, their bag
    through the slide models. Patch size and MPP are the encoder's."""

    slide_models: list[str] | None = Field(
        None, min_length=1, max_length=16,
        description="Names of configured slide models (GET /v1/slide-models); none = all")
    include_attention: bool = Field(
        False, description="Add each patch's raw attention (and its coordinates) to the "
        "result records")


class SlideModelInfo(BaseModel):
    name: str
    version: str
    architecture: str
    class_names: list[str]
    patch_encoder: str
    attention: bool = Field(description="Whether the model scores each patch (heatmaps)")
    description: str = ""


class SlideModelList(BaseModel):
    slide_models: list[SlideModelInfo]


class JobRequest(JsonRequest):
    model_config = ConfigDict(extra="forbid")
    slides: list[str] = Field(min_length=1, max_length=10_000, description="Slide ids.")
    sampling: SamplingRequest = SamplingRequest()
    slide_models: list[str] = Field(
        default_factory=list, max_length=16, description="Slide models to answer with as "
        "well (their <slide id>.<model>.slide.json, .attention.h5, .heatmap.png, "
        ".attention.geojson and .patches.tar join the results)")
    report: ReportRequest | None = Field(
        None, description="Describe each slide's MedGemma bag with the configured "
                          "vision-language model (result: <slide id>.report.json) instead of "
                          "scoring it with the patch model")


class JobError(BaseModel):
    slide: str
    error: str
    message: str


class JobResult(BaseModel):
    name: str
    media_type: str
    url: str
    slide_id: str = ""
    slide_name: str = Field("", description="The slide's name as listed (its pseudonym in "
                                            "de-identified mode)")


class JobNote(BaseModel):
    slide: str
    message: str = Field(description="What a slide's result says that a reader must know, "
                                     "e.g. why its plan holds no patch")


class JobStatus(BaseModel):
    id: str
    state: Literal["queued", "running", "succeeded", "partial", "failed", "cancelled",
                   "interrupted"]
    created: float
    updated: float
    slides_total: int
    slides_done: int
    patches_done: int
    errors: list[JobError]
    results: list[JobResult]
    notes: list[JobNote] = Field(default_factory=list)
    slides_complete: list[str] = Field(
        default_factory=list, description="Slides whose results are all written (a cancelled "
        "or interrupted job keeps these; the others have none)")


class JobList(BaseModel):
    items: list[JobStatus]
    total: int
