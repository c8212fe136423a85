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

import contextlib
import logging
import os
import re
import warnings
from pathlib import Path

import torch

from ..errors import ModelLoadError
from .card import ModelCard
from .encoder import BUILTIN_ENCODERS, TokenPooling, build_encoder
from .resolve import BUILTIN_MODELS, missing_weights, model_file, preflight, resolve_card
from .runtime import Model
from .tissue_qc import TissueQC
from .weights import load_strict, read_state_dict

__all__ = ["BUILTIN_MODELS", "load_model", "preflight", "resolve_card"]

log = logging.getLogger(__name__)


def _load_encoder(
    card: ModelCard, base: Path | None, arch: str, allow_random_weights: bool
) -> torch.nn.Module:
    if len(card.outputs) != 1:
        raise ModelLoadError(f"model {card.name!r}: the card must list exactly one output")
    out = card.outputs[0]
    # The weights are found before the network is built: a missing file is said at once,
    # not after building a ViT-H (~18 s on 2 cores).
    if card.file is None and not allow_random_weights:
        raise missing_weights(card)
    weights = model_file(card, base) if card.file is not None else None
    module = build_encoder(card, num_classes=0 if out.class_names is None else out.width)
    if weights is None:
        return module
    state = read_state_dict(weights, prefix=card.weights_key_prefix)
    if card.weights_layout == "swin-original":
        state = swin_original_to_timm(state)
    if out.class_names is None:
        _drop_head_keys(card, state, weights)
    if card.unused_key_prefixes:  # CONCH: its text tower and caption decoder
        state = {k: v for k, v in state.items() if not k.startswith(card.unused_key_prefixes)}
    # Checkpoints hold the timm model's own keys; pooling is ours and has no weights.
    target = module.backbone if isinstance(module, TokenPooling) else module
    load_strict(target, state, source=str(weights), what=f"{arch} (card {card.name!r})")
    return module


_STAGE_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
_SWIN_BUFFERS = ("relative_position_index", "attn_mask")


def swin_original_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Swin's original layout in today's timm's: the stored buffers (relative-position
    index, attention masks: timm recomputes them) dropped, and each stage's downsample moved
    from the end of stage i to the start of stage i + 1 (timm's own conversion of such
    checkpoints, ``swin_transformer.checkpoint_filter_fn``, does the same)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] in _SWIN_BUFFERS:
            continue
        out[_STAGE_DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.",
                                  key)] = value
    return out


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
        path = model_file(card, base)
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
        path = model_file(card, base)
        try:
            exported = torch.export.load(str(path))
        except (RuntimeError, ValueError, KeyError, OSError) as exc:
            raise ModelLoadError(f"{path}: not a torch.export (.pt2) archive ({exc})") from exc
        exported_module: torch.nn.Module = exported.module()
        return exported_module
    if arch.startswith("timm:") or arch in BUILTIN_ENCODERS:
        return _load_encoder(card, base, arch.removeprefix("timm:"), allow_random_weights)
    raise ModelLoadError(
        f"model card {card.name!r}: unknown architecture {arch!r} "
        "(builtin:tissue-qc, builtin:conch-v1, torchscript, torch-export, timm:<arch>)"
    )


def load_model(
    spec: str | Path, *, weights: str | Path | None = None, device: str = "auto",
    allow_random_weights: bool = False, compile_model: bool = False,
    precision: str | None = None,
) -> Model:
    """Load a model by built-in name or card path (``weights``: its weights file), check it
    against its card, return it. ``compile_model``: ``torch.compile`` it (GPU serving);
    ``precision``: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (see :mod:`.precision`; default:
    the ``WSI_PRECISION`` environment variable, else ``auto``)."""
    precision = precision or os.environ.get("WSI_PRECISION") or "auto"
    card, base = resolve_card(spec, weights)
    if card.architecture == "builtin:tissue-qc":  # integer-valued measures: fp32 only
        model = Model(TissueQC(), card, device=device, normalize=False, precision="fp32")
        model.precision_info.update(requested=precision,
                                    reason="tissue-qc computes in fp32 (pixel measures)")
        return model
    return Model(_load_module(card, base, allow_random_weights), card, device=device,
                 compile_model=compile_model, precision=precision,
                 model_key=_model_key(card, base))


def _model_key(card: ModelCard, base: Path | None) -> str | None:
    """Name, version and the weights file's identity (path, size, mtime), for the
    precision check's cache; None for random weights (never cached: each run draws anew)."""
    if card.file is None:
        return None
    with contextlib.suppress(ModelLoadError, OSError):
        path = model_file(card, base)
        st = path.stat()
        return (f"{card.name}|{card.version}|{card.architecture}|{path.resolve()}|"
                f"{st.st_size}|{st.st_mtime_ns}")
    return None
