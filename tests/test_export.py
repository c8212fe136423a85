from __future__ import annotations

import csv
import json
import uuid
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from shapely.geometry import box, shape

from wsi_sampler import InvalidRequestError, PlanParams, compute_tissue_mask, make_plan, open_slide
from wsi_sampler._io import atomic_path
from wsi_sampler.export import (
    run_metadata,
    write_clam_h5,
    write_csv,
    write_geojson,
    write_mask_png,
    write_metadata_json,
    write_overlay_png,
    write_wsinfer_h5,
)


@pytest.fixture(scope="module")
def planned(demo_slide: Path):  # type: ignore[no-untyped-def]
    s = open_slide(demo_slide)
    tm = compute_tissue_mask(s)
    plan = make_plan(s, PlanParams(strategy="random", n_patches=15, seed=0, patch_size_px=224,
                                   target_mpp=1.0), tissue=tm)
    yield s, plan, tm
    s.close()


def test_csv(planned, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, plan, _ = planned
    out = tmp_path / "p.csv"
    write_csv(out, plan, {"prob_tumor": np.linspace(0, 1, len(plan))})
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert list(rows[0]) == ["minx", "miny", "width", "height", "tissue_fraction", "prob_tumor"]
    assert [int(r["minx"]) for r in rows] == plan.x0.tolist()
    assert {int(r["width"]) for r in rows} == {plan.width0} == {896}
    assert float(rows[-1]["prob_tumor"]) == 1.0
    with pytest.raises(InvalidRequestError):
        write_csv(out, plan, {"bad": [1, 2]})


def test_geojson_is_qupath_tiles(planned, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, plan, _ = planned
    out = tmp_path / "p.geojson"
    write_geojson(out, plan, {"prob_tumor": np.full(len(plan), 0.25)})
    data = json.loads(out.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == len(plan)
    f0 = data["features"][0]
    assert f0["properties"]["objectType"] == "tile"
    assert f0["properties"]["measurements"]["prob_tumor"] == 0.25
    x, y = int(plan.x0[0]), int(plan.y0[0])
    assert shape(f0["geometry"]).equals(box(x, y, x + 896, y + 896))


def test_geojson_ids_are_stable_uuids_and_tiles_are_classified(  # type: ignore[no-untyped-def]
        planned, tmp_path: Path) -> None:
    _, plan, _ = planned
    n = len(plan)
    tumour = np.linspace(0, 1, n)
    probs = {"prob_normal": 1 - tumour, "prob_tumour": tumour}
    classes = [("prob_normal", "normal"), ("prob_tumour", "tumour")]
    runs = []
    for name, key in (("a", "sha256:one"), ("b", "sha256:one"), ("c", "sha256:two")):
        write_geojson(tmp_path / f"{name}.geojson", plan, probs, slide_key=key, classes=classes)
        runs.append(json.loads((tmp_path / f"{name}.geojson").read_text())["features"])
    ids = [[f["id"] for f in run] for run in runs]
    assert all(str(uuid.UUID(i)) == i for i in ids[0])  # QuPath keeps only UUID ids
    assert ids[0] == ids[1] and len(set(ids[0])) == n  # stable per slide and tile, unique
    assert not set(ids[0]) & set(ids[2])  # another slide, other ids
    names = [f["properties"]["classification"]["name"] for f in runs[0]]
    assert names == ["tumour" if t > 0.5 else "normal" for t in tumour]
    colours = {f["properties"]["classification"]["name"]: tuple(
        f["properties"]["classification"]["color"]) for f in runs[0]}
    assert len(set(colours.values())) == len(colours) and all(
        len(c) == 3 for c in colours.values())


def test_plan_and_model_tissue_fractions_are_named_apart(  # type: ignore[no-untyped-def]
        planned, tmp_path: Path) -> None:
    _, plan, _ = planned
    write_csv(tmp_path / "p.csv", plan, {"tissue_fraction": np.zeros(len(plan))})
    header = (tmp_path / "p.csv").read_text().splitlines()[0].split(",")
    assert header[4:] == ["mask_tissue_fraction", "tissue_fraction"]
    write_geojson(tmp_path / "p.geojson", plan, {"tissue_fraction": np.zeros(len(plan))})
    meas = json.loads((tmp_path / "p.geojson").read_text())["features"][0]["properties"][
        "measurements"]
    assert meas["tissue_fraction"] == 0 and meas["mask_tissue_fraction"] > 0


def test_clam_h5(planned, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s, plan, _ = planned
    out = tmp_path / "p.h5"
    write_clam_h5(out, plan, s)
    with h5py.File(out) as f:
        coords = f["coords"]
        assert coords.shape == (len(plan), 2)
        assert np.array_equal(coords[:], plan.coords)
        a = coords.attrs
        assert a["patch_level"] == plan.level == 1
        assert a["patch_size"] == 224
        assert list(a["downsample"]) == [4.0, 4.0]
        assert list(a["level_dim"]) == list(s.level_dimensions[1])
        assert list(a["downsampled_level_dim"]) == list(s.level_dimensions[1])
        assert a["name"] == "demo"
        # TRIDENT's read_coords + patcher: patch_size * level0_mag / target_mag level-0 px
        assert a["level0_magnification"] == 40 and a["target_magnification"] == 10
        assert a["patch_size"] * a["level0_magnification"] / a["target_magnification"] == \
            a["patch_size_level0"] == plan.width0 == 896
        assert (a["level0_width"], a["level0_height"]) == s.dimensions
        assert (a["patch_size_px"], a["target_mpp"]) == (plan.patch_size_px, plan.target_mpp)


def test_wsinfer_h5_is_what_wsinfer_writes(planned, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, plan, _ = planned
    out = tmp_path / "w.h5"
    write_wsinfer_h5(out, plan)
    with h5py.File(out) as f:  # wsinfer.patchlib.save_hdf5's layout (test_wsinfer runs it)
        coords = f["/coords"][:]
        attrs = dict(f["/coords"].attrs)
    assert coords.shape == (len(plan), 2)
    assert np.array_equal(coords, plan.coords)
    assert attrs == {"patch_size": 896, "patch_level": 0, "patch_spacing_um_px": 1.0}


def test_pngs_and_metadata(planned, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s, plan, tm = planned
    write_mask_png(tmp_path / "mask.png", tm.mask)
    back = cv2.imread(str(tmp_path / "mask.png"), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(back > 0, tm.mask)
    thumb = s.thumbnail(max_size=512)
    write_overlay_png(tmp_path / "ov.png", thumb, plan, tm.mask)
    ov = cv2.imread(str(tmp_path / "ov.png"))[:, :, ::-1]
    assert ov.shape == thumb.shape and not np.array_equal(ov, thumb)
    meta = run_metadata(slide=s, plan=plan, config=plan.params, timings_s={"plan": 0.1})
    write_metadata_json(tmp_path / "meta.json", meta)
    m = json.loads((tmp_path / "meta.json").read_text())
    assert m["seed"] == 0 and m["slide"]["fingerprint"] == s.fingerprint
    assert m["versions"]["wsi-sampler"] and m["versions"]["openslide-python"]
    assert m["plan"]["n_patches"] == len(plan)


def test_atomic_write_leaves_target_untouched_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "result.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_the_heatmap_has_a_legend_naming_its_colours(planned, tmp_path: Path  # type: ignore[no-untyped-def]
                                                     ) -> None:
    from wsi_sampler.export import LEGEND_PX, write_heatmap_png

    s, plan, _ = planned
    thumb = s.thumbnail(max_size=512)
    out = tmp_path / "h.png"
    write_heatmap_png(out, thumb, plan, np.linspace(0, 1, len(plan)), label="prob_tumour")
    img = cv2.imread(str(out))[:, :, ::-1]
    assert img.shape[0] == thumb.shape[0] + LEGEND_PX and img.shape[1] == thumb.shape[1]
    bar = img[thumb.shape[0] + 32]  # a row through the colour bar
    viridis = cv2.applyColorMap(np.array([[0], [255]], np.uint8), cv2.COLORMAP_VIRIDIS)
    low, high = viridis[0, 0, ::-1], viridis[1, 0, ::-1]
    assert np.abs(bar[12].astype(int) - low).max() < 12  # dark purple at the left
    assert np.abs(bar[-12].astype(int) - high).max() < 12  # yellow at the right
    text = img[thumb.shape[0]: thumb.shape[0] + 22]
    assert (text < 100).any()  # the label is written
