"""Feature bags: one HDF5 per slide with an encoder's embeddings, in the layout CLAM and
TRIDENT (and the MIL code written for them) read: dataset ``features`` (N, D) and dataset
``coords`` (N, 2) int64, level-0 top-left corners, row i of one = row i of the other.

The ``patch_size`` clash. CLAM and TRIDENT both put ``patch_size`` on ``coords`` but mean
different frames: CLAM's ``Whole_Slide_Bag_FP`` reads ``read_region(xy, patch_level,
(patch_size, patch_size))`` (pixels at ``patch_level``); TRIDENT's ``read_coords`` feeds
``patch_size`` at ``target_magnification`` to its patcher, which reads ``patch_size *
level0_magnification / target_magnification`` level-0 pixels. We write both tools'
attributes so that they describe the *same region*: ``patch_size`` is in the frame of
``patch_level`` (the pyramid level we read from), and ``target_magnification`` is that
level's magnification, so TRIDENT's level-0 size equals ``patch_size_level0`` and CLAM's
read covers the same pixels. What the encoder actually saw is stated in our own attributes:
``patch_size_px`` at ``target_mpp`` µm/px (``model_magnification``). When the read level has
the model's resolution (e.g. a 20x scan and a 20x encoder) the two frames coincide.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Literal

import h5py
import numpy as np
import numpy.typing as npt

from ._io import atomic_path, atomic_write_bytes
from .errors import InvalidRequestError
from .models import ModelCard
from .plan import PatchPlan
from .slide import Slide

__all__ = ["FeatureBag", "FeaturesDtype", "coords_attrs", "read_features_h5",
           "write_coords_dataset", "write_features_h5", "write_features_pt"]

FeaturesDtype = Literal["float32", "float16"]


def _magnification(value: float) -> float | int:
    """Magnifications as labs write them: 40, 20, 10 (ints when whole), else 3 decimals."""
    return int(round(value)) if abs(value - round(value)) < 1e-6 else round(value, 3)


def coords_attrs(plan: PatchPlan, slide: Slide) -> dict[str, Any]:
    """Attributes of a ``coords`` dataset that CLAM's and TRIDENT's readers both use (see
    the module docstring for the ``patch_size`` convention), plus ours."""
    level_dim = np.array(slide.level_dimensions[plan.level], np.int64)
    size_at_level = round(plan.width0 / plan.downsample)
    mag0 = 10.0 / plan.slide_mpp[0]
    overlap = float(plan.params.get("overlap", 0.0) or 0.0)
    return {
        # CLAM (create_patches_fp.py / Whole_Slide_Bag_FP)
        "patch_size": size_at_level, "patch_level": plan.level,
        "downsample": np.array([plan.downsample, plan.downsample]),
        "downsampled_level_dim": level_dim, "level_dim": level_dim, "name": slide.stem,
        # TRIDENT (IO.coords_to_h5 / read_coords)
        "patch_size_level0": plan.width0, "level0_magnification": _magnification(mag0),
        "target_magnification": _magnification(mag0 / plan.downsample),
        "overlap": round(overlap * size_at_level),
        "level0_width": plan.slide_dimensions[0], "level0_height": plan.slide_dimensions[1],
        # What the model saw
        "patch_size_px": plan.patch_size_px, "target_mpp": plan.target_mpp,
        "model_magnification": _magnification(10.0 / plan.target_mpp),
        "slide_mpp": plan.slide_mpp[0],
    }


def write_coords_dataset(f: h5py.File, plan: PatchPlan, slide: Slide) -> None:
    """``coords`` (N, 2) int64, level-0 top-left, with :func:`coords_attrs`."""
    dset = f.create_dataset("coords", data=plan.coords.astype(np.int64))
    for key, value in coords_attrs(plan, slide).items():
        dset.attrs[key] = value


def _checked_features(features: npt.ArrayLike, plan: PatchPlan, dtype: str
                      ) -> npt.NDArray[np.floating[Any]]:
    if dtype not in ("float32", "float16"):
        raise InvalidRequestError(f"features dtype must be float32 or float16, got {dtype!r}")
    arr = np.asarray(features)
    if arr.ndim != 2 or arr.shape[0] != len(plan):
        raise InvalidRequestError(
            f"features have shape {arr.shape}, expected ({len(plan)}, D): one row per patch")
    return arr.astype(dtype, copy=False)


def write_features_h5(
    path: str | os.PathLike[str], plan: PatchPlan, slide: Slide, features: npt.ArrayLike,
    card: ModelCard, *, dtype: FeaturesDtype = "float32",
) -> None:
    """One slide's feature bag: ``features`` (N, D), ``coords`` (N, 2) with CLAM's and
    TRIDENT's attributes (and ``excluded`` (N,) bool when the plan keeps patches artefact
    exclusion would have dropped); the encoder, its card and the slide fingerprint as file
    attrs."""
    arr = _checked_features(features, plan, dtype)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        feats = f.create_dataset("features", data=arr)
        feats.attrs["name"] = slide.stem
        feats.attrs["encoder"] = card.name
        write_coords_dataset(f, plan, slide)
        if plan.excluded is not None:  # patches exclusion would have dropped, kept marked
            f.create_dataset("excluded", data=plan.excluded.astype(np.bool_))
        f.attrs["encoder"] = card.name
        f.attrs["encoder_version"] = card.version
        f.attrs["card"] = card.model_dump_json()
        f.attrs["pooling"] = card.pooling
        f.attrs["slide"] = slide.name
        f.attrs["slide_fingerprint"] = slide.fingerprint
        f.attrs["strategy"] = plan.strategy


def write_features_pt(
    path: str | os.PathLike[str], features: npt.ArrayLike, *,
    dtype: FeaturesDtype = "float32",
) -> None:
    """CLAM's ``pt_files/<slide>.pt``: the (N, D) features as one torch tensor, in the same
    dtype as the slide's ``features.h5`` (CLAM's training and evaluation feed both files to
    a float32 model as stored, so a float16 bag needs a cast there)."""
    import io

    import torch

    if dtype not in ("float32", "float16"):
        raise InvalidRequestError(f"features dtype must be float32 or float16, got {dtype!r}")
    buf = io.BytesIO()
    torch.save(torch.from_numpy(np.ascontiguousarray(features, dtype=dtype)), buf)
    atomic_write_bytes(path, buf.getvalue())


@dataclass(frozen=True)
class FeatureBag:
    features: npt.NDArray[np.floating[Any]]
    coords: npt.NDArray[np.int64]
    coords_attrs: dict[str, Any]
    attrs: dict[str, Any]

    @property
    def card(self) -> ModelCard:
        return ModelCard.model_validate(json.loads(str(self.attrs["card"])))


def read_features_h5(path: str | os.PathLike[str]) -> FeatureBag:
    """Read a feature bag written by :func:`write_features_h5`."""
    with h5py.File(path, "r") as f:
        return FeatureBag(features=f["features"][:], coords=f["coords"][:],
                          coords_attrs=dict(f["coords"].attrs), attrs=dict(f.attrs))
