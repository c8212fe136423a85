from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import BLANK_SPEC, DEMO_SPEC
from wsi_sampler import (
    InvalidRequestError,
    TissueParams,
    compute_tissue_mask,
    detect_tissue,
    open_slide,
)
from wsi_sampler.demo import render_tissue_mask
from wsi_sampler.tissue import (
    is_fluorescence,
    load_geojson_geometry,
    load_mask_png,
    mask_to_polygons,
    pen_ink_mask,
    rasterize_geometry,
)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.mark.parametrize("tissue_mpp", [2.0, 4.0, 8.0])
def test_demo_tissue_matches_ground_truth(demo_slide: Path, tissue_mpp: float) -> None:
    with open_slide(demo_slide) as s:
        tm = compute_tissue_mask(s, tissue_mpp=tissue_mpp)
    truth = render_tissue_mask(DEMO_SPEC, tm.mask.shape)
    assert iou(tm.mask, truth) >= 0.95


def test_pen_and_artefact_are_excluded(demo_slide: Path) -> None:
    with open_slide(demo_slide) as s:
        thumb = s.thumbnail(mpp=8.0)
    # Everything drawn right of 72 % of the width is pen ink or the black artefact.
    right = slice(int(thumb.shape[1] * 0.72), None)
    marks = (thumb[:, right].astype(int).sum(axis=2) < 600).mean()
    assert marks > 0.02, "the demo slide should carry pen strokes and an artefact"
    mask = detect_tissue(thumb, 8.0)
    assert not mask[:, right].any()
    kept = detect_tissue(thumb, 8.0, TissueParams(exclude_pen=False, exclude_dark=False))
    assert kept[:, right].any(), "without exclusion the ink is detected, so exclusion is doing work"


def test_blank_slide_gives_empty_mask(blank_slide: Path) -> None:
    with open_slide(blank_slide) as s:
        tm = compute_tissue_mask(s, tissue_mpp=8.0)
    assert not tm.mask.any()


def test_noise_only_image_gives_empty_mask() -> None:
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(240, 3, (300, 400, 3)), 0, 255).astype(np.uint8)
    assert not detect_tissue(img, 8.0).any()
    dark = np.clip(rng.normal(3, 1.5, (300, 400, 3)), 0, 255).astype(np.uint8)
    assert not detect_tissue(dark, 8.0, TissueParams(method="fluorescence")).any()


def test_fluorescence_detected_not_everything(dapi_ndpi: Path) -> None:
    with open_slide(dapi_ndpi) as s:
        thumb = s.thumbnail(mpp=8.0)
        tm = compute_tissue_mask(s, tissue_mpp=8.0)
    assert is_fluorescence(thumb)
    frac = tm.mask.mean()
    assert 0.5 < frac < 0.95
    # The dark border of the scan is background; the mask must not claim it.
    border = np.concatenate([tm.mask[:, -3:].ravel(), tm.mask[-3:, :].ravel()])
    assert border.mean() < 0.5
    # Treated as bright-field, a dark-background slide would be mis-thresholded.
    bright = detect_tissue(thumb, 8.0, TissueParams(method="brightfield"))
    assert iou(bright, tm.mask) < 0.5


def test_cmu_brightfield_mask_is_plausible(cmu_svs: Path) -> None:
    with open_slide(cmu_svs) as s:
        tm = compute_tissue_mask(s, tissue_mpp=4.0)
    assert 0.15 < tm.mask.mean() < 0.7


def test_pen_ink_colours() -> None:
    img = np.zeros((4, 1, 3), np.uint8)
    img[:, 0] = [(40, 70, 200), (40, 160, 70), (226, 150, 190), (118, 70, 158)]
    assert pen_ink_mask(img)[:, 0].tolist() == [True, True, False, False]


@pytest.mark.parametrize("tiles", [True, False])
def test_tissue_detection_reads_only_low_resolution(demo_slide: Path, tiles: bool) -> None:
    """Whether through stored tiles or the backend, only the coarsest level is read."""
    with open_slide(demo_slide) as s:
        levels: list[int] = []
        source = s.tile_source()
        assert source is not None
        if not tiles:
            s._tiles = None  # as for a format without direct tile access
        original_read, original_tile = s._reader.read, source.read_tile

        def spy(x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
            levels.append(level)
            return original_read(x0, y0, level, w, h)

        def spy_tile(level: int, tx: int, ty: int, out: np.ndarray | None = None) -> np.ndarray:
            levels.append(level)
            return original_tile(level, tx, ty, out)

        s._reader.read = spy  # type: ignore[method-assign]
        source.read_tile = spy_tile  # type: ignore[method-assign]
        compute_tissue_mask(s, tissue_mpp=8.0)
        source.close()
    assert levels and min(levels) == s.level_count - 1 > 0


def test_polygons_round_trip(demo_slide: Path) -> None:
    with open_slide(demo_slide) as s:
        tm = compute_tissue_mask(s, tissue_mpp=8.0)
    geom = mask_to_polygons(tm.mask, tm.scale)
    assert len(geom.geoms) >= 1
    w, h = DEMO_SPEC.width, DEMO_SPEC.height
    minx, miny, maxx, maxy = geom.bounds
    assert 0 <= minx < maxx <= w and 0 <= miny < maxy <= h
    back = rasterize_geometry(geom, tm.mask.shape, tm.scale)
    assert iou(back, tm.mask) > 0.95


def test_mask_with_hole_round_trips() -> None:
    mask = np.zeros((100, 100), bool)
    mask[10:90, 10:90] = True
    mask[40:60, 40:60] = False
    geom = mask_to_polygons(mask, (2.0, 2.0), simplify_px=0)
    assert len(geom.geoms) == 1 and len(geom.geoms[0].interiors) == 1
    assert iou(rasterize_geometry(geom, mask.shape, (2.0, 2.0)), mask) > 0.95


def test_load_geojson_variants(tmp_path: Path) -> None:
    poly = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}
    fc = {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": poly,
                                                      "properties": {}}]}
    path = tmp_path / "roi.geojson"
    path.write_text(json.dumps(fc))
    assert load_geojson_geometry(path).area == 100
    assert load_geojson_geometry(poly).area == 100
    with pytest.raises(InvalidRequestError):
        load_geojson_geometry({"type": "Point", "coordinates": [1, 2]})
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(InvalidRequestError):
        load_geojson_geometry(bad)


