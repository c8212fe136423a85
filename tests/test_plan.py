from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import box

from tests.conftest import DEMO_SPEC
from wsi_sampler import (
    InvalidRequestError,
    MissingMppError,
    PlanParams,
    TissueMask,
    compute_tissue_mask,
    make_plan,
    medgemma_params,
    open_slide,
)
from wsi_sampler.demo import render_tissue_mask


def test_mpp_math_224_at_half_micron_reads_448_of_level0(demo_slide: Path) -> None:
    with open_slide(demo_slide) as s:
        plan = make_plan(s, PlanParams(patch_size_px=224, target_mpp=0.5))
    assert (plan.width0, plan.height0) == (448, 448)
    assert plan.target_mpp == 0.5
    assert plan.level == 0 and plan.downsample == 1.0  # the demo has levels 1, 4 only
    assert len(plan) > 0 and np.all(plan.x0 % 448 == 0) and np.all(plan.y0 % 448 == 0)


def test_magnification_and_coarse_level(demo_slide: Path) -> None:
    with open_slide(demo_slide) as s:
        plan = make_plan(s, PlanParams(patch_size_px=256, magnification=2.5))
    assert plan.target_mpp == pytest.approx(4.0)
    assert (plan.width0, plan.height0) == (4096, 4096)
    assert plan.level == 1 and plan.downsample == 4.0


def test_default_target_is_native_resolution(demo_slide: Path) -> None:
    with open_slide(demo_slide) as s:
        plan = make_plan(s, PlanParams(patch_size_px=512))
    assert plan.target_mpp == 0.25 and plan.width0 == 512


