"""A loaded slide model: its card, its module with the checkpoint's weights, and the answer
for one bag of patch embeddings.

Probabilities: a softmax over the logits (CLAM, MIL-Lab, TransMIL: ``Y_prob``); a single
logit over two classes is a sigmoid (TRIDENT's tutorial: P(second class) =
sigmoid(logit)). Attention: the raw scores before the softmax over patches, (N, K), K = 1
or one column per branch / head.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from ..errors import ModelLoadError, ModelNotFoundError
from .architectures import ARCHITECTURES, OverSlideEncoder, build_architecture
from .card import (
    SlideModelCard,
    embedding_dim_of,
    encoder_card_of,
    load_slide_card,
    slide_catalogue_card,
    slide_catalogue_names,
    slide_encoder_card_of,
)
from .checkpoints import load_slide_weights

__all__ = ["SlideModel", "SlidePrediction", "load_slide_model"]


@dataclass(frozen=True)
class SlidePrediction:
    """One slide model's answer for one bag."""

    model: str
    class_names: tuple[str, ...]
    logits: npt.NDArray[np.float32]
    probabilities: npt.NDArray[np.float32]
    attention: npt.NDArray[np.float32] | None
    """(N, K) raw scores, rows in the bag's order; None for models without patch scores."""
    attention_columns: tuple[str, ...]
    display_column: int
    """The attention column a heatmap shows: CLAM-MB's branch of the predicted class, else 0."""
    embedding: npt.NDArray[np.float32]
    n_patches: int
    seconds: float

    @property
    def predicted_class(self) -> str | None:
        """The most probable class; None for a slide encoder (no classes)."""
        if not self.class_names:
            return None
        return self.class_names[int(np.argmax(self.probabilities))]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "slide_model": self.model, "class_names": list(self.class_names),
            "probabilities": {c: round(float(p), 6)
                              for c, p in zip(self.class_names, self.probabilities, strict=True)},
            "predicted_class": self.predicted_class,
            "logits": [round(float(v), 6) for v in self.logits],
            "n_patches": self.n_patches,
            "attention": None if self.attention is None else {
                "columns": list(self.attention_columns),
                "display_column": self.attention_columns[self.display_column]},
            "seconds": round(self.seconds, 4),
        }
        if not self.class_names:  # a slide encoder answers with the slide embedding
            out["embedding"] = [float(v) for v in self.embedding]
            out["embedding_dim"] = int(self.embedding.shape[0])
        return out


def _probabilities(logits: torch.Tensor, n_classes: int) -> torch.Tensor:
    if n_classes == 0:
        return logits[:0]
    if logits.numel() == 1 and n_classes == 2:
        p = torch.sigmoid(logits[0])
        return torch.stack([1 - p, p])
    return torch.softmax(logits, dim=0)


class SlideModel:
    """A slide-level model ready to answer (evaluation mode, float32, CPU or a GPU)."""

    def __init__(self, card: SlideModelCard, module: torch.nn.Module, device: str = "cpu"
                 ) -> None:
        self.card = card
        self.device = torch.device(device)
        self.module = module.eval().to(self.device)
        self.embedding_dim = embedding_dim_of(card)
        self.encoder_card = encoder_card_of(card)

    @property
    def name(self) -> str:
        return self.card.name

    def _attention_columns(self, k: int) -> tuple[str, ...]:
        if k == 1:
            return ("attention",)
        if self.card.architecture == "clam_mb" and k == len(self.card.class_names):
            return tuple(f"attention_{c}" for c in self.card.class_names)
        if self.card.architecture == "mil_fc":
            return tuple(f"logit_{c}" for c in self.card.class_names)
        return tuple(f"attention_head_{i}" for i in range(k))

    def predict(self, features: npt.ArrayLike) -> SlidePrediction:
        """The answer for one (N, D) bag."""
        t0 = time.perf_counter()
        x = torch.as_tensor(np.asarray(features, np.float32), device=self.device)
        with torch.inference_mode():
            out = self.module(x)
            probs = _probabilities(out.logits.float(), len(self.card.class_names))
        attention = None if out.attention is None else out.attention.float().cpu().numpy()
        columns = () if attention is None else self._attention_columns(attention.shape[1])
        predicted = int(torch.argmax(probs)) if probs.numel() else 0
        display = predicted if self.card.architecture in ("clam_mb", "mil_fc") else 0
        return SlidePrediction(
            model=self.card.name, class_names=self.card.class_names,
            logits=out.logits.float().cpu().numpy(), probabilities=probs.cpu().numpy(),
            attention=attention, attention_columns=columns,
            display_column=min(display, len(columns) - 1) if columns else 0,
            embedding=out.embedding.float().cpu().numpy().ravel(), n_patches=int(x.shape[0]),
            seconds=time.perf_counter() - t0)


