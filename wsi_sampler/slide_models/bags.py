"""Read an existing feature bag for a slide model: ours, TRIDENT's or CLAM's.

- ``.h5``: datasets ``features`` (N, D) and ``coords`` (N, 2) level-0 top-left corners — the
  layout our ``features.h5``, TRIDENT's ``features_<encoder>/<slide>.h5`` and CLAM's
  ``h5_files/<slide>.h5`` share. Patch size comes from ``coords``' attributes
  (``patch_size_level0``, else CLAM's ``patch_size`` × ``downsample``); TRIDENT also stores
  ``features`` as (1, N, D) in some versions, accepted.
- ``.pt``: CLAM's ``pt_files/<slide>.pt``, the (N, D) tensor alone (no coordinates: an
  answer and raw attention, no heatmap).

The bag must fit the slide model: its embedding size, and the encoder where the file names
one (our ``encoder`` attribute).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt

from ..errors import InvalidRequestError

__all__ = ["BAG_SUFFIXES", "Bag", "check_bag", "is_bag_path", "read_bag"]

BAG_SUFFIXES = (".h5", ".hdf5", ".pt")


def is_bag_path(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in BAG_SUFFIXES


@dataclass(frozen=True)
class Bag:
    """One slide's patch embeddings, in the file's row order."""

    name: str
    features: npt.NDArray[np.float32]
    coords: npt.NDArray[np.int64] | None = None
    patch_size_level0: int | None = None
    level0_size: tuple[int, int] | None = None
    encoder: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return int(self.features.shape[0])


def _patch_size_level0(attrs: dict[str, Any]) -> int | None:
    if "patch_size_level0" in attrs:
        return int(attrs["patch_size_level0"])
    if "patch_size" in attrs:  # CLAM: pixels at patch_level; downsample to level 0
        down = np.asarray(attrs.get("downsample", [1.0, 1.0]), np.float64).ravel()
        return int(round(float(attrs["patch_size"]) * float(down[0] if len(down) else 1.0)))
    return None


def _level0_size(attrs: dict[str, Any]) -> tuple[int, int] | None:
    if "level0_width" in attrs and "level0_height" in attrs:
        return int(attrs["level0_width"]), int(attrs["level0_height"])
    if "level_dim" in attrs and "downsample" in attrs:  # CLAM: dims of patch_level
        dim = np.asarray(attrs["level_dim"], np.float64).ravel()
        down = np.asarray(attrs["downsample"], np.float64).ravel()
        if len(dim) == 2 and len(down) == 2:
            return int(round(dim[0] * down[0])), int(round(dim[1] * down[1]))
    return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _encoder_of(file_attrs: dict[str, Any], feature_attrs: dict[str, Any]) -> str | None:
    for attrs in (file_attrs, feature_attrs):
        if "encoder" in attrs:
            return _text(attrs["encoder"])
    return None


def _read_h5(path: Path) -> Bag:
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise InvalidRequestError(f"{path.name}: no 'features' dataset (a feature bag "
                                          "has features (N, D) and coords (N, 2))")
            feats = np.asarray(f["features"][()], np.float32)
            coords = np.asarray(f["coords"][()], np.int64) if "coords" in f else None
            cattrs = dict(f["coords"].attrs) if "coords" in f else {}
            fattrs, featattrs = dict(f.attrs), dict(f["features"].attrs)
    except OSError as exc:
        raise InvalidRequestError(f"{path.name}: not a readable HDF5 feature bag ({exc})"
                                  ) from exc
    if feats.ndim == 3 and feats.shape[0] == 1:  # TRIDENT's (1, N, D)
        feats = feats[0]
    if coords is not None and coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if coords is not None and (coords.ndim != 2 or coords.shape != (feats.shape[0], 2)):
        raise InvalidRequestError(f"{path.name}: coords have shape {coords.shape}, expected "
                                  f"({feats.shape[0]}, 2): one row per feature row")
    return Bag(name=_bag_name(path), features=feats, coords=coords,
               patch_size_level0=_patch_size_level0(cattrs), level0_size=_level0_size(cattrs),
               encoder=_encoder_of(fattrs, featattrs),
               attrs={k: _plain(v) for k, v in (cattrs | fattrs).items() if k != "card"},
               source=str(path))


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return _text(value) if isinstance(value, bytes) else value


def _bag_name(path: Path) -> str:
    # score puts bags in slides/<key>/features.h5 (the folder names the slide),
    # predict-slide beside its answers as <slide>.features.h5
    if path.stem == "features" and path.parent.name:
        return path.parent.name
    return path.stem.removesuffix(".features") or path.stem


def _read_pt(path: Path) -> Bag:
    import torch

    try:
        tensor = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # any parser error on the bytes: a bad file
        raise InvalidRequestError(f"{path.name}: not a readable .pt feature bag "
                                  f"({str(exc).splitlines()[0][:200] if str(exc) else exc!r})"
                                  ) from exc
    if not isinstance(tensor, torch.Tensor):
        raise InvalidRequestError(f"{path.name}: a CLAM .pt bag holds one (N, D) tensor, "
                                  f"got {type(tensor).__name__}")
    return Bag(name=_bag_name(path), features=tensor.float().numpy(), source=str(path))


def read_bag(path: str | os.PathLike[str]) -> Bag:
    """Read a feature bag file (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise InvalidRequestError(f"{p}: no such feature bag")
    bag = _read_pt(p) if p.suffix.lower() == ".pt" else _read_h5(p)
    if bag.features.ndim != 2 or bag.features.shape[0] < 1:
        raise InvalidRequestError(f"{p.name}: features have shape {bag.features.shape}, "
                                  "expected (N, D) with N >= 1")
    if not np.isfinite(bag.features).all():
        raise InvalidRequestError(f"{p.name}: features hold NaN or infinite values")
    return bag


def check_bag(bag: Bag, *, embedding_dim: int, encoder: str, model: str) -> None:
    """The bag fits the slide model: embedding size, and the encoder where the file says."""
    dim = int(bag.features.shape[1])
    if dim != embedding_dim:
        raise InvalidRequestError(
            f"{bag.name}: the bag's features are {dim}-d but slide model {model!r} reads "
            f"{embedding_dim}-d {encoder} features")
    if bag.encoder is not None and bag.encoder != encoder:
        raise InvalidRequestError(
            f"{bag.name}: the bag was encoded by {bag.encoder!r} but slide model {model!r} "
            f"was trained on {encoder!r} features")