def test_grid_is_row_major_inside_slide_and_on_tissue(demo_slide: Path) -> None:
    with open_slide(demo_slide) as s:
        plan = make_plan(s, PlanParams(patch_size_px=256, min_tissue_fraction=0.9))
    keys = plan.y0 * 10**6 + plan.x0
    assert np.all(np.diff(keys) > 0)
    assert np.all(plan.x0 + plan.width0 <= DEMO_SPEC.width)
    assert np.all(plan.y0 + plan.height0 <= DEMO_SPEC.height)
    truth = render_tissue_mask(DEMO_SPEC, (DEMO_SPEC.height // 16, DEMO_SPEC.width // 16))
    centres = truth[(plan.y0 + 128) // 16, (plan.x0 + 128) // 16]
    assert centres.mean() > 0.99
    assert np.all(plan.tissue_fraction >= 0.9)


def test_min_tissue_fraction_and_overlap(demo_slide: Path) -> None:
    with open_slide(demo_slide) as s:
        tm = compute_tissue_mask(s)
        loose = make_plan(s, PlanParams(min_tissue_fraction=0.1), tissue=tm)
        strict = make_plan(s, PlanParams(min_tissue_fraction=0.9), tissue=tm)
        overlapped = make_plan(s, PlanParams(min_tissue_fraction=0.9, overlap=0.5), tissue=tm)
    assert len(loose) > len(strict) > 0
    assert set(zip(strict.x0, strict.y0, strict=True)) <= set(zip(loose.x0, loose.y0, strict=True))
    steps = np.unique(np.diff(np.unique(overlapped.x0)))
    assert steps.min() == 128
    assert 3.2 < len(overlapped) / len(strict) < 4.8


@pytest.mark.parametrize("strategy", ["random", "stratified"])
def test_sampling_strategies_subset_of_grid_in_order(demo_slide: Path, strategy: str) -> None:
    with open_slide(demo_slide) as s:
        tm = compute_tissue_mask(s)
        grid = make_plan(s, PlanParams(), tissue=tm)
        params = PlanParams(strategy=strategy, n_patches=25, seed=3)  # type: ignore[arg-type]
        a = make_plan(s, params, tissue=tm)
        b = make_plan(s, params, tissue=tm)
        c = make_plan(s, PlanParams(strategy=strategy, n_patches=25, seed=4), tissue=tm)  # type: ignore[arg-type]
    assert len(a) == 25 and a.n_candidates == len(grid)
    assert np.array_equal(a.coords, b.coords)
    assert not np.array_equal(a.coords, c.coords)
    grid_keys = set(zip(grid.x0.tolist(), grid.y0.tolist(), strict=True))
    assert set(zip(a.x0.tolist(), a.y0.tolist(), strict=True)) <= grid_keys
    assert np.all(np.diff(a.y0 * 10**6 + a.x0) > 0)


def test_medgemma_preset(medgemma_slide: Path) -> None:
    with open_slide(medgemma_slide) as s:
        tm = compute_tissue_mask(s, tissue_mpp=2.0)
        fixed = make_plan(s, medgemma_params(seed=1, magnification=20, max_patches=10), tissue=tm)
        full = make_plan(s, medgemma_params(seed=1, magnification=20), tissue=tm)
        at5x = make_plan(s, medgemma_params(seed=1, magnification=5), tissue=tm)
    assert tm.mpp == 2.0  # the recipe's 5x tissue mask
    assert fixed.patch_size_px == 896 and fixed.target_mpp == 0.5
    assert fixed.width0 == 896 and at5x.width0 == 3584 and at5x.level == 1
    assert len(fixed) == 10 and fixed.n_candidates > 126
    # non-overlapping regular grid: coordinates on multiples of the patch size
    assert np.all(fixed.x0 % 896 == 0) and np.all(fixed.y0 % 896 == 0)
    assert np.all(np.diff(fixed.y0 * 10**6 + fixed.x0) > 0)
    assert len(full) == 126
    # Both samples are drawn from the same non-overlapping 20x grid over tissue.
    with open_slide(medgemma_slide) as s:
        grid = make_plan(s, PlanParams(patch_size_px=896, target_mpp=0.5, tissue_mpp=2.0),
                         tissue=tm)
    assert len(grid) == full.n_candidates
    candidates = set(zip(grid.x0.tolist(), grid.y0.tolist(), strict=True))
    for plan in (fixed, full):
        assert set(zip(plan.x0.tolist(), plan.y0.tolist(), strict=True)) <= candidates
    assert medgemma_params().n_patches == 126


def test_medgemma_draws_magnification_from_seed(medgemma_slide: Path) -> None:
    with open_slide(medgemma_slide) as s:
        tm = compute_tissue_mask(s, tissue_mpp=2.0)
        mags = {make_plan(s, medgemma_params(seed=k), tissue=tm).magnification for k in range(30)}
        again = [make_plan(s, medgemma_params(seed=k), tissue=tm).magnification for k in range(5)]
        first = [make_plan(s, medgemma_params(seed=k), tissue=tm).magnification for k in range(5)]
    assert mags == {5.0, 10.0, 20.0}
    assert again == first


def test_same_plan_on_both_backends(cmu_svs: Path, dapi_ndpi: Path) -> None:
    for path in (cmu_svs, dapi_ndpi):
        plans = []
        for backend in ("openslide", "tiffslide"):
            with open_slide(path, backend=backend) as s:  # type: ignore[arg-type]
                plans.append(make_plan(s, PlanParams(strategy="random", n_patches=20, seed=5,
                                                     target_mpp=0.5, patch_size_px=224)))
        assert len(plans[0]) > 0
        assert np.array_equal(plans[0].coords, plans[1].coords), path.name


def test_roi_restricts_patches(demo_slide: Path) -> None:
    with open_slide(demo_slide) as s:
        tm = compute_tissue_mask(s)
        full = make_plan(s, PlanParams(), tissue=tm)
        left = make_plan(s, PlanParams(), tissue=tm, roi=box(0, 0, 3000, DEMO_SPEC.height))
    assert 0 < len(left) < len(full)
    assert np.all(left.x0 + left.width0 <= 3000 + 256)


def test_user_mask_replaces_detection(demo_slide: Path) -> None:
    with open_slide(demo_slide) as s:
        tm = compute_tissue_mask(s)
        only_top_left = np.zeros_like(tm.mask)
        only_top_left[:20, :20] = True
        plan = make_plan(s, PlanParams(min_tissue_fraction=1.0),
                         tissue=TissueMask(only_top_left, tm.mpp, tm.scale))
    assert len(plan) == (20 * 32 // 256) ** 2


def test_blank_slide_plan_is_explicitly_empty(blank_slide: Path) -> None:
    with open_slide(blank_slide) as s:
        plan = make_plan(s, PlanParams(strategy="random", n_patches=5))
    assert len(plan) == 0 and plan.n_candidates == 0
    assert plan.to_dict()["patches"] == []


def test_plan_needs_mpp(kidney_tif: Path) -> None:
    with open_slide(kidney_tif) as s, pytest.raises(MissingMppError):
        make_plan(s, PlanParams())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"strategy": "spiral"},
        {"patch_size_px": 0},
        {"overlap": 1.0},
        {"min_tissue_fraction": 1.5},
        {"strategy": "random"},
        {"n_patches": 0},
        {"target_mpp": -1.0},
        {"target_mpp": 0.5, "magnification": 20.0},
        {"strategy": "medgemma", "target_mpp": 0.5},
        {"tissue_mpp": 0.0},
    ],
)
def test_invalid_params(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidRequestError):
        PlanParams(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("layout", ["grid", "scattered"])
def test_box_fractions_count_every_mask_pixel_of_each_box(layout: str) -> None:
    # Grid boxes are summed a band of rows at a time, scattered ones from one table of the
    # whole mask: both must equal the mean of the mask pixels each box covers.
    from wsi_sampler.plan import _box_fractions

    rng = np.random.default_rng(3)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(5, 200, 2))
        mask = rng.random((h, w)) < rng.random()
        sx, sy = (float(v) for v in rng.uniform(1, 40, 2))
        w0, h0 = (int(v) for v in rng.integers(1, 500, 2))
        if layout == "grid":
            # Rows a box apart or more: the banded path.
            gy, gx = np.meshgrid(np.arange(0, h * sy, int(h0 * rng.uniform(1, 2))),
                                 np.arange(0, w * sx, int(rng.integers(1, 400))), indexing="ij")
            xs, ys = gx.ravel().astype(np.int64), gy.ravel().astype(np.int64)
        else:
            xs, ys = rng.integers(0, int(w * sx), 300), rng.integers(0, int(h * sy), 300)
        ax = np.clip(np.floor(xs / sx).astype(int), 0, w - 1)
        bx = np.clip(np.ceil((xs + w0) / sx).astype(int), ax + 1, w)
        ay = np.clip(np.floor(ys / sy).astype(int), 0, h - 1)
        by = np.clip(np.ceil((ys + h0) / sy).astype(int), ay + 1, h)
        expected = [mask[a:b, c:d].mean() for a, b, c, d in zip(ay, by, ax, bx, strict=True)]
        got = _box_fractions(mask, (sx, sy), xs, ys, w0, h0)
        assert np.array_equal(got, np.asarray(expected, np.float32))


def test_a_plan_keeps_what_an_exclusion_of_most_tissue_would_drop_marked(
    demo_slide: Path, tmp_path: Path
) -> None:
    from dataclasses import replace

    from wsi_sampler import TissueParams
    from wsi_sampler.export import write_csv, write_geojson

    with open_slide(demo_slide) as s:
        normal = make_plan(s, PlanParams())
        unexcluded = make_plan(s, PlanParams(tissue=TissueParams(exclude_pen=False,
                                                                 exclude_dark=False)))
        # everything below value 255 counts as dark: the exclusion removes all the tissue
        dark = replace(TissueParams(), dark_value=255)
        kept = make_plan(s, PlanParams(tissue=dark))
        strict = make_plan(s, PlanParams(tissue=replace(dark, strict_exclusion=True)))
    # the demo slide's pen strokes: a small share, dropped, reported, no warning
    report = normal.selection["exclusion"]
    assert report["detector"] == "classical" and report["classes"] == ["pen", "dark"]
    assert 0 < report["excluded_share"] < 0.5 and report["excluded_mm2"]["pen"] > 0
    assert report["tissue_mm2_before"] > report["tissue_mm2_after"] > 0
    assert normal.excluded is None and normal.note() is None
    assert "exclusion" not in unexcluded.selection and len(unexcluded) > len(normal)
    # all of it: the patches stay, marked, and the plan says so
    assert kept.selection["exclusion"]["excluded_share"] == 1.0
    assert kept.selection["exclusion"]["kept_marked"] is True
    assert len(kept) == len(unexcluded) and kept.excluded is not None and kept.excluded.all()
    assert np.array_equal(kept.coords, unexcluded.coords)
    note = kept.note()
    assert note is not None and "removed 100% of the tissue" in note and "marked" in note
    assert all(r["excluded"] is True for r in kept.to_dict()["patches"])
    write_csv(tmp_path / "p.csv", kept)
    header, first = (tmp_path / "p.csv").read_text().splitlines()[:2]
    assert header.split(",")[5] == "excluded" and first.split(",")[5] == "1"
    write_geojson(tmp_path / "p.geojson", kept)
    assert '"excluded": 1.0' in (tmp_path / "p.geojson").read_text()
    # strict: dropped, and the empty plan says why
    assert len(strict) == 0 and strict.excluded is None
    assert strict.why_empty() is not None and "strict_exclusion" in strict.why_empty()
    assert "removed 100% of the tissue" in (strict.note() or "")


def test_a_plan_marks_only_the_patches_the_exclusion_hit(demo_slide: Path) -> None:
    # max_excluded_share 0: any exclusion keeps its patches, and marks exactly those whose
    # tissue it took below the threshold (or halved)
    from wsi_sampler import TissueParams

    with open_slide(demo_slide) as s:
        dropped = make_plan(s, PlanParams())
        marked = make_plan(s, PlanParams(tissue=TissueParams(max_excluded_share=0.0)))
    assert marked.excluded is not None and 0 < marked.excluded.sum() < len(marked)
    clean = {tuple(c) for c in marked.coords[~marked.excluded]}
    assert clean <= {tuple(c) for c in dropped.coords}
    assert len(clean) >= len(dropped) - 2  # at most a cell or two hover at the threshold


def test_exclusion_settings_are_checked() -> None:
    from wsi_sampler import TissueParams

    with pytest.raises(InvalidRequestError, match="needs the artefact model's weights"):
        TissueParams(exclude_artifacts=("fold",))
    with pytest.raises(InvalidRequestError, match="unknown artefact class 'smudge'"):
        TissueParams(exclude_artifacts="pen,smudge")
    with pytest.raises(InvalidRequestError, match="max_excluded_share"):
        TissueParams(max_excluded_share=1.5)
    only_pen = TissueParams(exclude_artifacts="pen, pen")
    assert only_pen.exclude_artifacts == ("pen",)
    assert only_pen.classical_exclusion() == (True, False)
    deep = TissueParams(artifact_weights="w.pth")
    assert deep.classical_exclusion() == (False, False)
    assert deep.deep_exclusion() == ("fold", "dark_spot", "pen", "air_bubble", "out_of_focus")
