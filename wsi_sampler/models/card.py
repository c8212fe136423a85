"""Model cards: the JSON that says what a model takes and what it returns.

A card sits beside the model file (WSInfer-style) and is checked against the real model at
load time. Patches reach every model as uint8 RGB NHWC at ``patch_size_px`` and
``target_mpp``; the model side normalises with the card's mean/std (on 0..1 values).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import ModelLoadError, ModelNotFoundError

__all__ = ["ModelCard", "Normalization", "OutputSpec", "load_card"]

Activation = Literal["softmax", "sigmoid", "none"]


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

    @model_validator(mode="after")
    def _width(self) -> OutputSpec:
        if (self.class_names is None) == (self.dim is None):
            raise ValueError(f"output {self.name!r} needs exactly one of class_names or dim")
        return self

    @property
    def width(self) -> int:
        return len(self.class_names) if self.class_names is not None else int(self.dim or 0)

    def column_names(self) -> list[str]:
        """Names for table columns: class/measurement names, else ``<name>_<i>``."""
        if self.class_names is not None:
            prefix = "prob_" if self.activation != "none" else ""
            return [f"{prefix}{c}" for c in self.class_names]
        return [f"{self.name}_{i}" for i in range(self.width)]


class ModelCard(BaseModel):
    """What a model is and how to feed it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=128)
    version: str = "1"
    architecture: str
    """``builtin:tissue-qc``, ``torchscript``, ``torch-export`` or ``timm:<arch>``."""
    file: str | None = None
    """Model file (TorchScript / .pt2) or weights (.safetensors), relative to the card."""
    patch_size_px: int = Field(ge=16, le=4096)
    target_mpp: float = Field(gt=0, le=100)
    normalization: Normalization = Normalization()
    channel_order: Literal["RGB", "BGR"] = "RGB"
    outputs: tuple[OutputSpec, ...] = Field(min_length=1)
    max_batch: int = Field(default=64, ge=1, le=4096)
    description: str = ""

    @model_validator(mode="after")
    def _unique_outputs(self) -> ModelCard:
        names = [o.name for o in self.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"output names must be unique, got {names}")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def load_card(path: str | Path) -> ModelCard:
    """Read and validate a model card JSON file."""
    p = Path(path)
    if not p.is_file():
        raise ModelNotFoundError(f"{p}: model card not found")
    try:
        return ModelCard.model_validate(json.loads(p.read_text(encoding="utf-8")))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{p}: model card is not valid JSON ({exc})") from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or 'card'}: {e['msg']}" for e in exc.errors()
        )
        raise ModelLoadError(f"{p}: invalid model card: {problems}") from exc
