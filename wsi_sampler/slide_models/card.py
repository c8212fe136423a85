"""Slide model cards: the JSON that says which slide-level model a weights file holds, over
which patch features, and what its outputs mean.

A slide model (``"kind": "slide"``) reads one slide's bag of patch embeddings and returns one
answer for the slide: class probabilities and, for attention models, one raw score per patch.
``architecture_kwargs`` are the training code's own constructor arguments (CLAM's ``gate``,
``size_arg``, ``dropout``, ``k_sample``, ``n_classes``, ``subtyping``, ``embed_dim``…), so
a card is written by copying the arguments a model was trained with. ``patch_encoder`` names
the encoder whose features the head was trained on (a built-in name such as ``uni``, or an
encoder card): it fixes the patch size, the magnification and the embedding size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import ModelLoadError, ModelNotFoundError
from ..models.card import ModelCard
from ..models.catalogue import catalogue_card, catalogue_names

__all__ = ["ARCHITECTURE_SUMMARY", "SlideArchitecture", "SlideModelCard", "SlideProvenance",
           "embedding_dim_of", "encoder_card_of", "slide_catalogue_card",
           "slide_catalogue_names", "slide_encoder_card_of",
           "load_slide_card"]

SlideArchitecture = Literal["clam_sb", "clam_mb", "mil_fc", "abmil", "trident_abmil",
                            "transmil", "chief", "madeleine", "mean", "linear", "mlp"]
"""``clam_sb`` / ``clam_mb`` / ``mil_fc``: CLAM's models (``models/model_clam.py``,
``models/model_mil.py``); ``abmil``: MIL-Lab's ABMIL (Ilse et al. 2018, gated or not);
``trident_abmil``: TRIDENT's ``ABMILSlideEncoder`` with the classifier of its ABMIL tutorial;
``transmil``: TransMIL (Shao et al. 2021); ``chief``: CHIEF's slide encoder (Wang et al.
2024; CLAM-SB's attention over CTransPath features, the attention-weighted mean of the
features as the slide embedding); ``madeleine``: MADELEINE's H&E slide encoder (Jaume
et al. 2024; four gated-attention heads over CONCH features, projected); ``mean``: mean of
the patch embeddings + linear; ``linear`` / ``mlp``: a head over a slide encoder's
embedding (``slide_encoder``)."""


# What `models list` shows without importing torch (a test keeps it equal to the modules).
ARCHITECTURE_SUMMARY: dict[str, tuple[str, str]] = {
    "clam_sb": ("CLAM models.model_clam.CLAM_SB",
        "gate=True, size_arg='small', dropout=0.0, k_sample=8, n_classes=2, subtyping=Fal"
        "se, embed_dim=1024"),
    "clam_mb": ("CLAM models.model_clam.CLAM_MB",
        "gate=True, size_arg='small', dropout=0.0, k_sample=8, n_classes=2, subtyping=Fal"
        "se, embed_dim=1024"),
    "mil_fc": ("CLAM models.model_mil.MIL_fc / MIL_fc_mc",
        "size_arg='small', dropout=0.0, n_classes=2, top_k=1, embed_dim=1024"),
    "abmil": ("MIL-Lab src.models.abmil.ABMIL",
        "in_dim=1024, embed_dim=512, num_fc_layers=1, dropout=0.25, attn_dim=384, gate=Tr"
        "ue, num_classes=2"),
    "trident_abmil": ("TRIDENT ABMILSlideEncoder + tutorial classifier",
        "input_feature_dim=768, n_heads=1, head_dim=512, dropout=0.0, gated=True, hidden_"
        "dim=256, n_classes=1"),
    "transmil": ("TransMIL models.TransMIL",
        "n_classes=2, in_dim=1024"),
    "chief": ("CHIEF models.CHIEF.CHIEF",
        "gate=True, size_arg='small', dropout=True, n_classes=2, embed_dim=768"),
    "madeleine": ("MADELEINE madeleine.models.Model.MADELEINE (H&E)",
        "patch_embedding_dim=512, wsi_encoder_hidden_dim=512, n_heads=4, activation='softm"
        "ax', n_classes=0"),
    "mean": ("mean pooling + linear",
        "in_dim=1024, n_classes=2"),
    "linear": ("linear probe on a slide embedding (torch.nn.Linear)",
        "in_dim=512, n_classes=2"),
    "mlp": ("MLP on a slide embedding (Linear, ReLU, Dropout, Linear)",
        "in_dim=512, hidden_dim=256, dropout=0.0, n_classes=2"),
}


class SlideProvenance(BaseModel):
    """Where a slide model comes from: who trained it, on what, under which licence."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    licence: str = ""
    trained_by: str = ""
    training_data: str = ""
    weights_url: str = ""
    """Where users download the weights themselves (nothing is downloaded for them)."""
    weights_file: str = ""
    parameters: int | None = Field(default=None, ge=1)
    """Published parameter count (checked against a meta-device build in the tests)."""
    parameters_tolerance: float = Field(default=0.05, gt=0, lt=1)
    sources: tuple[str, ...] = ()
    notes: str = ""


