"""Find a model's card (built-in name, catalogue name or card file) and check that its
files exist, without loading anything: no torch here (``models list``, preflight checks
before long runs)."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from ..errors import ModelLoadError, ModelNotFoundError
from .card import BUILTIN_ENCODERS, ModelCard, load_card
from .catalogue import catalogue_card, catalogue_names
from .tissue_qc_card import tissue_qc_card

__all__ = ["BUILTIN_MODELS", "missing_weights", "model_file", "preflight", "resolve_card"]

BUILTIN_MODELS = ("tissue-qc",)


def resolve_card(
    spec: str | Path, weights: str | Path | None = None
) -> tuple[ModelCard, Path | None]:
    """Return the card for ``spec`` and the folder its ``file`` is relative to;
    ``weights`` (a path) replaces the card's ``file``."""
    card, base = _find_card(spec)
    if weights is not None:
        if card.architecture == "builtin:tissue-qc":
            raise ModelLoadError("the built-in tissue-qc model takes no weights file")
        try:
            card = ModelCard.model_validate(card.model_dump() | {"file": str(weights)})
        except ValidationError as exc:
            raise ModelLoadError(f"--weights {weights}: {exc.errors()[0]['msg']}") from None
        base = None
    return card, base


def _find_card(spec: str | Path) -> tuple[ModelCard, Path | None]:
    text = str(spec)
    if text in BUILTIN_MODELS or text == "builtin:tissue-qc":
        return tissue_qc_card(), None
    if text in catalogue_names():
        return catalogue_card(text), None
    path = Path(spec)
    if path.suffix.lower() != ".json":
        beside = path.with_suffix(".json")
        if not path.exists():
            raise ModelNotFoundError(
                f"{path}: no such model (built in: {', '.join(BUILTIN_MODELS)}; encoders: "
                f"{', '.join(catalogue_names())}; or a model card .json)"
            )
        if not beside.is_file():
            raise ModelNotFoundError(f"{path}: model card {beside.name} not found beside it")
        path = beside
    return load_card(path), path.parent


def model_file(card: ModelCard, base: Path | None) -> Path:
    if card.file is None:
        raise ModelLoadError(f"model card {card.name!r} names no file for {card.architecture}")
    path = Path(card.file)
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: model file of {card.name!r} not found")
    return path


def missing_weights(card: ModelCard) -> ModelLoadError:
    prov = card.provenance
    where = (f": download {prov.weights_file} from {prov.weights_url} (licence: {prov.licence})"
             f" and pass --weights PATH" if prov is not None else "")
    return ModelLoadError(
        f"model {card.name!r} needs its weights file{where}; random weights only with "
        "allow_random_weights (CLI: --random-weights), for tests and benchmarks")


def preflight(
    spec: str | Path, weights: str | Path | None = None, *, allow_random_weights: bool = False
) -> ModelCard:
    """The card of a model, once its files are known to exist: the checks a long run makes
    before any work (loading itself happens later, e.g. on each Dask worker)."""
    card, base = resolve_card(spec, weights)
    if card.architecture == "builtin:tissue-qc":
        return card
    if card.file is None:
        built_here = card.architecture.startswith("timm:") or (
            card.architecture in BUILTIN_ENCODERS)
        if built_here and not allow_random_weights:
            raise missing_weights(card)
        if not built_here:
            model_file(card, base)  # raises: TorchScript / export cards need their file
        return card
    model_file(card, base)
    return card