def _resolve(spec: str | Path | SlideModelCard) -> SlideModelCard:
    if isinstance(spec, SlideModelCard):
        return spec
    if str(spec) in slide_catalogue_names():
        return slide_catalogue_card(str(spec))
    path = Path(spec)
    if path.suffix.lower() != ".json":
        raise ModelNotFoundError(
            f"{spec}: a slide model is a card (.json) with \"kind\": \"slide\", or a built-in "
            f"slide encoder ({', '.join(slide_catalogue_names())})")
    return load_slide_card(path)


def _missing_checkpoint(card: SlideModelCard) -> ModelLoadError:
    prov = card.provenance
    where = (f": download {prov.weights_file or 'its weights'} from {prov.weights_url} "
             f"(licence: {prov.licence})" if prov is not None and prov.weights_url else "")
    return ModelLoadError(f"slide model {card.name!r} needs its checkpoint{where}; pass "
                          "--slide-weights PATH (or set \"file\" in the card)")


def load_slide_model(
    spec: str | Path | SlideModelCard, *, weights: str | Path | None = None,
    device: str = "cpu", allow_random_weights: bool = False,
) -> SlideModel:
    """Build the card's architecture and load its checkpoint strictly (``weights``
    replaces the card's ``file``); a head over a slide encoder loads both, each strictly.
    Random weights only with ``allow_random_weights`` (tests and benchmarks)."""
    card = _resolve(spec)
    if weights is not None:
        card = card.model_copy(update={"file": str(weights)})
    slide_encoder = slide_encoder_card_of(card)
    if slide_encoder is None:
        module = _built(card, embedding_dim_of(card), card.file, allow_random_weights)
    else:
        if not slide_encoder.is_encoder:
            raise ModelLoadError(f"slide model {card.name!r}: slide_encoder "
                                 f"{slide_encoder.name!r} has classes; a head reads a slide "
                                 "encoder (no class_names)")
        encoder = _built(slide_encoder, embedding_dim_of(slide_encoder),
                         card.slide_encoder_file or slide_encoder.file, allow_random_weights)
        width = slide_encoder.embedding_dim or _embedding_width(slide_encoder)
        head = _built(card, width, card.file, allow_random_weights)
        module = OverSlideEncoder(encoder, head)
    return SlideModel(card, module, device=_device(device))


def _built(card: SlideModelCard, in_dim: int, file: str | None, allow_random_weights: bool
           ) -> torch.nn.Module:
    """The card's architecture over ``in_dim``-d inputs, with ``file`` loaded strictly."""
    module = build_architecture(card.architecture, card.architecture_kwargs, in_dim=in_dim,
                                class_names=card.class_names)
    if card.embedding_dim is not None:
        _check_embedding_dim(card)
    if file is None:
        if not allow_random_weights:
            raise _missing_checkpoint(card)
        return module
    path = Path(file)
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: checkpoint of slide model {card.name!r} not found")
    original = ARCHITECTURES[card.architecture].original
    load_slide_weights(module, path, prefix=card.weights_key_prefix,
                       what=f"{card.architecture} ({original}, card {card.name!r})")
    return module


def _embedding_width(card: SlideModelCard) -> int:
    with torch.device("meta"):
        meta = build_architecture(card.architecture, card.architecture_kwargs,
                                  in_dim=embedding_dim_of(card), class_names=card.class_names)
        return int(meta(torch.zeros(2, embedding_dim_of(card))).embedding.shape[-1])


def _check_embedding_dim(card: SlideModelCard) -> None:
    width = _embedding_width(card)
    if width != card.embedding_dim:
        raise ModelLoadError(f"slide model {card.name!r}: embedding_dim is {card.embedding_dim} "
                             f"but {card.architecture} with these arguments gives {width}")


def _device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
