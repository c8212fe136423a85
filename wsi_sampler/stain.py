"""Stain normalisation of patches: Macenko (ISBI 2009), Vahadane (IEEE TMI 2016) and
Reinhard (2001).

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
- **Vahadane**: the stain matrix W (3 x 2, non-negative, unit columns) and sparse
  non-negative concentrations H of the tissue pixels' optical density (OD = -ln(I / 255),
  luminance L* < 80 of 100) by sparse NMF, min ||OD - W H||^2 / 2 + lambda * sum(H),
  lambda = 0.1: alternating an exact non-negative lasso for H (two stains: the best of
  the four supports, pixel by pixel) and Mairal et al.'s block-coordinate dictionary
  update for W (columns in the unit ball), started from Macenko's vectors; then every
  pixel's concentrations with lambda = 0.01, scaled as Macenko's, rebuilt with the
  reference's matrix (built in: Macenko's H&E reference).
- **Reinhard**: each CIE L*a*b* channel standardised and given the reference's mean and
  standard deviation. It needs a reference patch (there is no built-in one).

A patch Macenko or Vahadane cannot read (too few stained pixels to find two stain vectors:
background, a sliver of tissue) goes out unchanged and is counted in ``unchanged``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Literal, get_args

import cv2
import numpy as np
import numpy.typing as npt

from .errors import InvalidRequestError
from .types import RGBImage

__all__ = ["MACENKO_REFERENCE", "STAIN_METHODS", "StainMethod", "StainNormalizer",
           "load_stain_reference", "macenko_stains", "nonnegative_lasso", "vahadane_stains"]

StainMethod = Literal["macenko", "vahadane", "reinhard"]
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
    plane = plane * np.sign(plane.sum(axis=0))  # OD vectors are positive: no sign flips
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


VAHADANE_LAMBDA = 0.1
"""The sparsity weight of Vahadane's dictionary learning (the paper's lambda)."""
VAHADANE_CODE_LAMBDA = 0.01
"""The sparsity weight of the concentrations every pixel gets once W is known."""
VAHADANE_ITERATIONS = 30
VAHADANE_MAX_FIT_PX = 20_000
"""Tissue pixels the dictionary is learned on (a seeded sample of larger patches)."""
LAB_MIN_STD = 1e-3
"""Reinhard: a channel whose spread is below this (a uniform patch) is not stretched."""
LUMINANCE_TISSUE = 80.0
"""Vahadane: pixels with L* (0..100) below this are tissue."""


def nonnegative_lasso(w: npt.NDArray[np.float64], x: npt.NDArray[np.float64], lam: float
                      ) -> npt.NDArray[np.float64]:
    """argmin over h >= 0 of ||x - W h||^2 / 2 + lam * sum(h), exactly, for a 3 x 2 ``w``
    and every column of ``x`` (3 x N)."""
    return _two_unknowns(w.T @ w, w.T @ x, lam)


def _two_unknowns(gram: npt.NDArray[np.float64], lin: npt.NDArray[np.float64], lam: float
                  ) -> npt.NDArray[np.float64]:
    """argmin over h >= 0 of h' G h / 2 - lin' h + lam * sum(h) for each column of ``lin``
    (2 x N; G 2 x 2 positive semi-definite): the best of the four supports (both, either
    one, none), which is the optimum of this convex problem."""
    best = np.zeros_like(lin)
    best_f = np.zeros(lin.shape[1])  # the objective at h = 0
    for i in (0, 1):  # one unknown alone
        if gram[i, i] <= 0:
            continue
        h = np.maximum(0.0, (lin[i] - lam) / gram[i, i])
        f = 0.5 * gram[i, i] * h * h - lin[i] * h + lam * h
        better = f < best_f
        best[:, better] = 0.0
        best[i, better], best_f[better] = h[better], f[better]
    if abs(np.linalg.det(gram)) > 1e-12:  # both
        h2 = np.linalg.solve(gram, lin - lam)
        f = 0.5 * np.einsum("in,ij,jn->n", h2, gram, h2) - (lin * h2).sum(0) + lam * h2.sum(0)
        better = (h2 >= 0).all(axis=0) & (f < best_f)
        best[:, better] = h2[:, better]
    return best


def vahadane_optical_density(patch: RGBImage) -> npt.NDArray[np.float64]:
    """Beer-Lambert with the 8-bit white, OD = -ln(max(I, 1) / 255) (pixels x 3)."""
    od: npt.NDArray[np.float64] = -np.log(np.maximum(patch.reshape(-1, 3), 1) / 255.0)
    return od


def _dictionary_step(w: npt.NDArray[np.float64], a: npt.NDArray[np.float64],
                     b: npt.NDArray[np.float64], sweeps: int = 10) -> npt.NDArray[np.float64]:
    """min over W >= 0 with columns in the unit ball of ||X - W H||^2 / 2, given A = H H'
    and B = X H': block coordinate descent over the columns, each the exact minimiser
    with the other fixed, projected (Mairal et al. 2009's dictionary update)."""
    w = w.copy()
    for _ in range(sweeps):
        for j in (0, 1):
            if a[j, j] <= 1e-12:
                continue
            column = np.maximum((b[:, j] - w @ a[:, j]) / a[j, j] + w[:, j], 0.0)
            w[:, j] = column / max(1.0, float(np.linalg.norm(column)))
    return w


def _unit_columns(w: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    norms = np.linalg.norm(w, axis=0)
    out: npt.NDArray[np.float64] = w / np.where(norms > 0, norms, 1.0)
    return out


def vahadane_stains(patch: RGBImage) -> tuple[Stains, npt.NDArray[np.float64]] | None:
    """The patch's stain matrix (haematoxylin first) and concentration percentiles by sparse
    NMF, and its concentrations (2 x pixels); None where too few pixels are tissue."""
    od = vahadane_optical_density(patch)
    luminance = cv2.cvtColor(patch.reshape(-1, 1, 3), cv2.COLOR_RGB2LAB)[:, 0, 0]
    tissue = od[(luminance.astype(np.float64) * 100 / 255 < LUMINANCE_TISSUE)
                & (od > 0).all(axis=1)]
    if len(tissue) < MIN_STAINED_PX:
        return None
    if len(tissue) > VAHADANE_MAX_FIT_PX:
        rng = np.random.default_rng(0)
        tissue = tissue[rng.choice(len(tissue), VAHADANE_MAX_FIT_PX, replace=False)]
    start = macenko_stains(patch)
    w = np.abs(start[0][0]) if start is not None else MACENKO_REFERENCE[0].copy()
    x = tissue.T
    for _ in range(VAHADANE_ITERATIONS):
        h = nonnegative_lasso(w, x, VAHADANE_LAMBDA)
        w = _dictionary_step(w, h @ h.T, x @ h.T)
    if np.linalg.matrix_rank(w) < 2:
        return None
    if w[0, 0] < w[0, 1]:  # haematoxylin, the larger red OD, first
        w = w[:, ::-1].copy()
    concentrations = nonnegative_lasso(w, od.T, VAHADANE_CODE_LAMBDA)
    maxima = np.percentile(concentrations, 99, axis=1)
    if not (np.isfinite(maxima).all() and (maxima > 1e-6).all()):
        return None
    return (w, maxima), concentrations


def _lab(patch: RGBImage) -> npt.NDArray[np.float32]:
    lab: npt.NDArray[np.float32] = cv2.cvtColor(patch.astype(np.float32) / 255,
                                                cv2.COLOR_RGB2LAB)
    return lab


def load_stain_reference(path: str | Path) -> RGBImage:
    """A reference image (PNG, JPEG, TIFF) as (H, W, 3) uint8 RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb: RGBImage = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise InvalidRequestError(f"cannot read the stain reference {path} ({exc})") from exc
    return rgb


_STAIN_FINDERS = {"macenko": macenko_stains, "vahadane": vahadane_stains}


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
        """Patches Macenko or Vahadane could not read, passed through as they were."""
        self._lock = threading.Lock()
        self._stains: Stains = MACENKO_REFERENCE
        self._lab_mean = self._lab_std = np.zeros(3, np.float32)
        if method in ("macenko", "vahadane") and reference is not None:
            fitted = _STAIN_FINDERS[method](reference)
            if fitted is None:
                raise InvalidRequestError("the stain reference has (almost) no stained pixels:"
                                          " choose a patch with tissue")
            self._stains = fitted[0]
        elif method == "reinhard":
            if reference is None:
                raise InvalidRequestError("reinhard matches a reference's L*a*b* statistics: "
                                          "give a reference patch")
            lab = _lab(reference).reshape(-1, 3)
            self._lab_mean = lab.mean(axis=0, dtype=np.float64).astype(np.float32)
            self._lab_std = lab.std(axis=0, dtype=np.float64).astype(np.float32)

    @property
    def reference_stains(self) -> Stains:
        """Macenko / Vahadane: the reference's stain matrix and concentration percentiles."""
        return self._stains

    @property
    def reference_lab(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Reinhard: the reference's L*a*b* means and standard deviations."""
        return self._lab_mean, self._lab_std

    def _deconvolved(self, patch: RGBImage) -> RGBImage:
        """Macenko's or Vahadane's: the patch's concentrations on the reference's stains."""
        with np.errstate(all="ignore"):
            found = _STAIN_FINDERS[self.method](patch)
        if found is None:
            with self._lock:
                self.unchanged += 1
            return patch
        (_, maxima), concentrations = found
        reference_matrix, reference_maxima = self._stains
        scaled = concentrations * (reference_maxima / maxima)[:, None]
        white = 255.0 if self.method == "vahadane" else I0
        rebuilt = np.minimum(white * np.exp(-reference_matrix @ scaled), 255)
        return rebuilt.T.reshape(patch.shape).astype(np.uint8)

    def _reinhard(self, patch: RGBImage) -> RGBImage:
        lab = _lab(patch)
        flat = lab.reshape(-1, 3)
        # float64 sums: numpy's float32 column means drift (0.014 L* on a uniform patch)
        mean, std = flat.mean(axis=0, dtype=np.float64), flat.std(axis=0, dtype=np.float64)
        matched = (lab - mean) / np.maximum(std, LAB_MIN_STD) * self._lab_std + self._lab_mean
        rgb = cv2.cvtColor(matched.astype(np.float32), cv2.COLOR_LAB2RGB)
        out: RGBImage = np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)
        return out

    def __call__(self, patches: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """The normalised copy of (N, H, W, 3) uint8 ``patches``."""
        if patches.ndim != 4 or patches.shape[3] != 3 or patches.dtype != np.uint8:
            raise InvalidRequestError(f"expected (N, H, W, 3) uint8 patches, got "
                                      f"{patches.shape} {patches.dtype}")
        one = self._reinhard if self.method == "reinhard" else self._deconvolved
        out = np.empty_like(patches)
        for i, patch in enumerate(patches):
            out[i] = one(np.ascontiguousarray(patch))
        return out
