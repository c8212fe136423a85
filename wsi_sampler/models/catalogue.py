"""Built-in cards of well-known pathology encoders (data: ``encoder_cards/*.json``).

Each card states the exact timm architecture, pooling, normalisation, input size and MPP of
a published encoder, its licence, where its weights are downloaded and the public sources
of every fact. No weights are bundled or downloaded: the user passes the file they were
granted (``--model uni2-h --weights /models/uni2-h/pytorch_model.bin``).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from ..errors import ModelLoadError
from .card import ModelCard

__all__ = ["catalogue_card", "catalogue_names"]



def _folder() -> resources.abc.Traversable:
    return resources.files("wsi_sampler.models").joinpath("encoder_cards")


@cache
def catalogue_names() -> tuple[str, ...]:
    """Names of the built-in encoder cards, sorted."""
    files = _folder().iterdir()
    return tuple(sorted(f.name.removesuffix(".json") for f in files if f.name.endswith(".json")))


def catalogue_card(name: str) -> ModelCard:
    """The built-in card called ``name`` (see :func:`catalogue_names`)."""
    if name not in catalogue_names():
        raise ModelLoadError(f"no built-in encoder {name!r} ({', '.join(catalogue_names())})")
    text = _folder().joinpath(f"{name}.json").read_text(encoding="utf-8")
    return ModelCard.model_validate(json.loads(text))
