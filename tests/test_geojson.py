"""Every GeoJSON we write or answer imports into QuPath: the rules of QuPath's reader
(qupath-core ``GsonTools`` / ``PathObjectTypeAdapters``, v0.4+) and RFC 7946's ring
orientation, checked here by code of the test's own (not the writer's) on the CLI's tissue
and plan files, the API's tissue answer and a job's predictions."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from _servers import folder_settings, serve, slide_ids, wait_for_job
from shapely.geometry import Polygon

from api.app import create_app
from wsi_sampler.geojson import feature, feature_collection, polygon_geometry

CLI = [sys.executable, "-c", "from wsi_sampler.cli import main; main()"]
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
OBJECT_TYPES = {"annotation", "detection", "tile", "cell"}


def signed_area(ring: list[list[float]]) -> float:
    """Shoelace area in the coordinates as written: > 0 is counter-clockwise (RFC 7946)."""
    return sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:], strict=False)) / 2


def ring_problems(rings: list[list[list[float]]], where: str) -> list[str]:
    problems = []
    for k, ring in enumerate(rings):
        if len(ring) < 4 or ring[0] != ring[-1]:
            problems.append(f"{where} ring {k}: not closed or under 4 positions")
            continue
        if not all(len(p) == 2 and all(math.isfinite(v) for v in p) for p in ring):
            problems.append(f"{where} ring {k}: positions must be finite [x, y]")
        area = signed_area(ring)
        if (k == 0) != (area > 0):
            problems.append(f"{where} ring {k}: {'exterior' if k == 0 else 'hole'} runs "
                            f"{'clockwise' if area < 0 else 'counter-clockwise'}")
    return problems


def qupath_problems(text: str) -> list[str]:
    """What would stop QuPath (or a strict GeoJSON reader) importing ``text``."""
    try:  # json's parse_constant sees NaN / Infinity, which are not JSON
        doc = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except ValueError as exc:
        return [f"not strict JSON: {exc}"]
    if doc.get("type") != "FeatureCollection" or not isinstance(doc.get("features"), list):
        return ["not a FeatureCollection with a features list"]
    problems: list[str] = []
    for i, f in enumerate(doc["features"]):
        where = f"feature {i}"
        props: dict[str, Any] = f.get("properties") or {}
        if f.get("type") != "Feature":
            problems.append(f"{where}: type is not Feature")
        if props.get("objectType") not in OBJECT_TYPES:
            problems.append(f"{where}: objectType {props.get('objectType')!r}")
        cls = props.get("classification")
        if cls is not None and not (isinstance(cls.get("name"), str) and isinstance(
                cls.get("color"), list) and len(cls["color"]) == 3):
            problems.append(f"{where}: classification needs name and color [r, g, b]")
        meas = props.get("measurements", {})
        if not all(isinstance(v, (int, float)) for v in meas.values()):
            problems.append(f"{where}: measurements must be numbers")
        if "id" in f and not UUID.match(str(f["id"])):
            problems.append(f"{where}: id is not a UUID")
        geom = f.get("geometry") or {}
        if geom.get("type") == "Polygon":
            problems += ring_problems(geom["coordinates"], where)
        elif geom.get("type") == "MultiPolygon":
            for j, poly in enumerate(geom["coordinates"]):
                problems += ring_problems(poly, f"{where} polygon {j}")
        else:
            problems.append(f"{where}: geometry {geom.get('type')!r}")
    return problems


def test_the_rules_see_what_qupath_refuses() -> None:
    square = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]
    good = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]},
            "properties": {"objectType": "tile", "classification": {"name": "a",
                                                                    "color": [1, 2, 3]}}}
    assert qupath_problems(json.dumps(feature_collection([good]))) == []
    no_colour = json.loads(json.dumps(good))
    no_colour["properties"]["classification"] = {"name": "Tissue"}
    clockwise = json.loads(json.dumps(good))
    clockwise["geometry"]["coordinates"] = [square[::-1]]
    nan = json.loads(json.dumps(good))
    nan["properties"]["measurements"] = {"p": float("nan")}
    for bad, expected in ((no_colour, "needs name and color"), (clockwise, "runs clockwise"),
                          (nan, "not strict JSON"), (good | {"id": "tile-7"}, "not a UUID")):
        assert expected in " ".join(qupath_problems(json.dumps(feature_collection([bad]))))


def test_the_writer_orients_rings_and_leaves_out_non_finite_measurements() -> None:
    # A clockwise exterior with a counter-clockwise hole, as shapely's buffer() may return.
    shell = [(0, 0), (0, 100), (100, 100), (100, 0)]
    hole = [(20, 20), (40, 20), (40, 40), (20, 40)]
    geometry = polygon_geometry(Polygon(shell, [hole]))
    f = feature(geometry, object_type="annotation", measurements={"a": 1.0, "b": math.nan})
    assert f["properties"]["measurements"] == {"a": 1.0}
    assert qupath_problems(json.dumps(feature_collection([f]))) == []
    with pytest.raises(ValueError, match="name' and 'color"):
        feature(geometry, object_type="annotation", cls={"name": "Tissue"})


def test_cli_tissue_and_plan_files_import_into_qupath(demo_slide: Path, tmp_path: Path) -> None:
    tissue, plan = tmp_path / "tissue.geojson", tmp_path / "plan.geojson"
    for args in (["tissue", demo_slide, "--out", tmp_path / "mask.png", "--geojson", tissue],
                 ["plan", demo_slide, "--out", plan, "--strategy", "random", "-n", "20"]):
        done = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
    for path in (tissue, plan):
        text = path.read_text()
        assert qupath_problems(text) == [], path.name
    annotation = json.loads(tissue.read_text())["features"][0]["properties"]
    assert annotation["classification"]["name"] == "Tissue"
    assert len(json.loads(plan.read_text())["features"]) == 20


def test_api_tissue_and_job_predictions_import_into_qupath(demo_slide: Path,
                                                           tmp_path: Path) -> None:
    settings = folder_settings(tmp_path, {"demo.svs": demo_slide})
    with serve(create_app(settings), ready_path="/readyz") as url:
        sid = slide_ids(url)["demo.svs"]
        answer = httpx.get(f"{url}/v1/slides/{sid}/tissue", params={"format": "geojson"})
        assert answer.headers["content-type"] == "application/geo+json"
        assert qupath_problems(answer.text) == []
        qc = httpx.get(f"{url}/v1/slides/{sid}/qc.geojson", timeout=120)
        assert qc.headers["content-type"] == "application/geo+json"
        assert qupath_problems(qc.text) == []
        classes = [f["properties"]["classification"]["name"]
                   for f in json.loads(qc.text)["features"]]
        assert classes == ["Tissue", "Excluded", "Ink", "Dark artefact"]
        job = httpx.post(f"{url}/v1/jobs", json={
            "slides": [sid], "sampling": {"strategy": "random", "n_patches": 8}}).json()["id"]
        wait_for_job(url, job)
        text = httpx.get(f"{url}/v1/jobs/{job}/results/{sid}.predictions.geojson").text
    assert qupath_problems(text) == []
    tiles = json.loads(text)["features"]
    assert len(tiles) == 8 and all("pen_fraction" in t["properties"]["measurements"]
                                   for t in tiles)
