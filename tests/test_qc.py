"""The slide QC summary and overlay on the generated demo slide (pen marks and a dark
artefact drawn where the spec says), and ``wsi-sampler qc``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DEMO_SPEC
from tests.test_cli import run
from tests.test_geojson import qupath_problems
from wsi_sampler import open_slide
from wsi_sampler.demo import render_tissue_mask
from wsi_sampler.qc import draw_qc_overlay, slide_qc
from wsi_sampler.tissue import TissueParams


def test_qc_areas_measures_and_stains_on_the_demo_slide(demo_slide: Path) -> None:
    with open_slide(demo_slide) as slide:
        qc, masks = slide_qc(slide)
        w, h = slide.dimensions
    truth = render_tissue_mask(DEMO_SPEC, masks.tissue.shape)
    truth_mm2 = truth.sum() * qc.mask_mpp**2 / 1e6
    assert abs(qc.tissue_area_mm2 - truth_mm2) / truth_mm2 < 0.05
    assert abs(qc.slide_area_mm2 - w * h * DEMO_SPEC.mpp**2 / 1e6) < 0.01
    # the spec draws pen strokes and a black blob right of 72 % of the width, on glass
    right = slice(int(masks.pen.shape[1] * 0.72), None)
    assert masks.pen[:, right].sum() > 0.9 * masks.pen.sum() > 0
    assert masks.dark[:, right].sum() > 0.9 * masks.dark.sum() > 0
    assert qc.pen_area_mm2 > 0 and qc.dark_area_mm2 > 0
    assert qc.tissue_area_before_exclusion_mm2 > qc.tissue_area_mm2  # ink reads as tissue
    assert qc.excluded_mm2["pen"] > 0 and 0 < qc.excluded_share < 0.5
    assert qc.sampled_patches > 10
    assert abs(sum(qc.qc_labels.values()) - 1) < 1e-3 and qc.qc_labels["ok"] > 0.5
    assert qc.patch_measures["blur_laplacian_var"] > 0
    assert qc.stain_vectors is not None
    h_od, e_od = np.array(qc.stain_vectors["haematoxylin"]), np.array(qc.stain_vectors["eosin"])
    assert h_od[0] > e_od[0]  # haematoxylin absorbs more red than eosin
    assert qc.warnings == []


def test_the_overlay_marks_what_the_exclusion_removed(demo_slide: Path) -> None:
    with open_slide(demo_slide) as slide:
        _, masks = slide_qc(slide)
        thumb = slide.thumbnail(mpp=masks.mpp)
    overlay = draw_qc_overlay(thumb, masks).astype(int)
    removed = masks.before_exclusion & ~masks.tissue & ~masks.pen & ~masks.dark
    inside = masks.tissue
    assert removed.any() and inside.any()
    red = overlay[..., 0] - overlay[..., 2]
    assert red[removed].mean() > red[inside].mean() + 20
    green = overlay[..., 1] - (overlay[..., 0] + overlay[..., 2]) / 2
    assert green[masks.tissue].mean() > green[~masks.before_exclusion].mean() + 10


def test_the_qc_layer_is_the_overlays_classes_alone(demo_slide: Path) -> None:
    """qc_layer: opaque in each class's colour where it is (the last drawn wins, as on the
    thumbnail), transparent elsewhere; the summary's legend names the same colours."""
    from wsi_sampler.qc import CLASSICAL_COLOURS, REMOVED_COLOUR, qc_layer

    with open_slide(demo_slide) as slide:
        summary, masks = slide_qc(slide)
    layer = qc_layer(masks)
    assert layer.shape == (*masks.tissue.shape, 4) and layer.dtype == np.uint8
    anything = (masks.before_exclusion & ~masks.tissue) | masks.pen | masks.dark
    np.testing.assert_array_equal(layer[..., 3] > 0, anything)
    assert (layer[..., 3][anything] == 255).all()
    np.testing.assert_array_equal(layer[masks.dark][:, :3],
                                  np.broadcast_to(CLASSICAL_COLOURS["dark"], (masks.dark.sum(), 3)))
    only_removed = masks.before_exclusion & ~masks.tissue & ~masks.pen & ~masks.dark
    assert only_removed.any() and (layer[only_removed][:, :3] == REMOVED_COLOUR).all()
    assert summary.overlay_legend == {"removed by exclusion": "#dc1e1e", "ink": "#c800c8",
                                      "dark": "#143cdc"}


def test_qc_annotations_are_the_overlays_classes_as_polygons(demo_slide: Path) -> None:
    """qc_collection: the tissue, then each class the overlay draws, whose polygons cover
    that class's mask (drawn back at the mask's resolution) with its area measured."""
    from wsi_sampler.qc import overlay_classes, qc_collection
    from wsi_sampler.tissue import load_geojson_geometry, rasterize_geometry

    with open_slide(demo_slide) as slide:
        _, masks = slide_qc(slide)
    features = qc_collection(masks)["features"]
    wanted = [("tissue", masks.tissue)] + [(label, where) for label, where, _, _ in
                                            overlay_classes(masks)]
    assert [f["properties"]["name"] for f in features] == [label for label, _ in wanted]
    for feat, (label, where) in zip(features, wanted, strict=True):
        drawn = rasterize_geometry(load_geojson_geometry(feat), where.shape, masks.scale)
        iou = (drawn & where).sum() / (drawn | where).sum()
        assert iou > 0.8, (label, iou)
        area = feat["properties"]["measurements"]["Area mm2"]
        assert area == pytest.approx(where.sum() * (masks.mpp / 1000) ** 2, abs=1e-4)


def test_an_exclusion_that_removes_everything_is_said(demo_slide: Path) -> None:
    # Everything below value 255 counts as dark: the exclusion removes all the tissue.
    with open_slide(demo_slide) as slide:
        qc, _ = slide_qc(slide, params=replace(TissueParams(), dark_value=255))
    assert qc.tissue_area_mm2 == 0 and qc.excluded_share == 1.0
    assert any("removed 100%" in w for w in qc.warnings)
    assert "no tissue found" in qc.warnings
    assert qc.sampled_patches == 0 and qc.stain_vectors is None


def test_cli_qc(demo_slide: Path, tmp_path: Path) -> None:
    done = run("qc", demo_slide, "--out", tmp_path / "qc.json", "--overlay", tmp_path / "qc.png",
               "--geojson", tmp_path / "qc.geojson")
    assert done.returncode == 0, done.stderr
    assert qupath_problems((tmp_path / "qc.geojson").read_text()) == []
    summary = json.loads(done.stdout)
    assert summary == json.loads((tmp_path / "qc.json").read_text())
    assert summary["tissue_area_mm2"] > 0 and "demo" not in done.stdout  # no file name
    assert (tmp_path / "qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    done = run("qc", demo_slide, "--method", "hest")
    assert done.returncode == 2 and "segmenter-weights" in done.stderr
