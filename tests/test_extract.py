from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from wsi_sampler import Extractor, InvalidRequestError, PlanParams, make_plan, open_slide


def reference_patch(path: Path, x0: int, y0: int, size0: int, out: int) -> np.ndarray:
    """Plain openslide read_region at level 0, resized with area averaging."""
    import openslide

    with openslide.OpenSlide(str(path)) as s:
        region = np.asarray(s.read_region((x0, y0), 0, (size0, size0)).convert("RGB"))
    if size0 == out:
        return region
    return cv2.resize(region, (out, out), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_native_resolution_patches_equal_read_region(demo_slide: Path, backend: str) -> None:
    with open_slide(demo_slide, backend=backend) as s:  # type: ignore[arg-type]
        plan = make_plan(s, PlanParams(strategy="random", n_patches=12, seed=2, patch_size_px=256))
        batches = list(Extractor(s, plan, batch_size=5).iter_batches())
    assert [len(b) for b in batches] == [5, 5, 2]
    images = np.concatenate([b.images for b in batches])
    assert images.shape == (12, 256, 256, 3) and images.dtype == np.uint8
    assert images.flags["C_CONTIGUOUS"]
    for i in range(12):
        ref = reference_patch(demo_slide, int(plan.x0[i]), int(plan.y0[i]), 256, 256)
        assert int(np.abs(images[i].astype(int) - ref).max()) <= 2


def test_resampled_patches_match_reference(demo_slide: Path) -> None:
    with open_slide(demo_slide) as s:
        plan = make_plan(s, PlanParams(strategy="random", n_patches=6, seed=1,
                                       patch_size_px=224, target_mpp=0.5))
        patches = dict(Extractor(s, plan).iter_patches())
    assert plan.width0 == 448
    for i, img in patches.items():
        ref = reference_patch(demo_slide, int(plan.x0[i]), int(plan.y0[i]), 448, 224)
        assert img.shape == (224, 224, 3)
        assert int(np.abs(img.astype(int) - ref).max()) <= 2


def test_coarse_target_reads_a_pyramid_level(demo_slide: Path) -> None:
    with open_slide(demo_slide) as s:
        plan = make_plan(s, PlanParams(patch_size_px=128, target_mpp=1.0, min_tissue_fraction=0.9))
        ext = Extractor(s, plan)
        img = ext.read_patch(0)
        level1 = s.read_region((int(plan.x0[0]), int(plan.y0[0])), 1, (128, 128))
    assert plan.level == 1
    assert np.array_equal(img, level1)


def test_batch_size_validated(demo_slide: Path) -> None:
    with open_slide(demo_slide) as s:
        plan = make_plan(s, PlanParams())
        with pytest.raises(InvalidRequestError):
            Extractor(s, plan, batch_size=0)
