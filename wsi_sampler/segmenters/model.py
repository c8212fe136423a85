"""A tissue segmenter built from its card, with the publisher's checkpoint loaded strictly.

The architecture comes from the library the publisher used (torchvision's
``deeplabv3_resnet50`` for HEST), never copied. Checkpoints: a state dict, a ``.safetensors``
file, or a Lightning ``.ckpt`` (``{"state_dict": …}``, ``model.`` on every key, the training
-only auxiliary head's ``aux_classifier.*`` keys dropped, as HEST's own loader does).
Every key of the model must then be in the file and no other, shapes equal.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from ..errors import ModelLoadError
from ..models.precision import choose_precision, precision_context
from ..models.runtime import select_device
from ..models.weights import StateDict, load_strict, read_state_dict
from .card import SegmenterCard, load_segmenter_card

__all__ = ["Segmenter", "build_segmenter", "cached_segmenter", "load_segmenter"]

_TRAINING_ONLY = ("aux_classifier.",)
_WRAPPER_PREFIXES = ("model.", "module.", "net.", "_orig_mod.")


def build_segmenter(card: SegmenterCard) -> nn.Module:
    """The card's architecture with no weights loaded (and none downloaded)."""
    if card.architecture.startswith("smp_"):
        return _build_smp(card)
    from torchvision.models.segmentation import (  # type: ignore[import-untyped]
        deeplabv3_resnet50,
    )

    kwargs = {"num_classes": 2, **card.architecture_kwargs}
    try:
        # weights_backbone=None: torchvision would otherwise fetch ImageNet weights
        module: nn.Module = deeplabv3_resnet50(weights=None, weights_backbone=None,
                                               aux_loss=False, **kwargs)
        return module
    except TypeError as exc:
        raise ModelLoadError(f"segmenter {card.name}: {exc}") from exc


def _build_smp(card: SegmenterCard) -> nn.Module:
    try:
        import segmentation_models_pytorch as smp  # type: ignore[import-untyped]
    except ImportError as exc:
        raise ModelLoadError(f"segmenter {card.name} is built with segmentation_models_pytorch"
                             ": pip install 'wsi-sampler[segment]'") from exc
    builder = {"smp_unetplusplus": smp.UnetPlusPlus, "smp_unet": smp.Unet}[card.architecture]
    try:
        with warnings.catch_warnings():
            # smp deprecates its "timm-" encoders in favour of "tu-" ones with other keys:
            # the publisher's checkpoint has the "timm-" layout, which is what is built here
            warnings.filterwarnings("ignore", message="`timm-` encoders are deprecated",
                                    category=DeprecationWarning)
            # encoder_weights=None: smp would otherwise fetch ImageNet weights
            module: nn.Module = builder(encoder_weights=None, activation=None,
                                        **card.architecture_kwargs)
    except (TypeError, KeyError, ValueError) as exc:
        raise ModelLoadError(f"segmenter {card.name}: {exc}") from exc
    return module


def _fit_keys(state: StateDict, expected: set[str]) -> StateDict:
    """Strip the wrapper prefixes every key shares and drop training-only keys."""
    changed = True
    while changed and state and not set(state) <= expected:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k.removeprefix(prefix): v for k, v in state.items()}
                changed = True
    return {k: v for k, v in state.items() if not k.startswith(_TRAINING_ONLY)}


class Segmenter:
    """Tiles in, tissue masks out: (N, tile_px, tile_px, 3) uint8 -> (N, tile_px, tile_px)
    bool, on ``device`` (``auto``: CUDA if there is one) in the precision ``auto`` picks."""

    def __init__(self, module: nn.Module, card: SegmenterCard, *, device: str = "auto"
                 ) -> None:
        self.card = card
        self.device = select_device(device)
        self.precision = choose_precision("auto", self.device).precision
        self.module = module.eval().to(self.device)
        norm = card.normalization
        self._mean = torch.tensor(norm.mean, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(norm.std, device=self.device).view(1, 3, 1, 1) * 255

    def classes(self, tiles: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """The winning output channel of every pixel, (N, tile_px, tile_px) uint8."""
        x = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device)
        x = (x.permute(0, 3, 1, 2).float() - self._mean) / self._std
        with torch.inference_mode(), precision_context(self.precision, self.device):
            out = self.module(x.contiguous(memory_format=torch.channels_last))
        logits = out["out"] if isinstance(out, dict) else out
        return logits.float().argmax(dim=1).to(torch.uint8).cpu().numpy()  # type: ignore[no-any-return]

    def tissue(self, tiles: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
        """Where the tissue class wins, (N, tile_px, tile_px) bool."""
        tissue: npt.NDArray[np.bool_] = self.classes(tiles) == self.card.tissue_class
        return tissue


def load_segmenter(spec: str | Path | SegmenterCard, *, weights: str | Path | None = None,
                   device: str = "auto", allow_random_weights: bool = False) -> Segmenter:
    """Build the card's segmenter and load its weights strictly (``weights`` replaces the
    card's ``file``). Random weights only with ``allow_random_weights`` (tests)."""
    card = spec if isinstance(spec, SegmenterCard) else load_segmenter_card(spec)
    path = weights if weights is not None else card.file
    if path is None:  # said before the network is built
        if not allow_random_weights:
            raise ModelLoadError(
                f"segmenter {card.name} needs its weights file: --segmenter-weights FILE "
                f"({card.provenance.weights_file if card.provenance else 'the checkpoint'}"
                f"{', from ' + card.provenance.weights_url if card.provenance else ''})")
        return Segmenter(build_segmenter(card), card, device=device)
    source = Path(path)
    if not source.is_file():
        raise ModelLoadError(f"{source}: segmenter weights not found")
    module = build_segmenter(card)
    state = _fit_keys(read_state_dict(source), set(module.state_dict()))
    load_strict(module, {k: v.float() if v.is_floating_point() else v
                         for k, v in state.items()},
                source=str(source), what=f"segmenter {card.name} ({card.architecture})")
    return Segmenter(module, card, device=device)


@functools.lru_cache(maxsize=2)
def _cached(name: str, weights: str | None, stamp: tuple[int, int]) -> Segmenter:
    return load_segmenter(name, weights=weights)


def cached_segmenter(name: str, weights: str | None) -> Segmenter:
    """``load_segmenter(name, weights=…)``, loaded once per file (size and mtime) for the
    slides of a batch."""
    try:
        st = os.stat(weights) if weights else None
    except OSError:
        st = None
    stamp = (st.st_size, st.st_mtime_ns) if st else (0, 0)
    return _cached(name, weights, stamp)
