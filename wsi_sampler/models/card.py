"""Model cards: the JSON that says what a model takes and what it returns.

A card sits beside the model file (WSInfer-style) and is checked against the real model at
load time. Patches reach every model as uint8 RGB NHWC at ``patch_size_px`` and
``target_mpp``; the model side normalises with the card's mean/std (on 0..1 values).

A ``timm:<arch>`` card can describe a foundation encoder exactly: ``timm_kwargs`` (layer
classes by name), the embedding ``pooling`` and the weights' key prefix; built-in cards of
the well-known encoders live in ``catalogue/`` (see :mod:`.catalogue`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import ModelLoadError, ModelNotFoundError

__all__ = ["ModelCard", "Normalization", "OutputSpec", "Pooling", "Provenance", "load_card"]

Activation = Literal["softmax", "sigmoid", "none"]
Pooling = Literal["model", "cls", "mean", "cls+mean"]
"""How a ViT's tokens become one embedding: ``model`` = what the timm model returns with
``num_classes=0`` (its own ``global_pool``); ``cls`` = the class token; ``mean`` = the mean of
the patch tokens (register tokens skipped); ``cls+mean`` = both concatenated (Virchow)."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


class Normalization(BaseModel):
    """Per-channel ``(x / 255 - mean) / std`` applied before the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @model_validator(mode="after")
    def _positive_std(self) -> Normalization:
        if min(self.std) <= 0:
            raise ValueError("normalization std must be > 0")
        return self


class OutputSpec(BaseModel):
    """One output tensor: (N, k) float32, k = len(class_names) or ``dim``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")
    class_names: tuple[str, ...] | None = None
    """Class names (probabilities) or measurement names, one per column."""
    dim: int | None = Field(default=None, ge=1)
    """Feature dimension, when columns have no names (embeddings)."""
    activation: Activation = "none"
    embedding: bool | None = None
    """An embedding is kept whole (feature bags) instead of becoming table columns. Unset:
    an output with ``dim`` >= 32, no class names and no activation is one (a remote model's
    3-value output stays three columns; a 384-d encoder output is a feature bag)."""

    @model_validator(mode="after")
    def _width(self) -> OutputSpec:
        if (self.class_names is None) == (self.dim is None):
            raise ValueError(f"output {self.name!r} needs exactly one of class_names or dim")
        return self

    @property
    def width(self) -> int:
        return len(self.class_names) if self.class_names is not None else int(self.dim or 0)

    @property
    def is_embedding(self) -> bool:
        if self.embedding is not None:
            return self.embedding
        return self.class_names is None and self.activation == "none" and self.width >= 32

    def column_names(self) -> list[str]:
        """Names for table columns: class/measurement names, else ``<name>_<i>``."""
        if self.class_names is not None:
            prefix = "prob_" if self.activation != "none" else ""
            return [f"{prefix}{c}" for c in self.class_names]
        return [f"{self.name}_{i}" for i in range(self.width)]


class Provenance(BaseModel):
    """Where a model comes from. Catalogue cards (``encoder_cards/``) cite the source of
    every fact they state."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    licence: str
    weights_url: str
    """Where users download the weights themselves (nothing is ever downloaded for them)."""
    weights_file: str
    """The file name the publisher ships, e.g. ``pytorch_model.bin``."""
    parameters: int | None = Field(default=None, ge=1)
    """Published parameter count (checked against a meta-device build in the tests)."""
    parameters_tolerance: float = Field(default=0.01, gt=0, lt=1)
    """Relative tolerance of that check: the published figure's own rounding."""
    sources: tuple[str, ...] = ()
    """Public documents each fact of the card was taken from."""
    notes: str = ""


