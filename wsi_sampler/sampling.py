"""Sampling strategies: pure functions choosing among candidate patches.

Every function returns sorted indices into the candidate arrays, so the chosen patches
keep the candidates' spatial (row-major) order. Randomness comes only from the
``numpy.random.Generator`` passed in, so a seed fixes the result.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .errors import InvalidRequestError

__all__ = [
    "MEDGEMMA_MAGNIFICATIONS",
    "draw_medgemma_magnification",
    "sample_random",
    "sample_stratified",
]

Indices = npt.NDArray[np.int64]

MEDGEMMA_MAGNIFICATIONS: tuple[tuple[float, float], ...] = ((5.0, 0.34), (10.0, 0.33), (20.0, 0.33))
"""(magnification, probability) of the MedGemma 1.5 whole-slide recipe."""


def _check_n(n: int) -> None:
    if n < 1:
        raise InvalidRequestError(f"the number of patches to sample must be >= 1, got {n}")


def sample_random(n_candidates: int, n: int, rng: np.random.Generator) -> Indices:
    """Choose ``n`` of ``n_candidates`` uniformly without replacement (all if fewer)."""
    _check_n(n)
    if n >= n_candidates:
        return np.arange(n_candidates, dtype=np.int64)
    return np.sort(rng.choice(n_candidates, size=n, replace=False)).astype(np.int64)


def _occupied_cells(x: np.ndarray, y: np.ndarray, cell: float) -> np.ndarray:
    """Cell id of each point on a square grid of side ``cell``."""
    cx = np.floor((x - x.min()) / cell).astype(np.int64)
    cy = np.floor((y - y.min()) / cell).astype(np.int64)
    return cy * (int(cx.max()) + 1) + cx  # type: ignore[no-any-return]


def sample_stratified(
    x: npt.NDArray[np.integer] | npt.NDArray[np.floating],
    y: npt.NDArray[np.integer] | npt.NDArray[np.floating],
    n: int,
    rng: np.random.Generator,
) -> Indices:
    """Choose ``n`` candidates spread evenly over the area they cover.

    Finds (by bisection) the square cell size whose occupied cells number about ``n``,
    takes one random candidate per occupied cell, then trims or tops up at random to
    exactly ``n``. Dense and sparse regions of tissue thus get patches in proportion to
    their area, not to chance.
    """
    _check_n(n)
    total = len(x)
    if n >= total:
        return np.arange(total, dtype=np.int64)
    xf, yf = np.asarray(x, np.float64), np.asarray(y, np.float64)
    lo, hi = 1e-9, max(float(np.ptp(xf)), float(np.ptp(yf)), 1.0) * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        cells = _occupied_cells(xf, yf, mid)
        if len(np.unique(cells)) >= n:
            lo = mid
        else:
            hi = mid
    cells = _occupied_cells(xf, yf, lo)
    order = rng.permutation(total)
    _, first = np.unique(cells[order], return_index=True)
    picked = order[first]
    if len(picked) > n:
        picked = rng.choice(picked, size=n, replace=False)
    elif len(picked) < n:
        rest = np.setdiff1d(np.arange(total), picked)
        picked = np.concatenate([picked, rng.choice(rest, size=n - len(picked), replace=False)])
    return np.sort(picked).astype(np.int64)


def draw_medgemma_magnification(rng: np.random.Generator) -> float:
    """Draw the slide's magnification: 5x (p=.34), 10x (p=.33) or 20x (p=.33)."""
    mags = [m for m, _ in MEDGEMMA_MAGNIFICATIONS]
    probs = [p for _, p in MEDGEMMA_MAGNIFICATIONS]
    return float(mags[int(rng.choice(len(mags), p=probs))])
