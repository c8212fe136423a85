from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsi_sampler import InvalidRequestError
from wsi_sampler.sampling import draw_medgemma_magnification, sample_random, sample_stratified


@given(total=st.integers(0, 500), n=st.integers(1, 600), seed=st.integers(0, 2**31))
@settings(max_examples=60, deadline=None)
def test_random_is_sorted_unique_sized_and_seeded(total: int, n: int, seed: int) -> None:
    a = sample_random(total, n, np.random.default_rng(seed))
    b = sample_random(total, n, np.random.default_rng(seed))
    assert np.array_equal(a, b)
    assert len(a) == min(n, total)
    assert np.all(np.diff(a) > 0)
    assert a.size == 0 or (a.min() >= 0 and a.max() < total)


@given(
    side=st.integers(3, 40), n=st.integers(1, 200), seed=st.integers(0, 2**31),
    density=st.floats(0.2, 1.0),
)
@settings(max_examples=60, deadline=None)
def test_stratified_is_sorted_unique_and_exact(
    side: int, n: int, seed: int, density: float
) -> None:
    rng = np.random.default_rng(seed)
    gy, gx = np.mgrid[0:side, 0:side]
    keep = rng.random(side * side) < density
    x, y = (gx.ravel() * 256)[keep], (gy.ravel() * 256)[keep]
    if len(x) == 0:
        return
    idx = sample_stratified(x, y, n, np.random.default_rng(seed))
    assert len(idx) == min(n, len(x))
    assert np.all(np.diff(idx) > 0)
    assert np.array_equal(idx, sample_stratified(x, y, n, np.random.default_rng(seed)))


def test_stratified_spreads_better_than_random() -> None:
    """Largest empty gap: stratified picks leave smaller holes than random picks."""
    gy, gx = np.mgrid[0:60, 0:60]
    x, y = gx.ravel().astype(float), gy.ravel().astype(float)

    def worst_gap(idx: np.ndarray) -> float:
        px, py = x[idx], y[idx]
        d = np.hypot(x[:, None] - px[None, :], y[:, None] - py[None, :]).min(axis=1)
        return float(d.max())

    strat = [worst_gap(sample_stratified(x, y, 36, np.random.default_rng(s))) for s in range(5)]
    rand = [worst_gap(sample_random(len(x), 36, np.random.default_rng(s))) for s in range(5)]
    assert np.median(strat) < 0.8 * np.median(rand)


def test_medgemma_magnification_probabilities() -> None:
    rng = np.random.default_rng(123)
    draws = np.array([draw_medgemma_magnification(rng) for _ in range(20_000)])
    assert set(np.unique(draws)) == {5.0, 10.0, 20.0}
    for mag, p in ((5.0, 0.34), (10.0, 0.33), (20.0, 0.33)):
        assert abs((draws == mag).mean() - p) < 0.015


def test_n_must_be_positive() -> None:
    with pytest.raises(InvalidRequestError):
        sample_random(10, 0, np.random.default_rng(0))
    with pytest.raises(InvalidRequestError):
        sample_stratified(np.arange(3), np.arange(3), 0, np.random.default_rng(0))