class StainSpec(BaseModel):
    """Stain normalisation applied to the patches before the model (:mod:`wsi_sampler.stain`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: Literal["macenko", "vahadane", "reinhard"]
    reference: str | None = None
    """An image with the stain to match (PNG, JPEG, TIFF), relative to the card. Macenko
    and Vahadane without one use the built-in H&E reference; Reinhard needs one."""

    @model_validator(mode="after")
    def _reinhard_reference(self) -> StainSpec:
        if self.method == "reinhard" and self.reference is None:
            raise ValueError("reinhard needs a reference image (stain_normalization.reference)")
        return self


BUILTIN_ENCODERS = ("builtin:conch-v1",)
"""Encoder architectures written here around a timm trunk (:mod:`.conch`); their cards
name them and, like ``timm:`` cards, load a weights file strictly."""


class ModelCard(BaseModel):
    """What a model is and how to feed it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=128)
    version: str = "1"
    architecture: str
    """``builtin:tissue-qc``, ``builtin:conch-v1``, ``torchscript``, ``torch-export`` or
    ``timm:<arch>``."""
    file: str | None = None
    """Model file (TorchScript / .pt2) or weights (.safetensors), relative to the card."""
    patch_size_px: int = Field(ge=16, le=4096)
    target_mpp: float = Field(gt=0, le=100)
    normalization: Normalization = Normalization()
    channel_order: Literal["RGB", "BGR"] = "RGB"
    outputs: tuple[OutputSpec, ...] = Field(min_length=1)
    max_batch: int = Field(default=64, ge=1, le=4096)
    description: str = ""
    timm_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for ``timm.create_model`` (``timm:`` cards; ``builtin:conch-v1``:
    for its timm ``VisionTransformer`` trunk); layer classes by name, e.g.
    ``{"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}``."""
    pooling: Pooling = "model"
    weights_layout: Literal["timm", "swin-original"] = "timm"
    """The checkpoint's key layout: ``timm`` (today's timm), or ``swin-original`` (Swin's
    original code and timm < 0.6: each stage's downsample at its end, relative-position
    index and attention-mask buffers stored), converted on load as timm converts it."""
    weights_key_prefix: str | None = None
    """Prefix stripped from every key of the weights file (e.g. ``module.``, ``model.``)."""
    unused_key_prefixes: tuple[str, ...] = ()
    """Checkpoint keys (after ``weights_key_prefix``) that are no part of the embedding and
    are dropped, by prefix: CONCH's text tower and caption decoder. Every other key loads
    strictly."""
    input_size_px: int | None = Field(default=None, ge=16, le=4096)
    """The model's input side when it differs from ``patch_size_px``: patches are read at
    ``patch_size_px`` and ``target_mpp`` as the publisher tiles, then resized (bicubic) to
    this, as the publisher's transform does (CONCH: 256 px at 10x, resized to 448)."""
    head_keys: tuple[str, ...] = ()
    """Keys of the architecture's classifier head (timm ViTs: ``head.weight``, ``head.bias``;
    ResNets: ``fc.weight``, ``fc.bias``). An embedding card drops them from a checkpoint that
    carries them (timm's ``ft_in1k`` files do) and says so; every other key loads strictly."""
    provenance: Provenance | None = None
    stain_normalization: StainSpec | None = None
    """Normalise each patch's stain before the model (the model was trained that way)."""

    @model_validator(mode="after")
    def _unique_outputs(self) -> ModelCard:
        names = [o.name for o in self.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"output names must be unique, got {names}")
        if "num_classes" in self.timm_kwargs:
            raise ValueError("timm_kwargs must not set num_classes: it follows from the outputs "
                             "(0 for an embedding, the number of class names otherwise)")
        timm_built = self.architecture.startswith("timm:") or (
            self.architecture in BUILTIN_ENCODERS)
        if (self.timm_kwargs and not timm_built) or (
                self.pooling != "model" and not self.architecture.startswith("timm:")):
            raise ValueError("timm_kwargs apply to timm:<arch> models (and CONCH's timm "
                             "trunk), pooling to timm:<arch> models only")
        if self.file is not None and self.architecture.startswith("timm:") and not (
                self.file.lower().endswith(WEIGHT_SUFFIXES)):
            raise ValueError(f"weights file {self.file!r}: expected one of "
                             f"{', '.join(WEIGHT_SUFFIXES)}")
        return self

    @property
    def embedding_output(self) -> OutputSpec | None:
        """The (first) output that is an embedding (:attr:`OutputSpec.is_embedding`), if any."""
        return next((o for o in self.outputs if o.is_embedding), None)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def load_card(path: str | Path) -> ModelCard:
    """Read and validate a model card JSON file."""
    p = Path(path)
    if not p.is_file():
        raise ModelNotFoundError(f"{p}: model card not found")
    try:
        card = ModelCard.model_validate(json.loads(p.read_text(encoding="utf-8")))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{p}: model card is not valid JSON ({exc})") from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or 'card'}: {e['msg']}" for e in exc.errors()
        )
        raise ModelLoadError(f"{p}: invalid model card: {problems}") from exc
    stain = card.stain_normalization
    if stain is not None and stain.reference and not Path(stain.reference).is_absolute():
        stain = stain.model_copy(update={"reference": str(p.parent / stain.reference)})
        card = card.model_copy(update={"stain_normalization": stain})
    return card
