"""Stain normalisation on real H&E patches (CMU-1-Small-Region), checked against the
published equations: Macenko's and Vahadane's stain vectors of the output are the
reference's, Reinhard's LAB statistics of the output are the reference's; Vahadane's
dictionary equals SPAMS' on the same pixels."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from wsi_sampler import PlanParams, make_plan, open_slide
from wsi_sampler.errors import InvalidRequestError
from wsi_sampler.extract import Extractor
from wsi_sampler.stain import StainNormalizer, nonnegative_lasso, vahadane_stains

# Macenko et al. 2009's reference H&E (columns: haematoxylin, eosin), as in the authors'
# reference implementation (mitkovetta/staining-normalization).
REFERENCE_HE = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])


@pytest.fixture(scope="module")
def patches(cmu_svs: Path) -> np.ndarray:
    with open_slide(cmu_svs) as slide:
        plan = make_plan(slide, PlanParams(strategy="random", n_patches=12, seed=3,
                                           patch_size_px=224, min_tissue_fraction=0.9))
        return np.concatenate([b.images for b in Extractor(slide, plan).iter_batches()])


def macenko_stain_vectors(patch: np.ndarray, i0: float = 240, beta: float = 0.15,
                          alpha: float = 1) -> np.ndarray:
    """The paper's steps, written here: optical density, pixels above beta, the plane of the
    two largest eigenvectors, the robust extreme angles, haematoxylin first."""
    od = -np.log((patch.reshape(-1, 3).astype(np.float64) + 1) / i0)
    od = od[(od >= beta).all(axis=1)]
    _, vectors = np.linalg.eigh(np.cov(od.T))
    plane = vectors[:, 1:3]
    angles = np.arctan2(*(od @ plane).T[::-1])
    lo, hi = np.percentile(angles, [alpha, 100 - alpha])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    stains = np.stack([v1, v2] if v1[0] > v2[0] else [v2, v1], axis=1)
    return stains * np.sign(stains.sum(axis=0))  # eigenvector signs are arbitrary


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(0) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0))


def test_macenko_gives_the_reference_stain_vectors(patches: np.ndarray) -> None:
    out = StainNormalizer("macenko")(patches)
    assert out.shape == patches.shape and out.dtype == np.uint8
    for before, after in zip(patches, out, strict=True):
        assert _cosines(macenko_stain_vectors(after), REFERENCE_HE).min() > 0.99
        # the input's own vectors are not the reference's: the test can fail
        assert not np.array_equal(before, after)


def test_macenko_fitted_to_a_patch_takes_its_stains(patches: np.ndarray) -> None:
    reference = patches[0]
    out = StainNormalizer("macenko", reference)(patches[1:4])
    target = macenko_stain_vectors(reference)
    for after in out:
        assert _cosines(macenko_stain_vectors(after), target).min() > 0.99


def _lab_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lab = cv2.cvtColor(images.astype(np.float32) / 255, cv2.COLOR_RGB2LAB).reshape(-1, 3)
    return lab.mean(0), lab.std(0)


def test_reinhard_matches_the_references_lab_statistics(patches: np.ndarray) -> None:
    # A reference stained otherwise (bluer, paler), so every patch has to move to match it.
    shifted = patches[0].astype(np.float32) * [0.85, 0.9, 1.1] + [20, 20, 10]
    reference = np.clip(shifted, 0, 255).astype(np.uint8)
    want_mean, want_std = _lab_stats(reference)
    out = StainNormalizer("reinhard", reference)(patches[1:])
    for before, after in zip(patches[1:], out, strict=True):
        mean, std = _lab_stats(after)
        old_mean, _ = _lab_stats(before)
        assert np.abs(old_mean - want_mean).max() > 5.0
        assert np.abs(mean - want_mean).max() < 2.0  # LAB units, after uint8 rounding
        assert np.abs(std - want_std).max() < 2.0


def test_background_goes_out_unchanged_and_is_counted() -> None:
    glass = np.full((2, 64, 64, 3), 243, np.uint8)
    normalizer = StainNormalizer("macenko")
    assert np.array_equal(normalizer(glass), glass)
    assert normalizer.unchanged == 2


def test_bad_requests_are_clear() -> None:
    with pytest.raises(InvalidRequestError, match="unknown stain normalisation"):
        StainNormalizer("vahadane-ish")
    with pytest.raises(InvalidRequestError, match="no stained pixels"):
        StainNormalizer("vahadane", np.full((32, 32, 3), 250, np.uint8))
    with pytest.raises(InvalidRequestError, match="reference patch"):
        StainNormalizer("reinhard")
    with pytest.raises(InvalidRequestError, match="no stained pixels"):
        StainNormalizer("macenko", np.full((32, 32, 3), 250, np.uint8))
    with pytest.raises(InvalidRequestError, match="uint8 patches"):
        StainNormalizer("macenko")(np.zeros((4, 4, 3), np.uint8))


def test_a_model_card_asking_for_stain_normalisation_gets_normalised_patches(
    patches: np.ndarray, tmp_path: Path
) -> None:
    # The model sees what StainNormalizer gives: a card with a Reinhard reference image
    # beside it answers as the same model without it answers on normalised patches.
    import torch
    from PIL import Image

    from tests.test_models import Tiny, save_torchscript, write_card
    from wsi_sampler.models import load_model

    torch.manual_seed(0)
    save_torchscript(Tiny().eval(), tmp_path / "tiny.pt")
    shifted = patches[0].astype(np.float32) * [0.85, 0.9, 1.1] + [20, 20, 10]
    reference = np.clip(shifted, 0, 255).astype(np.uint8)
    Image.fromarray(reference).save(tmp_path / "reference.png")
    small = np.ascontiguousarray(patches[1:5, :32, :32])
    plain = load_model(write_card(tmp_path / "plain.json"), device="cpu")
    stained = load_model(write_card(tmp_path / "stained.json", stain_normalization={
        "method": "reinhard", "reference": "reference.png"}), device="cpu")
    normalised = StainNormalizer("reinhard", reference)(small)
    np.testing.assert_allclose(stained.predict(small)["logits"],
                               plain.predict(normalised)["logits"], rtol=1e-6)
    assert not np.allclose(stained.predict(small)["logits"], plain.predict(small)["logits"])
    with pytest.raises(Exception, match="reinhard needs a reference"):
        load_model(write_card(tmp_path / "bad.json",
                              stain_normalization={"method": "reinhard"}), device="cpu")


# -- Vahadane ---------------------------------------------------------------------------
def test_the_nonnegative_lasso_is_exact() -> None:
    # against a fine grid search of the same objective, pixel by pixel
    rng = np.random.default_rng(0)
    w = np.abs(rng.normal(size=(3, 2)))
    x = np.abs(rng.normal(size=(3, 30)))
    h = nonnegative_lasso(w, x, 0.1)
    assert (h >= 0).all()
    grid = np.stack(np.meshgrid(np.linspace(0, 3, 301), np.linspace(0, 3, 301))).reshape(2, -1)

    def objective(hh: np.ndarray, xx: np.ndarray) -> np.ndarray:
        return 0.5 * ((xx - w @ hh) ** 2).sum(0) + 0.1 * hh.sum(0)

    for j in range(x.shape[1]):
        best = objective(grid, x[:, j:j + 1]).min()
        assert objective(h[:, j:j + 1], x[:, j:j + 1])[0] <= best + 1e-9


def _unit(m: np.ndarray) -> np.ndarray:
    return m / np.linalg.norm(m, axis=0)


def test_vahadane_recovers_known_stains() -> None:
    # An image made of two known stains (Ruifrok & Johnston's H and E OD vectors) with
    # sparse concentrations: the sparse NMF finds them.
    rng = np.random.default_rng(1)
    stains = _unit(np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]]))
    conc = rng.exponential(0.5, (2, 224 * 224)) * (rng.random((2, 224 * 224)) < 0.6)
    image = np.clip(255 * np.exp(-stains @ conc), 1, 255).astype(np.uint8).T
    found = vahadane_stains(image.reshape(224, 224, 3))
    assert found is not None
    assert _cosines(found[0][0], stains).min() > 0.995


# SPAMS 2.6.14 (spams-bin, the dictionary learner of Vahadane's method as StainTools runs
# it: trainDL K=2, lambda1=0.1, mode=2, modeD=0, posAlpha and posD, on OD = -ln(I/255) of
# the pixels with L < 0.8) on the first four patches of the fixture, unit columns,
# haematoxylin first. Run once in a separate environment (SPAMS is not a dependency).
SPAMS_DICTIONARIES = np.array([
    [[0.841, 0.403], [0.439, 0.805], [0.317, 0.436]],
    [[0.755, 0.309], [0.580, 0.838], [0.307, 0.450]],
    [[0.650, 0.391], [0.668, 0.802], [0.361, 0.452]],
    [[0.766, 0.408], [0.541, 0.793], [0.349, 0.452]],
])


def test_vahadane_finds_the_dictionary_spams_finds(patches: np.ndarray) -> None:
    for patch, spams_dictionary in zip(patches[:4], SPAMS_DICTIONARIES, strict=True):
        found = vahadane_stains(patch)
        assert found is not None
        assert _cosines(found[0][0], spams_dictionary).min() > 0.995


def test_vahadane_gives_the_reference_stain_vectors(patches: np.ndarray) -> None:
    out = StainNormalizer("vahadane")(patches[:4])
    for before, after in zip(patches[:4], out, strict=True):
        found = vahadane_stains(after)
        assert found is not None and _cosines(found[0][0], REFERENCE_HE).min() > 0.99
        assert _cosines(vahadane_stains(before)[0][0], REFERENCE_HE).min() < 0.99  # type: ignore[index]


# -- batched in torch (a GPU's path, run here on the CPU) --------------------------------
def test_torch_batched_equals_the_numpy_path(patches: np.ndarray) -> None:
    from wsi_sampler.stain_torch import TorchStainNormalizer

    glass = np.full((1, *patches.shape[1:]), 243, np.uint8)
    batch = np.concatenate([patches, glass])
    for method, reference in (("macenko", None), ("vahadane", None),
                              ("reinhard", patches[0])):
        numpy_path = StainNormalizer(method, reference)
        torch_path = TorchStainNormalizer(numpy_path, "cpu")
        want, got = numpy_path(batch), torch_path(batch)
        diff = np.abs(want.astype(int) - got.astype(int))
        # float32 vs float64, and OpenCV's tabulated sRGB gamma in its L*a*b*
        assert (diff <= 2).mean() > 0.999, (method, diff.max())
        if method != "reinhard":  # glass goes through unchanged, and is counted
            assert np.array_equal(got[-1], glass[0])
            assert torch_path.unchanged == numpy_path.unchanged == 1


def test_torch_lab_is_opencvs() -> None:
    import torch

    from wsi_sampler.stain_torch import lab_to_rgb, rgb_to_lab

    rgb = np.random.default_rng(0).random((2000, 1, 3)).astype(np.float32)
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)[:, 0]
    ours = rgb_to_lab(torch.from_numpy(rgb[:, 0]).double()).numpy()
    assert np.abs(ours - lab).max() < 0.5  # OpenCV tabulates the gamma curve
    back = cv2.cvtColor(lab[:, None], cv2.COLOR_LAB2RGB)[:, 0]
    assert np.abs(lab_to_rgb(torch.from_numpy(lab).double()).numpy() - back).max() < 1e-3


# -- augmentation ---------------------------------------------------------------------
def test_hed_jitter_scales_each_stain_within_its_bounds(patches: np.ndarray) -> None:
    from wsi_sampler.stain_augment import StainAugmenter, hed_concentrations

    augmenter = StainAugmenter(0.2, bias=0.0, seed=4)
    out = augmenter(patches[:6], indices=np.arange(10, 16))
    assert np.array_equal(out, augmenter(patches[:6], indices=np.arange(10, 16)))  # seeded
    assert not np.array_equal(out, StainAugmenter(0.2, bias=0.0, seed=5)(patches[:6]))
    for i, (before, after) in enumerate(zip(patches[:6], out, strict=True)):
        alpha, _ = augmenter.draw(10 + i)
        assert ((alpha >= 0.8) & (alpha <= 1.2)).all()
        c0, c1 = hed_concentrations(before), hed_concentrations(after)
        unclipped = (after.reshape(-1, 3) > 2).all(1) & (after.reshape(-1, 3) < 253).all(1)
        for stain in (0, 1):  # H and E: the concentration ratio is the drawn scale
            strong = unclipped & (c0[:, stain] > 0.3)
            ratio = np.median(c1[strong, stain] / c0[strong, stain])
            assert abs(ratio - alpha[stain]) < 0.03
    identity = StainAugmenter(0.0)(patches[:2])
    assert np.abs(identity.astype(int) - patches[:2].astype(int)).max() <= 1
    with pytest.raises(InvalidRequestError, match="sigma"):
        StainAugmenter(1.5)


def test_cli_patches_normalise_and_augment(cmu_svs: Path, tmp_path: Path) -> None:
    import json

    from tests.test_cli import run

    common = ("--strategy", "random", "-n", "4", "--size", "64", "--quiet")
    plain, done = tmp_path / "plain", run("patches", cmu_svs, "--out", tmp_path / "plain",
                                          *common)
    assert done.returncode == 0, done.stderr
    done = run("patches", cmu_svs, "--out", tmp_path / "aug", *common, "--stain-normalize",
               "macenko", "--stain-augment", "0.1", "--augment-seed", "3")
    assert done.returncode == 0, done.stderr
    a = cv2.imread(str(plain / "000000.png"))
    b = cv2.imread(str(tmp_path / "aug" / "000000.png"))
    assert a.shape == b.shape and not np.array_equal(a, b)
    meta = json.loads((tmp_path / "aug" / "run_metadata.json").read_text())
    assert meta["config"]["stain_normalize"] == "macenko"
    assert meta["config"]["stain_augment"] == 0.1
    done = run("patches", cmu_svs, "--out", tmp_path / "bad", *common, "--stain-normalize",
               "reinhard")
    assert done.returncode == 2 and "reference" in done.stderr
