"""The MedGemma bag: never empty while there is tissue, in the recipe's or the notebook's
order, and the explicit-defaults request of generated clients."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from api.schemas import SamplingRequest
from wsi_sampler import InvalidRequestError, make_plan, medgemma_params, open_slide
from wsi_sampler.demo import DemoSlideSpec, write_demo_slide
from wsi_sampler.medgemma import select_bag

# An ordinary biopsy (6 x 4.5 mm at 0.5 µm/px): no 5x cell is half tissue here.
BIOPSY = DemoSlideSpec(width=12_000, height=9_000, mpp=0.5, seed=5, pen=False, artefact=False)
# Smaller than one 5x patch (896 px at 2 µm/px = 3,584 px at 0.5 µm/px).
CHIP = DemoSlideSpec(width=2_400, height=1_800, mpp=0.5, seed=2, pen=False, artefact=False)


@pytest.fixture(scope="module")
def biopsy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_slide(tmp_path_factory.mktemp("biopsy") / "biopsy.svs", BIOPSY)


@pytest.fixture(scope="module")
def chip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_slide(tmp_path_factory.mktemp("chip") / "chip.svs", CHIP)


@pytest.mark.parametrize("magnification", [5.0, 10.0, 20.0])
@pytest.mark.parametrize("which", ["biopsy", "demo_slide"])
def test_the_bag_is_never_empty(request: pytest.FixtureRequest, which: str,
                                magnification: float) -> None:
    with open_slide(request.getfixturevalue(which)) as slide:
        plan = make_plan(slide, medgemma_params(seed=7, magnification=magnification))
    assert len(plan) > 0 and plan.patch_size_px == 896
    rule = plan.selection["rule"]  # the 2 x 1.5 mm test demo is smaller than a 5x patch
    assert rule in ("min_tissue_fraction", "filled_by_tissue_rank", "edge_cells")
    assert len(plan) == plan.selection["n_above_threshold"] + plan.selection["n_filled"]
    assert (plan.tissue_fraction > 0).all()
    order = np.lexsort((plan.x0, plan.y0))  # row-major: top row first, left to right
    np.testing.assert_array_equal(order, np.arange(len(plan)))
    if rule == "filled_by_tissue_rank":  # every cell reaching the threshold is in the bag
        assert plan.selection["n_above_threshold"] == plan.n_candidates


def test_the_5x_bag_is_filled_most_tissue_first(biopsy: Path) -> None:
    with open_slide(biopsy) as slide:
        plan = make_plan(slide, medgemma_params(seed=7, magnification=5, max_patches=3))
        full = make_plan(slide, medgemma_params(seed=7, magnification=5))
    assert plan.n_candidates == 0 and plan.selection["rule"] == "filled_by_tissue_rank"
    assert sorted(plan.tissue_fraction.tolist()) == sorted(full.tissue_fraction)[-3:]


def test_a_slide_smaller_than_a_patch_uses_cells_past_its_edge(chip: Path) -> None:
    with open_slide(chip) as slide:
        plan = make_plan(slide, medgemma_params(seed=1, magnification=5))
    assert len(plan) == 1 and plan.selection["rule"] == "edge_cells"
    assert (plan.x0[0], plan.y0[0]) == (0, 0) and plan.width0 > CHIP.width


def test_no_tissue_is_an_explicit_empty_bag(blank_slide: Path) -> None:
    with open_slide(blank_slide) as slide:
        plan = make_plan(slide, medgemma_params(seed=1, magnification=20))
    assert len(plan) == 0 and plan.selection["rule"] == "no_tissue"
    assert "no tissue" in (plan.why_empty() or "")


def test_the_notebook_variant_reproduces_random_sample(medgemma_slide: Path) -> None:
    with open_slide(medgemma_slide) as slide:
        assert make_plan(slide, medgemma_params(variant="notebook")).magnification == 10
        # at 20x this slide has more candidates than the notebook's cap of 125
        plan = make_plan(slide, medgemma_params(seed=3, variant="notebook", magnification=20))
        grid = make_plan(slide, medgemma_params(seed=3, magnification=20, max_patches=10**6))
    assert len(plan) == 125 and plan.n_candidates > 125
    above = grid.tissue_fraction >= 0.5  # the notebook samples among these, row-major
    candidates = list(zip(grid.x0[above].tolist(), grid.y0[above].tolist(), strict=True))
    want = random.Random(3).sample(range(len(candidates)), 125)  # the notebook's call
    assert list(zip(plan.x0.tolist(), plan.y0.tolist(), strict=True)) == \
        [candidates[i] for i in want]


def test_select_bag_is_a_pure_function() -> None:
    frac = np.array([0.0, 0.9, 0.2, 0.6, 0.4, 0.0], np.float32)
    rng = np.random.default_rng(0)
    bag = select_bag(frac, min_tissue_fraction=0.5, cap=3, order="row-major", seed=0, rng=rng)
    assert bag.indices.tolist() == [1, 3, 4] and bag.rule == "filled_by_tissue_rank"
    none = select_bag(np.zeros(4, np.float32), min_tissue_fraction=0.5, cap=3,
                      order="row-major", seed=0, rng=rng)
    assert none.indices.tolist() == [] and none.rule == "no_tissue"


def test_explicit_preset_values_and_plain_defaults_are_accepted() -> None:
    # what a generated OpenAPI client sends: every field, at its schema default
    generated = SamplingRequest(strategy="medgemma", patch_size_px=256, tissue_mpp=8.0,
                                overlap=0.0, target_mpp=None, seed=7)
    assert generated.to_params().patch_size_px == 896
    assert generated.to_params().tissue_mpp == 8.0  # detection at 8 µm/px by default
    explicit = SamplingRequest(strategy="medgemma", patch_size_px=896, tissue_mpp=2.0)
    assert explicit.to_params().patch_size_px == 896
    assert explicit.to_params().tissue_mpp == 2.0  # the recipe's 5x mask, literally
    with pytest.raises(InvalidRequestError, match="patch_size_px=512"):
        SamplingRequest(strategy="medgemma", patch_size_px=512).to_params()
    with pytest.raises(InvalidRequestError, match="target_mpp"):
        SamplingRequest(strategy="medgemma", target_mpp=0.5).to_params()


def test_the_cli_names_the_bag_counts_for_what_they_are(biopsy: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "from wsi_sampler.cli import main; main()",
                           "plan", str(biopsy), "--strategy", "medgemma", "--magnification",
                           "5", "-n", "3", "--out", str(tmp_path / "bag.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ("plan: 3 patches, 0 grid cells reach min_tissue_fraction, 3 more filled by "
            "tissue rank") in done.stderr
