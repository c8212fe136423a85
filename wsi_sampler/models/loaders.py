"""Load models from local files, each with its card. Nothing is ever downloaded.

``load_model`` takes ``tissue-qc`` (built in) or a model card JSON path (or a model file
with ``<stem>.json`` beside it). The card's ``architecture`` picks the loader:

- ``torchscript``: ``torch.jit.load(file)``;
- ``torch-export``: ``torch.export.load(file).module()`` (a ``.pt2`` archive);
- ``timm:<arch>``: ``timm.create_model(arch, pretrained=False, num_classes=k)`` plus the
  card's ``.safetensors`` weights, loaded strictly. Random weights only with
  ``allow_random_weights=True`` (meant for benchmarks) and no ``file``.

Every model is then run once on a blank patch and must match its card, or loading fails.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..errors import ModelLoadError, ModelNotFoundError
from .card import ModelCard, load_card
from .runtime import Model
from .tissue_qc import TissueQC, tissue_qc_card

__all__ = ["BUILTIN_MODELS", "load_model", "resolve_card"]

BUILTIN_MODELS = ("tissue-qc",)


def resolve_card(spec: str | Path) -> tuple[ModelCard, Path | None]:
    """Return the card for ``spec`` and the folder its ``file`` is relative to."""
    text = str(spec)
    if text in BUILTIN_MODELS or text == "builtin:tissue-qc":
        return tissue_qc_card(), None
    path = Path(spec)
    if path.suffix.lower() != ".json":
        beside = path.with_suffix(".json")
        if not path.exists():
            raise ModelNotFoundError(
                f"{path}: no such model (built in: {', '.join(BUILTIN_MODELS)}; or give a "
                "model card .json)"
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


def _load_timm(
    card: ModelCard, base: Path | None, arch: str, allow_random_weights: bool
) -> torch.nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise ModelLoadError(
            f"model {card.name!r} needs timm: pip install 'wsi-sampler[timm]'"
        ) from exc
    if len(card.outputs) != 1:
        raise ModelLoadError(f"timm model {card.name!r}: the card must list exactly one output")
    out = card.outputs[0]
    features = out.class_names is None
    try:
        module: torch.nn.Module = timm.create_model(
            arch, pretrained=False, num_classes=0 if features else out.width
        )
    except RuntimeError as exc:  # timm: "Unknown model"
        raise ModelLoadError(f"timm has no architecture {arch!r} ({exc})") from exc
    if card.file is None:
        if not allow_random_weights:
            raise ModelLoadError(
                f"model card {card.name!r} names no weights file; random weights are only "
                "allowed with allow_random_weights (CLI: --random-weights), for benchmarks"
            )
        return module
    from safetensors.torch import load_file

    weights = _model_file(card, base)
    try:
        state = load_file(str(weights))
        module.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{weights}: weights do not fit timm {arch!r}: {first}") from exc
    return module


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


def load_model(
    spec: str | Path, *, device: str = "auto", allow_random_weights: bool = False
) -> Model:
    """Load a model by built-in name or card path, check it against its card, return it."""
    card, base = resolve_card(spec)
    if card.architecture == "builtin:tissue-qc":
        return Model(TissueQC(), card, device=device, normalize=False)
    return Model(_load_module(card, base, allow_random_weights), card, device=device)
