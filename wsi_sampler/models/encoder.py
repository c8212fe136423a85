"""Build a timm model exactly as its card describes: arguments, layer classes, pooling.

Layer classes are named in the card (JSON has no classes): ``mlp_layer`` from timm's layers
(``Mlp``, ``GluMlp``, ``SwiGLU``, ``SwiGLUPacked``), ``act_layer`` and ``norm_layer`` from
``torch.nn`` (``SiLU``, ``GELU``, ``LayerNorm``…), ``embed_layer`` from
:mod:`wsi_sampler.models.layers` (``ConvStem``: CTransPath's). Pooling other than ``model``
reads the token sequence of a ViT (``forward_features``) and skips its register tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ModelLoadError
from .card import BUILTIN_ENCODERS, ModelCard, Pooling
from .layers import EMBED_LAYERS

__all__ = ["BUILTIN_ENCODERS", "TokenPooling", "build_encoder", "build_timm",
           "resolve_timm_kwargs"]

_MLP_LAYERS = ("Mlp", "GluMlp", "SwiGLU", "SwiGLUPacked")
_TORCH_LAYERS = {"act_layer": ("SiLU", "GELU", "ReLU", "Tanh", "Sigmoid", "Identity"),
                 "norm_layer": ("LayerNorm", "GroupNorm", "BatchNorm2d", "Identity")}


def _layer_class(key: str, name: Any) -> type[torch.nn.Module]:
    import timm.layers

    if not isinstance(name, str):
        raise ModelLoadError(f"timm_kwargs.{key} must be a layer class name, got {name!r}")
    if key == "embed_layer":
        if name not in EMBED_LAYERS:
            raise ModelLoadError(f"timm_kwargs.embed_layer: unknown layer {name!r} "
                                 f"({', '.join(EMBED_LAYERS)})")
        return EMBED_LAYERS[name]
    allowed = _MLP_LAYERS if key == "mlp_layer" else _TORCH_LAYERS[key]
    if name not in allowed:
        raise ModelLoadError(f"timm_kwargs.{key}: unknown layer {name!r} ({', '.join(allowed)})")
    module = timm.layers if key == "mlp_layer" else torch.nn
    cls: type[torch.nn.Module] = getattr(module, name)
    return cls


def resolve_timm_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The card's ``timm_kwargs`` with layer class names replaced by the classes."""
    return {k: _layer_class(k, v) if k in ("mlp_layer", "embed_layer") or k in _TORCH_LAYERS
            else v for k, v in kwargs.items()}


class TokenPooling(torch.nn.Module):
    """A ViT whose token sequence is pooled: class token, mean of patch tokens, or both."""

    def __init__(self, backbone: torch.nn.Module, pooling: Pooling) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens: torch.Tensor = self.backbone.forward_features(x)  # type: ignore[operator]
        # timm normalises after pooling (fc_norm) instead of before when global_pool="avg";
        # elsewhere fc_norm is the identity.
        post: Any = getattr(self.backbone, "fc_norm", torch.nn.Identity())
        cls: torch.Tensor = post(tokens[:, 0])
        mean: torch.Tensor = post(tokens[:, self.prefix_tokens:].mean(dim=1))
        if self.pooling == "cls":
            return cls
        if self.pooling == "mean":
            return mean
        return torch.cat([cls, mean], dim=-1)


def build_timm(card: ModelCard, arch: str, num_classes: int) -> torch.nn.Module:
    """``timm.create_model(arch, pretrained=False, num_classes, **timm_kwargs)`` + pooling.

    Built on the current default device: under ``torch.device("meta")`` it takes no memory
    (used to check the catalogue's dimensions and parameter counts)."""
    try:
        import timm
    except ImportError as exc:
        raise ModelLoadError(
            f"model {card.name!r} needs timm: pip install 'wsi-sampler[timm]'") from exc
    try:
        module: torch.nn.Module = timm.create_model(
            arch, pretrained=False, num_classes=num_classes,
            **resolve_timm_kwargs(card.timm_kwargs))
    except (RuntimeError, TypeError, ValueError, AssertionError) as exc:  # unknown arch / kwarg
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(
            f"timm cannot build {arch!r} from card {card.name!r}: {first}") from exc
    if card.pooling == "model":
        return module
    if not (hasattr(module, "forward_features") and hasattr(module, "num_prefix_tokens")):
        raise ModelLoadError(f"pooling {card.pooling!r} needs a ViT; {arch!r} has no token "
                             "sequence (use pooling 'model')")
    if num_classes:
        raise ModelLoadError(f"pooling {card.pooling!r} is for embeddings; card {card.name!r} "
                             "has class names")
    return TokenPooling(module, card.pooling)


def build_encoder(card: ModelCard, num_classes: int = 0) -> torch.nn.Module:
    """The card's encoder architecture with no weights: ``timm:<arch>`` or a built-in one
    (``builtin:conch-v1``, :mod:`.conch`). Under ``torch.device("meta")`` it takes no
    memory."""
    if card.architecture == "builtin:conch-v1":
        from .conch import ConchImageEncoder

        if num_classes:
            raise ModelLoadError(f"{card.name}: builtin:conch-v1 is an embedding model")
        return ConchImageEncoder(image_size=card.input_size_px or card.patch_size_px,
                                 **resolve_timm_kwargs(card.timm_kwargs))
    if not card.architecture.startswith("timm:"):
        raise ModelLoadError(f"{card.name}: {card.architecture!r} is not an encoder "
                             "architecture (timm:<arch>, builtin:conch-v1)")
    return build_timm(card, card.architecture.removeprefix("timm:"), num_classes)
