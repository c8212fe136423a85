"""Segmenter cards: a deep tissue segmenter, what it reads and where its weights come from.

A card has ``"kind": "segmenter"``; built-in cards (``hest``) live in ``segmenter_cards/``
and the user brings the weights file (nothing is downloaded). Units: ``tile_mpp`` µm/px,
``tile_px`` pixels of a square tile.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import ModelLoadError, ModelNotFoundError
from ..models.card import Normalization
from ..slide_models.card import SlideProvenance

__all__ = ["SegmenterCard", "load_segmenter_card", "segmenter_catalogue_names"]

SegmenterArchitecture = Literal["deeplabv3_resnet50", "smp_unetplusplus", "smp_unet"]


class SegmenterCard(BaseModel):
    """What a tissue segmenter is and how it is run over a slide."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["segmenter"] = "segmenter"
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=128)
    version: str = "1"
    architecture: SegmenterArchitecture
    architecture_kwargs: dict[str, Any] = Field(default_factory=dict)
    """The builder's arguments (torchvision's ``num_classes``…)."""
    tile_px: int = Field(ge=32, le=4096)
    tile_mpp: float = Field(gt=0)
    normalization: Normalization = Normalization()
    role: Literal["tissue", "artifacts"] = "tissue"
    """``tissue``: a tissue detector (``--method``); ``artifacts``: an artefact map whose
    classes a plan can exclude (``--artifact-weights``)."""
    tissue_class: int = Field(default=1, ge=0)
    """The output channel that means tissue (it must win the argmax)."""
    artifact_classes: dict[str, int] = Field(default_factory=dict)
    """``artifacts``: our name of each artefact class (``fold``, ``pen``…) -> its channel."""
    background_class: int | None = Field(default=None, ge=0)
    """``artifacts``: the channel pixels outside the tissue get (nothing is run there)."""
    tiling: Literal["slide", "thumbnail"] = "slide"
    """``slide``: tiles read from the slide at ``tile_mpp``, laid from the origin (HEST);
    ``thumbnail``: the whole slide at ``tile_mpp`` in tiles, the last column and row shifted
    to end at its edge (GrandQC)."""
    jpeg_quality: int | None = Field(default=None, ge=1, le=100)
    """``thumbnail``: JPEG-compress the thumbnail at this quality first (GrandQC trained on
    JPEG images)."""
    file: str | None = None
    """The weights, relative to the card (``--segmenter-weights`` replaces it)."""
    description: str = ""
    provenance: SlideProvenance | None = None

    @model_validator(mode="after")
    def _classes_fit(self) -> SegmenterCard:
        channels = self.architecture_kwargs.get("classes",
                                                self.architecture_kwargs.get("num_classes"))
        used = [self.tissue_class, *self.artifact_classes.values()]
        if self.background_class is not None:
            used.append(self.background_class)
        if isinstance(channels, int) and max(used) >= channels:
            raise ValueError(f"class index {max(used)} >= the model's {channels} outputs")
        if self.role == "artifacts" and (not self.artifact_classes
                                         or self.background_class is None):
            raise ValueError("an artifacts card names its artifact_classes and background_class")
        return self


def _catalogue() -> Any:
    return resources.files("wsi_sampler.segmenters").joinpath("segmenter_cards")


def segmenter_catalogue_names() -> tuple[str, ...]:
    """Built-in segmenter cards (``hest``, ``grandqc``, ``grandqc-artifacts``…); the user
    brings the weights."""
    return tuple(sorted(f.name.removesuffix(".json") for f in _catalogue().iterdir()
                        if f.name.endswith(".json")))


def load_segmenter_card(spec: str | Path) -> SegmenterCard:
    """A built-in segmenter by name, or a segmenter card file."""
    if isinstance(spec, str) and spec in segmenter_catalogue_names():
        text = _catalogue().joinpath(f"{spec}.json").read_text(encoding="utf-8")
        return SegmenterCard.model_validate(json.loads(text))
    path = Path(spec)
    if not path.is_file():
        raise ModelNotFoundError(f"no built-in segmenter {str(spec)!r} and no such card file "
                                 f"(built in: {', '.join(segmenter_catalogue_names())})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        card = SegmenterCard.model_validate(raw)
    except (json.JSONDecodeError, ValidationError) as exc:
        first = str(exc).splitlines()[0]
        raise ModelLoadError(f"{path}: invalid segmenter card ({first})") from exc
    if card.file is not None and not Path(card.file).is_absolute():
        card = card.model_copy(update={"file": str(path.parent / card.file)})
    return card