class SlideModelCard(BaseModel):
    """What a slide-level model is, what it reads and what it answers."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["slide"] = "slide"
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=128)
    version: str = "1"
    architecture: SlideArchitecture
    architecture_kwargs: dict[str, Any] = Field(default_factory=dict)
    """The training code's constructor arguments, by their original names."""
    class_names: tuple[str, ...] = ()
    """One name per class, in the order of the model's logits (CLAM: the label dict's
    order). Two names and a single logit: a sigmoid gives the second class's probability.
    None: a slide *encoder*, whose answer is the slide embedding (FEATHER, no head)."""
    embedding_dim: int | None = Field(default=None, ge=1)
    """A slide encoder's embedding size (checked against the architecture)."""
    patch_encoder: str | ModelCard | None = None
    """The features the model was trained on: a built-in encoder name (``uni``,
    ``uni2-h``…), an encoder card file (relative to this card) or an inline encoder card.
    A head over a slide encoder takes the slide encoder's."""
    slide_encoder: str | SlideModelCard | None = None
    """``linear`` / ``mlp`` heads: the slide encoder whose embedding they read (a built-in
    name such as ``feather-uni``, a slide encoder card file or an inline card)."""
    slide_encoder_file: str | None = None
    """The slide encoder's weights (relative to this card)."""
    file: str | None = None
    """The checkpoint, relative to the card (``--slide-weights`` replaces it)."""
    weights_key_prefix: str | None = None
    """A prefix stripped from every key (found by itself for ``model.``, ``module.``…)."""
    description: str = ""
    provenance: SlideProvenance | None = None

    @model_validator(mode="after")
    def _unique_classes(self) -> SlideModelCard:
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names must be unique, got {list(self.class_names)}")
        return self

    @model_validator(mode="after")
    def _inputs(self) -> SlideModelCard:
        head = self.architecture in ("linear", "mlp")
        if head != (self.slide_encoder is not None):
            raise ValueError("linear and mlp heads read a slide encoder's embedding: give "
                             "slide_encoder with them, and only with them")
        if self.patch_encoder is None and self.slide_encoder is None:
            raise ValueError("patch_encoder is required: the features the model reads")
        return self

    @property
    def is_encoder(self) -> bool:
        """A slide encoder: no classes, its answer is the slide embedding."""
        return not self.class_names

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def _validation_problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'card'}: {e['msg']}"
                     for e in exc.errors())


def _slide_catalogue() -> Any:
    from importlib import resources

    return resources.files("wsi_sampler.slide_models").joinpath("slide_encoder_cards")


def slide_catalogue_names() -> tuple[str, ...]:
    """Built-in slide encoder cards (FEATHER…); the user brings the weights."""
    return tuple(sorted(f.name.removesuffix(".json") for f in _slide_catalogue().iterdir()
                        if f.name.endswith(".json")))


def slide_catalogue_card(name: str) -> SlideModelCard:
    if name not in slide_catalogue_names():
        raise ModelNotFoundError(f"no built-in slide encoder {name!r} "
                                 f"({', '.join(slide_catalogue_names())})")
    text = _slide_catalogue().joinpath(f"{name}.json").read_text(encoding="utf-8")
    return SlideModelCard.model_validate(json.loads(text))


def load_slide_card(path: str | Path) -> SlideModelCard:
    """Read and validate a slide model card; an encoder card file it names is read too (a
    relative path is taken from the card's folder) and inlined."""
    p = Path(path)
    if not p.is_file():
        raise ModelNotFoundError(f"{p}: slide model card not found")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{p}: slide model card is not valid JSON ({exc})") from exc
    if isinstance(raw, dict) and raw.get("kind") != "slide":
        raise ModelLoadError(f"{p}: not a slide model card (it needs \"kind\": \"slide\"; "
                             "patch encoders go to --model)")
    try:
        card = SlideModelCard.model_validate(raw)
    except ValidationError as exc:
        raise ModelLoadError(f"{p}: invalid slide model card: {_validation_problems(exc)}"
                             ) from exc
    updates: dict[str, Any] = {}
    if isinstance(card.slide_encoder, str) and card.slide_encoder not in slide_catalogue_names():
        enc_path = Path(card.slide_encoder)
        updates["slide_encoder"] = load_slide_card(
            enc_path if enc_path.is_absolute() else p.parent / enc_path)
    if card.slide_encoder_file is not None and not Path(card.slide_encoder_file).is_absolute():
        updates["slide_encoder_file"] = str(p.parent / card.slide_encoder_file)
    if isinstance(card.patch_encoder, str) and card.patch_encoder not in catalogue_names():
        from ..models.card import load_card

        enc = Path(card.patch_encoder)
        updates["patch_encoder"] = load_card(enc if enc.is_absolute() else p.parent / enc)
    if card.file is not None and not Path(card.file).is_absolute():
        updates["file"] = str(p.parent / card.file)
    return card.model_copy(update=updates) if updates else card


def slide_encoder_card_of(card: SlideModelCard) -> SlideModelCard | None:
    """The slide encoder a head reads (None for models over patch features)."""
    if card.slide_encoder is None or isinstance(card.slide_encoder, SlideModelCard):
        return card.slide_encoder
    return slide_catalogue_card(card.slide_encoder)


def encoder_card_of(card: SlideModelCard) -> ModelCard:
    """The patch encoder's card (built in, or the card's own; a head: its slide encoder's)."""
    slide_encoder = slide_encoder_card_of(card)
    if slide_encoder is not None and card.patch_encoder is None:
        return encoder_card_of(slide_encoder)
    if isinstance(card.patch_encoder, ModelCard):
        return card.patch_encoder
    if card.patch_encoder not in catalogue_names():
        raise ModelLoadError(
            f"slide model {card.name!r}: patch_encoder {card.patch_encoder!r} is not a built-in "
            f"encoder ({', '.join(catalogue_names())}) nor an encoder card")
    return catalogue_card(str(card.patch_encoder))


def embedding_dim_of(card: SlideModelCard) -> int:
    """The width of the patch embeddings the model reads."""
    enc = encoder_card_of(card)
    out = enc.embedding_output
    if out is None:
        raise ModelLoadError(f"slide model {card.name!r}: patch encoder {enc.name!r} has no "
                             "embedding output")
    return out.width
