"""Load models from local files, each with its card. Nothing is ever downloaded.

``load_model`` takes ``tissue-qc`` (built in), a built-in encoder name (``uni2-h``,
``virchow2``…: :mod:`.catalogue`), or a model card JSON path (or a model file with
``<stem>.json`` beside it); ``weights`` overrides the card's ``file``. The card's
``architecture`` picks the loader:

- ``torchscript``: ``torch.jit.load(file)``;
- ``torch-export``: ``torch.export.load(file).module()`` (a ``.pt2`` archive);
- ``timm:<arch>``: ``timm.create_model(arch, pretrained=False, num_classes=k, **timm_kwargs)``
  with the card's pooling, plus its weights (``.safetensors``, ``.bin``, ``.pth``), loaded
  strictly. Random weights only with ``allow_random_weights=True`` (tests and benchmarks)
  and no weights file.

Every model is then run once on a blank patch and must match its card, or loading fails.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from pydantic import ValidationError

from ..errors import ModelLoadError, ModelNotFoundError
from .card import ModelCard, load_card
from .catalogue import catalogue_card, catalogue_names
from .encoder import TokenPooling, build_timm
from .runtime import Model
from .tissue_qc import TissueQC, tissue_qc_card
from .weights import load_strict, read_state_dict

__all__ = ["BUILTIN_MODELS", "load_model", "preflight", "resolve_card"]

BUILTIN_MODELS = ("tissue-qc",)
log = logging.getLogger(__name__)


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


def _model_file(card: ModelCard, base: Path | None) -> Path:
    if card.file is None:
        raise ModelLoadError(f"model card {card.name!r} names no file for {card.architecture}")
    path = Path(card.file)
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: model file of {card.name!r} not found")
    return path


def _missing_weights(card: ModelCard) -> ModelLoadError:
    prov = card.provenance
    where = (f": download {prov.weights_file} from {prov.weights_url} (licence: {prov.licence})"
             f" and pass --weights PATH" if prov is not None else "")
    return ModelLoadError(
        f"model {card.name!r} needs its weights file{where}; random weights only with "
        "allow_random_weights (CLI: --random-weights), for tests and benchmarks")


def _load_timm(
    card: ModelCard, base: Path | None, arch: str, allow_random_weights: bool
) -> torch.nn.Module:
    if len(card.outputs) != 1:
        raise ModelLoadError(f"timm model {card.name!r}: the card must list exactly one output")
    out = card.outputs[0]
    module = build_timm(card, arch, num_classes=0 if out.class_names is None else out.width)
    if card.file is None:
        if not allow_random_weights:
            raise _missing_weights(card)
        return module
    weights = _model_file(card, base)
    state = read_state_dict(weights, prefix=card.weights_key_prefix)
    if out.class_names is None:
        _drop_head_keys(card, state, weights)
    # Checkpoints hold the timm model's own keys; pooling is ours and has no weights.
    target = module.backbone if isinstance(module, TokenPooling) else module
    load_strict(target, state, source=str(weights), what=f"timm {arch!r} (card {card.name!r})")
    return module


def _drop_head_keys(card: ModelCard, state: dict[str, torch.Tensor], source: Path) -> None:
    """An embedding has no classifier: remove the card's named head keys from ``state``."""
    dropped = [key for key in card.head_keys if state.pop(key, None) is not None]
    if dropped:
        log.info("%s: dropped the classifier head %s (model %r outputs its embedding)",
                 source.name, ", ".join(dropped), card.name)


def _load_module(
    card: ModelCard, base: Path | None, allow_random_weights: bool
) -> torch.nn.Module:
    arch = card.architecture
    if arch == "torchscript":
        path = _model_file(card, base)
        try:
            with warnings.catch_warnings():
                # torch >= 2.14 deprecates TorchScript; labs still have .pt files to serve.
                warnings.simplefilter("ignore", FutureWarning)
                module: torch.nn.Module = torch.jit.load(  # type: ignore[no-untyped-call]
                    str(path), map_location="cpu"
                )
        except (RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"{path}: not a TorchScript archive ({exc})") from exc
        return module
    if arch == "torch-export":
        path = _model_file(card, base)
        try:
            exported = torch.export.load(str(path))
        except (RuntimeError, ValueError, KeyError, OSError) as exc:
            raise ModelLoadError(f"{path}: not a torch.export (.pt2) archive ({exc})") from exc
        exported_module: torch.nn.Module = exported.module()
        return exported_module
    if arch.startswith("timm:"):
        return _load_timm(card, base, arch.removeprefix("timm:"), allow_random_weights)
    raise ModelLoadError(
        f"model card {card.name!r}: unknown architecture {arch!r} "
        "(builtin:tissue-qc, torchscript, torch-export, timm:<arch>)"
    )


def preflight(
    spec: str | Path, weights: str | Path | None = None, *, allow_random_weights: bool = False
) -> ModelCard:
    """The card of a model, once its files are known to exist: the checks a long run makes
    before any work (loading itself happens later, e.g. on each Dask worker)."""
    card, base = resolve_card(spec, weights)
    if card.architecture == "builtin:tissue-qc":
        return card
    if card.file is None:
        if card.architecture.startswith("timm:") and not allow_random_weights:
            raise _missing_weights(card)
        if not card.architecture.startswith("timm:"):
            _model_file(card, base)  # raises: TorchScript / export cards need their file
        return card
    _model_file(card, base)
    return card


def load_model(
    spec: str | Path, *, weights: str | Path | None = None, device: str = "auto",
    allow_random_weights: bool = False, compile_model: bool = False,
) -> Model:
    """Load a model by built-in name or card path (``weights``: its weights file), check it
    against its card, return it. ``compile_model``: ``torch.compile`` it (GPU serving)."""
    card, base = resolve_card(spec, weights)
    if card.architecture == "builtin:tissue-qc":
        return Model(TissueQC(), card, device=device, normalize=False)
    return Model(_load_module(card, base, allow_random_weights), card, device=device,
                 compile_model=compile_model)