def test_load_mask_png(tmp_path: Path) -> None:
    m = np.zeros((60, 80), np.uint8)
    m[10:30, 20:40] = 255
    path = tmp_path / "m.png"
    cv2.imwrite(str(path), m)
    loaded = load_mask_png(path, (120, 160))
    assert loaded.shape == (120, 160) and loaded[40, 60] and not loaded[0, 0]
    with pytest.raises(InvalidRequestError, match="aspect"):
        load_mask_png(path, (100, 100))
    with pytest.raises(InvalidRequestError):
        load_mask_png(tmp_path / "missing.png", (10, 10))


def test_bad_inputs() -> None:
    with pytest.raises(InvalidRequestError):
        detect_tissue(np.zeros((10, 10), np.uint8), 8.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError):
        detect_tissue(np.zeros((10, 10, 3), np.uint8), 0.0)
    with pytest.raises(InvalidRequestError):
        TissueParams(method="magic")  # type: ignore[arg-type]


def test_blank_spec_is_blank() -> None:
    assert not render_tissue_mask(BLANK_SPEC, (30, 40)).any()


def _random_masks(seed: int, count: int) -> list[np.ndarray]:
    """Masks with specks, lumps, holes and objects inside holes, touching the edges too."""
    rng = np.random.default_rng(seed)
    masks = []
    for _ in range(count):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        mask = rng.random((h, w)) < rng.uniform(0.05, 0.95)
        if rng.random() < 0.5:
            kernel = np.ones((2, 2), np.uint8)
            mask = cv2.morphologyEx(mask.view(np.uint8), cv2.MORPH_CLOSE, kernel).view(bool)
        masks.append(mask)
    return masks


@pytest.mark.parametrize("by_boxes", [True, False], ids=["boxes", "whole-image"])
def test_small_objects_and_holes_equal_labelling_the_whole_mask(
    by_boxes: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The border-following path must give exactly the mask that labelling every pixel gives
    # (the old implementation); the threshold forces one path or the other.
    from wsi_sampler import _components

    monkeypatch.setattr(_components, "_LABEL_WHOLE_IMAGE_SHARE", 1e9 if by_boxes else -1.0)
    sizes = np.random.default_rng(1).integers(1, 40, 1500)
    for mask, size in zip(_random_masks(0, 1500), sizes, strict=True):
        px = int(size)
        expected_objects = (_components.remove_small_objects_by_labels(mask, px)
                            if mask.any() and px > 1 else mask)
        assert np.array_equal(_components.remove_small_objects(mask, px), expected_objects)
        assert np.array_equal(_components.fill_small_holes(mask, px),
                              _components.fill_small_holes_by_labels(mask, px))


def test_small_objects_and_holes_on_a_drawn_mask() -> None:
    # A lump with a small and a large hole, a speck in the large hole, a speck on the edge.
    mask = np.zeros((60, 80), bool)
    cv2.circle(mask.view(np.uint8), (40, 30), 25, 1, -1)
    mask[20:23, 30:33] = False  # 9 px hole
    mask[30:45, 40:55] = False  # 225 px hole
    mask[36:38, 46:48] = True  # 4 px speck inside it
    mask[0:2, 0:2] = True  # 4 px speck on the image's corner
    from wsi_sampler._components import fill_small_holes, remove_small_objects

    cleaned = remove_small_objects(mask, 5)
    assert not cleaned[36:38, 46:48].any() and not cleaned[0:2, 0:2].any()
    assert cleaned[30, 40 - 20]  # the lump stays
    filled = fill_small_holes(cleaned, 100)
    assert filled[20:23, 30:33].all()  # the small hole is filled
    assert not filled[30:45, 40:55].any()  # the large one (the speck's room included) is not
    assert not fill_small_holes(np.zeros((5, 5), bool), 100).any()  # background is no hole
