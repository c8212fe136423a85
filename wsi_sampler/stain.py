"""Stain normalisation of patches: Macenko (ISBI 2009) and Reinhard (2001).

Frame: patches are (N, H, W, 3) uint8 RGB, in and out, the same shape. Written from the
papers:

- **Macenko**: optical density OD = -ln((I + 1) / I0) with I0 = 240; the pixels whose every
  channel has OD >= beta = 0.15; the plane of the two largest eigenvectors of their OD
  covariance; the stain vectors at the alpha = 1st and 99th percentiles of the projected
  angles (haematoxylin: the one with the larger red OD); concentrations by least squares,
  scaled so their 99th percentiles equal the reference's; the image rebuilt with the
  reference stain matrix. The built-in reference is the H&E matrix and 99th-percentile
  concentrations of the authors' reference implementation (mitkovetta/staining-normalization,
  the values torchstain and StainTools also use).
- **Reinhard**: each CIE L*a*b* channel standardised and given the reference's mean and
  standard deviation. It needs a reference patch (there is no built-in one).

A patch Macenko cannot read (too few stained pixels to find two stain vectors: background,
a sliver of tissue) goes out unchanged and is counted in ``unchanged``. Vahadane's sparse
NMF is not offered yet.
"""

from __future__ import annotations

import threading
from typing import Literal, get_args

import cv2
import numpy as np
import numpy.typing as npt

from .errors import InvalidRequestError
from .types import RGBImage

__all__ = ["MACENKO_REFERENCE", "STAIN_METHODS", "StainMethod", "StainNormalizer",
           "macenko_stains"]

StainMethod = Literal["macenko", "reinhard"]
STAIN_METHODS: tuple[str, ...] = get_args(StainMethod)

I0 = 240.0
BETA = 0.15
ALPHA = 1.0
MIN_STAINED_PX = 64
"""Macenko needs this many pixels with every channel's optical density >= BETA."""

MACENKO_REFERENCE = (
    np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]]),  # H, E columns (RGB OD)
    np.array([1.9705, 1.0308]),  # their concentrations' 99th percentiles
)

Stains = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]
"""(3 x 2 stain matrix, 2 concentration 99th percentiles)."""


def _optical_density(patch: RGBImage) -> npt.NDArray[np.float64]:
    od: npt.NDArray[np.float64] = -np.log((patch.reshape(-1, 3).astype(np.float64) + 1) / I0)
    return od


def macenko_stains(patch: RGBImage) -> tuple[Stains, npt.NDArray[np.float64]] | None:
    """The patch's stain matrix and concentration percentiles, and its concentrations
    (2 x pixels); None where too few pixels are stained to tell two stains apart."""
    od = _optical_density(patch)
    stained = od[(od >= BETA).all(axis=1)]
    if len(stained) < MIN_STAINED_PX:
        return None
    _, vectors = np.linalg.eigh(np.cov(stained.T))
    plane = vectors[:, 1:3]
    projected = stained @ plane
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    lo, hi = np.percentile(angles, [ALPHA, 100 - ALPHA])
    v_lo = plane @ np.array([np.cos(lo), np.sin(lo)])
    v_hi = plane @ np.array([np.cos(hi), np.sin(hi)])
    matrix = np.stack([v_lo, v_hi] if v_lo[0] > v_hi[0] else [v_hi, v_lo], axis=1)
    if not np.isfinite(matrix).all() or np.linalg.matrix_rank(matrix) < 2:
        return None
    concentrations = np.linalg.lstsq(matrix, od.T, rcond=None)[0]
    maxima = np.percentile(concentrations, 99, axis=1)
    if not (np.isfinite(maxima).all() and (np.abs(maxima) > 1e-6).all()):
        return None
    return (matrix, maxima), concentrations


def _lab(patch: RGBImage) -> npt.NDArray[np.float32]:
    lab: npt.NDArray[np.float32] = cv2.cvtColor(patch.astype(np.float32) / 255,
                                                cv2.COLOR_RGB2LAB)
    return lab


class StainNormalizer:
    """Normalise patches to a reference's stain appearance (thread-safe)."""

    def __init__(self, method: str, reference: RGBImage | None = None) -> None:
        if method not in STAIN_METHODS:
            raise InvalidRequestError(f"unknown stain normalisation {method!r} "
                                      f"({', '.join(STAIN_METHODS)})")
        if reference is not None and (reference.ndim != 3 or reference.shape[2] != 3
                                      or reference.dtype != np.uint8):
            raise InvalidRequestError("the stain reference must be an (H, W, 3) uint8 RGB image")
        self.method = method
        self.unchanged = 0
        """Patches Macenko could not read, passed through as they were."""
        self._lock = threading.Lock()
        self._stains: Stains = MACENKO_REFERENCE
        self._lab_mean = self._lab_std = np.zeros(3, np.float32)
        if method == "macenko" and reference is not None:
            fitted = macenko_stains(reference)
            if fitted is None:
                raise InvalidRequestError("the stain reference has (almost) no stained pixels:"
                                          " choose a patch with tissue")
            self._stains = fitted[0]
        elif method == "reinhard":
            if reference is None:
                raise InvalidRequestError("reinhard matches a reference's L*a*b* statistics: "
                                          "give a reference patch")
            lab = _lab(reference).reshape(-1, 3)
            self._lab_mean, self._lab_std = lab.mean(axis=0), lab.std(axis=0)

    def _macenko(self, patch: RGBImage) -> RGBImage:
        with np.errstate(all="ignore"):
            found = macenko_stains(patch)
        if found is None:
            with self._lock:
                self.unchanged += 1
            return patch
        (_, maxima), concentrations = found
        reference_matrix, reference_maxima = self._stains
        scaled = concentrations * (reference_maxima / maxima)[:, None]
        rebuilt = np.minimum(I0 * np.exp(-reference_matrix @ scaled), 255)
        return rebuilt.T.reshape(patch.shape).astype(np.uint8)

    def _reinhard(self, patch: RGBImage) -> RGBImage:
        lab = _lab(patch)
        flat = lab.reshape(-1, 3)
        mean, std = flat.mean(axis=0), flat.std(axis=0)
        matched = (lab - mean) / np.maximum(std, 1e-6) * self._lab_std + self._lab_mean
        rgb = cv2.cvtColor(matched.astype(np.float32), cv2.COLOR_LAB2RGB)
        out: RGBImage = np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)
        return out

    def __call__(self, patches: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """The normalised copy of (N, H, W, 3) uint8 ``patches``."""
        if patches.ndim != 4 or patches.shape[3] != 3 or patches.dtype != np.uint8:
            raise InvalidRequestError(f"expected (N, H, W, 3) uint8 patches, got "
                                      f"{patches.shape} {patches.dtype}")
        one = self._macenko if self.method == "macenko" else self._reinhard
        out = np.empty_like(patches)
        for i, patch in enumerate(patches):
            out[i] = one(np.ascontiguousarray(patch))
        return out
