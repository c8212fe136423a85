"""Request and response bodies of the sampler API (the OpenAPI schema comes from these)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from wsi_sampler import PlanParams, medgemma_params
from wsi_sampler.errors import InvalidRequestError
from wsi_sampler.plan import MEDGEMMA_MAX_PATCHES
from wsi_sampler.units import PATCH_MPP_RANGE, SLIDE_MPP_RANGE, TISSUE_MPP_RANGE

__all__ = [
    "ErrorBody",
    "JobRequest",
    "JobStatus",
    "PlanResponse",
    "SamplingRequest",
    "SlideInfo",
    "SlideList",
    "SlideSummary",
]


class ErrorBody(BaseModel):
    error: str
    detail: list[dict[str, Any]] | None = None


class SlideSummary(BaseModel):
    id: str = Field(description="Opaque, stable id.")
    name: str
    path: str = Field(description="Path relative to its slide root.")
    format: str
    size_bytes: int


class SlideList(BaseModel):
    items: list[SlideSummary]
    total: int
    offset: int
    limit: int


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


class SamplingRequest(BaseModel):
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

    def to_params(self) -> PlanParams:
        if self.strategy == "medgemma":
            fixed = sorted(self.model_fields_set & {"patch_size_px", "target_mpp", "overlap",
                                                    "tissue_mpp"})
            if fixed:
                raise InvalidRequestError(
                    f"the medgemma preset fixes {', '.join(fixed)} (896 px, no overlap, 5x "
                    "mask); choose its magnification with 'magnification' and its cap with "
                    "'n_patches'"
                )
            return medgemma_params(
                seed=self.seed, magnification=self.magnification,
                max_patches=self.n_patches or MEDGEMMA_MAX_PATCHES,
                min_tissue_fraction=self.min_tissue_fraction,
            )
        return PlanParams(
            strategy=self.strategy, patch_size_px=self.patch_size_px, target_mpp=self.target_mpp,
            magnification=self.magnification, overlap=self.overlap,
            min_tissue_fraction=self.min_tissue_fraction, n_patches=self.n_patches,
            seed=self.seed, tissue_mpp=self.tissue_mpp,
        )


class PatchRequest(SamplingRequest):
    image_format: Literal["png", "jpeg"] = "png"


class PlannedPatch(BaseModel):
    x0: int
    y0: int
    tissue_fraction: float


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
    n_candidates: int
    n_patches: int
    patches: list[PlannedPatch]


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    slides: list[str] = Field(min_length=1, max_length=10_000, description="Slide ids.")
    sampling: SamplingRequest = SamplingRequest()


class JobError(BaseModel):
    slide: str
    error: str
    message: str


class JobResult(BaseModel):
    name: str
    media_type: str
    url: str


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
