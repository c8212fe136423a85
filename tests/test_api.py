"""The REST API on a real uvicorn (127.0.0.1), read the way lab systems read it."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import sqlite3
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from _servers import serve, slide_ids
from conftest import DEMO_SPEC

from api.app import create_app
from api.config import Settings
from api.slides import _slide_id
from wsi_sampler import Extractor, PlanParams, make_plan, open_slide
from wsi_sampler.models import load_model
from wsi_sampler.scoring import model_plan_params
from wsi_sampler.worker import InProcessWorker

SAMPLE = {"strategy": "random", "n_patches": 10, "seed": 3, "patch_size_px": 128,
          "target_mpp": 1.0}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, demo_slide: Path, cmu_svs: Path,
        kidney_tif: Path) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("api")
    root = base / "slides"
    (root / "sub").mkdir(parents=True)
    shutil.copy(demo_slide, root / "demo.svs")
    shutil.copy(cmu_svs, root / "sub" / "cmu.svs")
    shutil.copy(kidney_tif, root / "kidney.tif")
    (root / "empty.svs").write_bytes(b"")
    (root / "notes.tif").write_text("not a slide")
    data = demo_slide.read_bytes()
    (root / "truncated.svs").write_bytes(data[: len(data) // 3])
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.svs").write_bytes(data)
    os.symlink(outside / "secret.svs", root / "link-out.svs")
    return {"root": root, "data": base / "data", "outside": outside}


def settings_for(env: dict[str, Path], **kw: object) -> Settings:
    values: dict[str, object] = {"slide_roots": [env["root"]], "data_dir": env["data"],
                                 "demo_slide": False, "device": "cpu"}
    values.update(kw)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def url(env: dict[str, Path]) -> Iterator[str]:
    with serve(create_app(settings_for(env)), ready_path="/readyz") as base:
        yield base


ids = slide_ids


def test_listing_is_paginated_and_stays_inside_the_root(url: str, env: dict[str, Path]) -> None:
    listed = ids(url)
    assert {"demo.svs", "sub/cmu.svs", "kidney.tif", "notes.tif"} <= set(listed)
    assert "link-out.svs" not in listed  # a symlink leaving the root is never served
    page = httpx.get(f"{url}/v1/slides", params={"limit": 2, "offset": 1}).json()
    assert len(page["items"]) == 2 and page["total"] == len(listed)
    assert ids(url) == listed  # ids are stable


def test_slide_info(url: str) -> None:
    info = httpx.get(f"{url}/v1/slides/{ids(url)['demo.svs']}").json()
    assert (info["width"], info["height"]) == (DEMO_SPEC.width, DEMO_SPEC.height)
    assert info["mpp_x"] == pytest.approx(0.25) and info["fingerprint"].startswith("sha256:")
    assert "path" not in info


@pytest.mark.parametrize("attempt", [
    "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "....//....//etc", "demo.svs",
    "0" * 24, "%2e%2e%2fsecret.svs",
])
def test_traversal_and_unknown_ids_are_404(url: str, attempt: str) -> None:
    resp = httpx.get(f"{url}/v1/slides/{attempt}")
    assert resp.status_code == 404
    assert "error" in resp.json()


def test_symlink_out_of_the_root_is_404_even_by_its_id(url: str, env: dict[str, Path]) -> None:
    sid = _slide_id(env["root"].resolve(), "link-out.svs")
    assert httpx.get(f"{url}/v1/slides/{sid}").status_code == 404


@pytest.mark.parametrize(("name", "needle"), [
    ("empty.svs", "zero bytes"), ("truncated.svs", "damaged"), ("notes.tif", "not"),
])
def test_bad_files_are_422_with_a_reason(url: str, name: str, needle: str) -> None:
    sid = ids(url)[name]
    # a truncated file may still show its header; planning reads pixels and fails cleanly
    resp = httpx.post(f"{url}/v1/slides/{sid}/plan", json={})
    assert resp.status_code == 422
    assert needle in resp.json()["error"]
    assert httpx.post(f"{url}/v1/slides/{sid}/patches", json={}).status_code == 422


def test_missing_mpp_is_422_naming_the_fix(url: str) -> None:
    sid = ids(url)["kidney.tif"]
    resp = httpx.post(f"{url}/v1/slides/{sid}/plan", json={})
    assert resp.status_code == 422 and "mpp_override" in resp.json()["error"]
    resp = httpx.post(f"{url}/v1/slides/{sid}/plan", json={"mpp_override": 0.5,
                                                            "min_tissue_area_um2": 1})
    assert resp.status_code == 422  # unknown field: extra keys are refused
    ok = httpx.post(f"{url}/v1/slides/{sid}/plan", json={"mpp_override": 0.5})
    assert ok.status_code == 200


def test_plan_equals_the_library(url: str, demo_slide: Path) -> None:
    sid = ids(url)["demo.svs"]
    for body in (SAMPLE, {"strategy": "medgemma", "seed": 1}):
        got = httpx.post(f"{url}/v1/slides/{sid}/plan", json=body).json()
        with open_slide(demo_slide) as s:
            from api.schemas import SamplingRequest

            plan = make_plan(s, SamplingRequest(**body).to_params())  # type: ignore[arg-type]
        assert [[p["x0"], p["y0"]] for p in got["patches"]] == plan.coords.tolist()
        assert got["n_patches"] == len(plan)


def test_a_request_chooses_its_tissue_method(url: str, demo_slide: Path) -> None:
    """tissue_method per request: a classical one on any service (plans, /tissue and /qc
    detect with it, as the library does), a deep one only where the service has its weights
    (a 422 naming the settings, before any work)."""
    from wsi_sampler import compute_tissue_mask
    from wsi_sampler.tissue import TissueParams

    sid = ids(url)["demo.svs"]
    body = {"strategy": "grid", "patch_size_px": 512, "target_mpp": 1.0}
    with open_slide(demo_slide) as s:
        fluo = TissueParams(method="fluorescence")
        wanted = make_plan(s, PlanParams(**body, tissue=fluo))  # type: ignore[arg-type]
        assert len(wanted) != len(make_plan(s, PlanParams(**body)))  # type: ignore[arg-type]
        mask = compute_tissue_mask(s, params=fluo).mask
    got = httpx.post(f"{url}/v1/slides/{sid}/plan",
                     json=body | {"tissue_method": "fluorescence"}).json()
    assert [[p["x0"], p["y0"]] for p in got["patches"]] == wanted.coords.tolist()
    png = httpx.get(f"{url}/v1/slides/{sid}/tissue", params={"tissue_method": "fluorescence"})
    layer = cv2.imdecode(np.frombuffer(png.content, np.uint8), cv2.IMREAD_GRAYSCALE) > 127
    np.testing.assert_array_equal(layer, mask)
    qc = httpx.get(f"{url}/v1/slides/{sid}/qc", params={"tissue_method": "fluorescence"})
    assert qc.json()["tissue_area_mm2"] == pytest.approx(
        mask.sum() * (qc.json()["mask_mpp"] / 1000) ** 2, rel=0.01)
    for method in ("hest", "grandqc"):
        refused = httpx.post(f"{url}/v1/slides/{sid}/plan", json={"tissue_method": method})
        assert refused.status_code == 422, refused.text
        assert "configure tissue_method and segmenter_weights" in refused.json()["error"]
    assert httpx.get(f"{url}/v1/slides/{sid}/tissue",
                     params={"tissue_method": "grandqc"}).status_code == 422
    bad = httpx.post(f"{url}/v1/slides/{sid}/plan", json={"tissue_method": "otsu"})
    assert bad.status_code == 422 and "tissue_method" in bad.text


def test_a_plan_request_chooses_the_artefact_exclusion(url: str) -> None:
    sid = ids(url)["demo.svs"]
    plan = f"{url}/v1/slides/{sid}/plan"
    default = httpx.post(plan, json={}).json()
    assert default["selection"]["exclusion"]["classes"] == ["pen", "dark"]
    assert all("excluded" not in p for p in default["patches"])  # absent, not null
    # any exclusion over a share of 0: the patches pen took stay, marked, and it says so
    marked = httpx.post(plan, json={"max_excluded_share": 0}).json()
    flags = [p["excluded"] for p in marked["patches"]]
    assert any(flags) and not all(flags) and len(flags) > default["n_patches"]
    assert "marked excluded" in marked["message"]
    none = httpx.post(plan, json={"exclude_artifacts": ["dark"]}).json()
    assert "exclusion" not in none["selection"]  # the demo slide has no dark artefact on tissue
    for body, words in (({"exclude_artifacts": ["fold"]}, "artifact-weights"),
                        ({"exclude_artifacts": ["smudge"]}, "air_bubble"),
                        ({"max_excluded_share": 2}, "max_excluded_share")):
        resp = httpx.post(plan, json=body)
        assert resp.status_code in (400, 422) and words in resp.text, resp.text


def test_the_plan_downloads_as_the_coords_h5_clam_and_trident_read(url: str,
                                                                    tmp_path: Path) -> None:
    import h5py

    sid = ids(url)["demo.svs"]
    body = {"strategy": "grid", "patch_size_px": 224, "target_mpp": 0.5}
    got = httpx.post(f"{url}/v1/slides/{sid}/plan.h5", json=body)
    assert got.status_code == 200 and got.headers["content-type"] == "application/x-hdf5"
    (tmp_path / "coords.h5").write_bytes(got.content)
    plan = httpx.post(f"{url}/v1/slides/{sid}/plan", json=body).json()
    with h5py.File(tmp_path / "coords.h5") as f:
        coords = f["coords"][:]
        attrs = dict(f["coords"].attrs)
    assert coords.tolist() == [[p["x0"], p["y0"]] for p in plan["patches"]]
    assert attrs["patch_size_level0"] == plan["width0"] and attrs["patch_size_px"] == 224
    bad = httpx.post(f"{url}/v1/slides/{sid}/plan.h5", json={"patch_size_px": 3})
    assert bad.status_code == 422 and "error" in bad.json()


def test_bad_parameters_are_422(url: str) -> None:
    sid = ids(url)["demo.svs"]
    for body in ({"strategy": "random"}, {"patch_size_px": 2}, {"overlap": 1.5},
                 {"strategy": "medgemma", "target_mpp": 0.5}):
        resp = httpx.post(f"{url}/v1/slides/{sid}/plan", json=body)
        assert resp.status_code == 422, body
        assert resp.json()["error"]


class _Chunks(io.RawIOBase):
    """A file object over an iterator of byte chunks (to read a tar as it streams)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks, self.buf = chunks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        while not self.buf:
            try:
                self.buf = next(self.chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self.buf))
        b[:n], self.buf = self.buf[:n], self.buf[n:]
        return n


def expected_patches(demo_slide: Path, body: dict[str, object]) -> np.ndarray:
    from api.schemas import SamplingRequest

    with open_slide(demo_slide) as s:
        plan = make_plan(s, SamplingRequest(**body).to_params())  # type: ignore[arg-type]
        return np.concatenate([b.images for b in Extractor(s, plan).iter_batches()])


def test_patches_stream_as_webdataset_tar(url: str, demo_slide: Path) -> None:
    sid = ids(url)["demo.svs"]
    want = expected_patches(demo_slide, SAMPLE)
    with httpx.stream("POST", f"{url}/v1/slides/{sid}/patches", json=SAMPLE) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "application/x-tar"
        assert resp.headers["x-patch-count"] == "10"
        members: dict[str, bytes] = {}
        with tarfile.open(fileobj=_Chunks(resp.iter_bytes()), mode="r|") as tar:
            for m in tar:
                f = tar.extractfile(m)
                assert f is not None
                members[m.name] = f.read()
    assert sorted(members) == sorted(f"{i:06d}.{e}" for i in range(10) for e in ("png", "json"))
    for i in range(10):
        meta = json.loads(members[f"{i:06d}.json"])
        assert meta["index"] == i and meta["target_mpp"] == 1.0 and meta["patch_size_px"] == 128
        img = cv2.imdecode(np.frombuffer(members[f"{i:06d}.png"], np.uint8), cv2.IMREAD_COLOR)
        np.testing.assert_array_equal(img[:, :, ::-1], want[i])  # PNG is lossless


def test_webdataset_reads_the_tar_stream(url: str, demo_slide: Path, tmp_path: Path) -> None:
    from webdataset.autodecode import Decoder, imagehandler
    from webdataset.tariterators import group_by_keys, tar_file_expander

    sid = ids(url)["demo.svs"]
    shard = tmp_path / "patches.tar"
    with httpx.stream("POST", f"{url}/v1/slides/{sid}/patches", json=SAMPLE) as resp, \
            shard.open("wb") as fh:
        for chunk in resp.iter_bytes():
            fh.write(chunk)
    decode = Decoder([imagehandler("rgb8")])  # webdataset's reader and decoders; our handle
    with shard.open("rb") as fh:
        samples = [(s["__key__"], s["png"], s["json"])
                   for s in map(decode, group_by_keys(tar_file_expander(
                       [{"url": str(shard), "stream": fh}])))]
    want = expected_patches(demo_slide, SAMPLE)
    assert [key for key, _, _ in samples] == [f"{i:06d}" for i in range(10)]
    for key, image, meta in samples:
        assert meta["index"] == int(key)
        np.testing.assert_array_equal(image, want[int(key)])


def test_raw_arrays_in_the_tar_stream_equal_the_extractor(url: str, demo_slide: Path,
                                                          tmp_path: Path) -> None:
    from webdataset.autodecode import Decoder
    from webdataset.tariterators import group_by_keys, tar_file_expander

    sid = ids(url)["demo.svs"]
    shard = tmp_path / "raw.tar"
    with httpx.stream("POST", f"{url}/v1/slides/{sid}/patches",
                      json=SAMPLE | {"image_format": "raw"}) as resp, shard.open("wb") as fh:
        assert resp.status_code == 200
        for chunk in resp.iter_bytes():
            fh.write(chunk)
    with shard.open("rb") as fh:  # webdataset decodes .npy members itself
        samples = list(map(Decoder([]), group_by_keys(tar_file_expander(
            [{"url": str(shard), "stream": fh}]))))
    want = expected_patches(demo_slide, SAMPLE)
    assert [s["__key__"] for s in samples] == [f"{i:06d}" for i in range(10)]
    for sample in samples:
        assert sample["npy"].dtype == np.uint8 and sample["npy"].shape == (128, 128, 3)
        np.testing.assert_array_equal(sample["npy"], want[int(sample["__key__"])])
    lines = httpx.post(f"{url}/v1/slides/{sid}/patches", params={"format": "ndjson"},
                       json=SAMPLE | {"image_format": "raw"}).text.splitlines()
    first = json.loads(lines[0])
    assert first["media_type"] == "application/x-npy"
    np.testing.assert_array_equal(np.load(io.BytesIO(base64.b64decode(first["image"]))),
                                  want[first["index"]])


def test_patches_stream_as_ndjson(url: str, demo_slide: Path) -> None:
    sid = ids(url)["demo.svs"]
    want = expected_patches(demo_slide, SAMPLE)
    seen = 0
    with httpx.stream("POST", f"{url}/v1/slides/{sid}/patches", params={"format": "ndjson"},
                      json=SAMPLE | {"image_format": "jpeg"}) as resp:
        assert resp.headers["content-type"] == "application/x-ndjson"
        records = [json.loads(line) for line in resp.iter_lines()]
    for rec in records[:-1]:
        img = cv2.imdecode(np.frombuffer(base64.b64decode(rec["image"]), np.uint8), 1)
        assert rec["type"] == "patch" and rec["media_type"] == "image/jpeg"
        assert np.abs(img[:, :, ::-1].astype(int) - want[rec["index"]]).mean() < 4
        seen += 1
    assert seen == 10
    assert records[-1] == {"type": "summary", "slide_id": sid, "n_patches": 10}


def test_predictions_stream_equals_in_process(url: str, demo_slide: Path) -> None:
    sid = ids(url)["demo.svs"]
    body = {"strategy": "stratified", "n_patches": 40, "seed": 5}
    records = []
    with httpx.stream("POST", f"{url}/v1/slides/{sid}/predictions", json=body) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            records.append(json.loads(line))
    patches, summary = records[:-1], records[-1]
    assert summary["type"] == "summary" and summary["patches"] == len(patches) > 20
    worker = InProcessWorker(load_model("tissue-qc", device="cpu"))
    with open_slide(demo_slide) as s:
        plan = make_plan(s, model_plan_params(worker.card, PlanParams(
            strategy="stratified", n_patches=40, seed=5)))
        images = np.concatenate([b.images for b in Extractor(s, plan).iter_batches()])
    want = worker.infer(images)
    assert [[p["x0"], p["y0"]] for p in patches] == plan.coords.tolist()
    got_tissue = np.array([p["outputs"]["tissue_fraction"] for p in patches])
    np.testing.assert_allclose(got_tissue, want["measurements"][:, 0], atol=1e-5)
    got_ok = np.array([p["outputs"]["qc_ok"] for p in patches])
    np.testing.assert_array_equal(got_ok, want["qc"][:, 0])
    assert summary["qc_fractions"]["ok"] == pytest.approx(want["qc"][:, 0].mean(), abs=1e-4)


def test_jobs_run_persist_and_survive_a_restart(env: dict[str, Path], url: str) -> None:
    sid, bad = ids(url)["demo.svs"], ids(url)["empty.svs"]
    body = {"slides": [sid, bad], "sampling": {"strategy": "random", "n_patches": 12}}
    resp = httpx.post(f"{url}/v1/jobs", json=body)
    assert resp.status_code == 202
    job = resp.json()["id"]
    deadline = time.monotonic() + 120
    while (status := httpx.get(f"{url}/v1/jobs/{job}").json())["state"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert status["state"] == "partial" and status["slides_done"] == 2
    assert status["errors"][0]["slide"] == bad and status["errors"][0]["error"]
    names = {r["name"] for r in status["results"]}
    assert f"{sid}.predictions.csv" in names and f"{sid}.summary.json" in names
    assert {(r["slide_id"], r["slide_name"]) for r in status["results"]} == {(sid, "demo.svs")}
    csv_text = httpx.get(f"{url}/v1/jobs/{job}/results/{sid}.predictions.csv").text
    assert csv_text.splitlines()[0].startswith("minx,miny,width,height")
    assert len(csv_text.splitlines()) == 13
    assert httpx.get(f"{url}/v1/jobs/{job}/results/..%2Fjobs.sqlite3").status_code == 404
    # a job left "running" by a crash is marked interrupted by the next start
    db = sqlite3.connect(env["data"] / "jobs.sqlite3")
    db.execute("INSERT INTO jobs (id, state, created, updated, request) VALUES "
               "('crashed', 'running', 0, 0, ?)", (json.dumps(body),))
    db.commit()
    db.close()
    with serve(create_app(settings_for(env)), ready_path="/readyz") as again:
        assert httpx.get(f"{again}/v1/jobs/{job}").json()["state"] == "partial"
        png = httpx.get(f"{again}/v1/jobs/{job}/results/{sid}.heatmap.png")
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
        assert httpx.get(f"{again}/v1/jobs/crashed").json()["state"] == "interrupted"
    assert httpx.get(f"{url}/v1/jobs/nope").status_code == 404


def test_stopping_the_service_marks_its_running_job_interrupted(
        env: dict[str, Path], tmp_path: Path) -> None:
    """What a container's SIGTERM does: the lifespan stops the job at its next batch and no
    job is left ``running`` in the database (before any restart)."""
    data = tmp_path / "data"
    with serve(create_app(settings_for(env, data_dir=data)), ready_path="/readyz") as u:
        sid = ids(u)["demo.svs"]
        body = {"slides": [sid] * 50, "sampling": {"strategy": "grid", "patch_size_px": 224}}
        job = httpx.post(f"{u}/v1/jobs", json=body).json()["id"]
        deadline = time.monotonic() + 60
        while httpx.get(f"{u}/v1/jobs/{job}").json()["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    db = sqlite3.connect(data / "jobs.sqlite3")
    (state,) = db.execute("SELECT state FROM jobs WHERE id=?", (job,)).fetchone()
    db.close()
    assert state == "interrupted"


def test_uploads(env: dict[str, Path], url: str, demo_slide: Path) -> None:
    files = {"file": ("scan.svs", demo_slide.read_bytes(), "application/octet-stream")}
    resp = httpx.post(f"{url}/v1/slides", files=files)
    assert resp.status_code == 201, resp.text
    sid = resp.json()["id"]
    assert httpx.get(f"{url}/v1/slides/{sid}").json()["width"] == DEMO_SPEC.width
    for content, status in ((b"", 422), (b"hello, not a slide" * 100, 422),
                            (demo_slide.read_bytes()[:50_000], 422)):
        r = httpx.post(f"{url}/v1/slides", files={"file": ("x.svs", content)})
        assert r.status_code == status, r.text
    leftovers = list((env["data"] / "uploads" / ".incoming").iterdir())
    assert leftovers == []


def test_oversize_upload_is_413(env: dict[str, Path], demo_slide: Path) -> None:
    with serve(create_app(settings_for(env, max_upload_mb=0.5)), ready_path="/readyz") as u:
        r = httpx.post(f"{u}/v1/slides", files={"file": ("a.svs", demo_slide.read_bytes())})
        assert r.status_code == 413 and "limit" in r.json()["error"]


def test_api_keys(env: dict[str, Path]) -> None:
    with serve(create_app(settings_for(env, api_keys=["s3cret"])), ready_path="/readyz") as u:
        assert httpx.get(f"{u}/v1/slides").status_code == 401
        bad = httpx.get(f"{u}/v1/slides", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and "s3cret" not in bad.text
        ok = httpx.get(f"{u}/v1/slides", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert httpx.get(f"{u}/healthz").status_code == 200
        assert httpx.get(f"{u}/metrics").status_code == 200


def metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_disconnect_stops_the_work_and_limits_apply(env: dict[str, Path]) -> None:
    app = create_app(settings_for(env, max_concurrent_streams=1))
    with serve(app, ready_path="/readyz") as u:
        sid = ids(u)["demo.svs"]
        # ~11,000 overlapping 256 px tissue patches, ~1 GB of PNG: far more than socket buffers
        body = {"patch_size_px": 256, "overlap": 0.9, "min_tissue_fraction": 0.0}
        with httpx.stream("POST", f"{u}/v1/slides/{sid}/patches", json=body) as resp:
            total = int(resp.headers["x-patch-count"])
            chunks = resp.iter_bytes()  # kept alive: dropping it closes the connection
            assert next(chunks)
            busy = httpx.post(f"{u}/v1/slides/{sid}/patches", json=SAMPLE)
            assert busy.status_code == 429 and busy.headers["retry-after"]
        deadline = time.monotonic() + 20
        while metric(u, "wsi_active_streams") != 0:
            assert time.monotonic() < deadline, "the stream kept running after the disconnect"
            time.sleep(0.1)
        streamed = metric(u, "wsi_patches_streamed_total")
        time.sleep(0.5)
        assert metric(u, "wsi_patches_streamed_total") == streamed  # nothing more is read
        assert streamed < total / 10
        assert httpx.post(f"{u}/v1/slides/{sid}/patches", json=SAMPLE).status_code == 200


def test_health_metrics_and_openapi(url: str) -> None:
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
    assert httpx.get(f"{url}/readyz").json()["model"] == "tissue-qc"
    text = httpx.get(f"{url}/metrics").text
    assert "wsi_http_requests_total" in text and "wsi_worker_latency_seconds" in text
    spec = httpx.get(f"{url}/openapi.json").json()
    for path in ("/v1/slides", "/v1/slides/{slide_id}/patches", "/v1/jobs/{job_id}"):
        assert path in spec["paths"]
    assert "404" in spec["paths"]["/v1/slides/{slide_id}"]["get"]["responses"]


def test_delete_cancels_a_running_job(url: str) -> None:
    sid = ids(url)["demo.svs"]
    job = httpx.post(f"{url}/v1/jobs", json={"slides": [sid] * 30}).json()["id"]
    cancelled = httpx.delete(f"{url}/v1/jobs/{job}").json()
    assert cancelled["state"] == "cancelled"
    time.sleep(1.0)
    status = httpx.get(f"{url}/v1/jobs/{job}").json()
    assert status["state"] == "cancelled" and status["slides_done"] < 30
    assert httpx.post(f"{url}/v1/jobs", json={"slides": ["0" * 24]}).status_code == 404


@pytest.mark.parametrize("body", [{"seed": False}, {"n_patches": "5", "strategy": "random"},
                                  {"seed": "3"}, {"min_tissue_fraction": True}])
def test_request_fields_take_their_declared_json_types(url: str, body: dict[str, object]
                                                       ) -> None:
    resp = httpx.post(f"{url}/v1/slides/{ids(url)['demo.svs']}/plan", json=body)
    assert resp.status_code == 422 and "invalid request" in resp.json()["error"]


def test_a_plan_short_of_n_patches_says_so(url: str) -> None:
    sid = ids(url)["demo.svs"]
    plan = httpx.post(f"{url}/v1/slides/{sid}/plan",
                      json={"strategy": "random", "n_patches": 100000}).json()
    assert plan["n_patches"] < 100000 and "fewer than the 100000 asked" in plan["message"]
    full = httpx.post(f"{url}/v1/slides/{sid}/plan", json={"strategy": "random",
                                                           "n_patches": 5}).json()
    assert full["message"] is None


def test_uploads_keep_their_name_and_only_uploads_can_be_deleted(
        env: dict[str, Path], demo_slide: Path, cmu_svs: Path, tmp_path: Path) -> None:
    with serve(create_app(settings_for(env, data_dir=tmp_path / "data")),
               ready_path="/readyz") as url:
        with cmu_svs.open("rb") as fh:
            first = httpx.post(f"{url}/v1/slides", files={"file": ("case 12/CMU-1.svs", fh)})
        assert first.status_code == 201 and first.json()["name"] == "CMU-1.svs"
        raw = httpx.post(f"{url}/v1/slides", params={"name": "demo-upload.svs"},
                         content=demo_slide.read_bytes(),
                         headers={"content-type": "application/octet-stream"})
        assert raw.status_code == 201 and raw.json()["name"] == "demo-upload.svs"
        items = httpx.get(f"{url}/v1/slides", params={"limit": 1000}).json()["items"]
        listed = {i["id"]: i["name"] for i in items}
        assert listed[first.json()["id"]] == "CMU-1.svs"
        assert first.json()["uploaded"] and raw.json()["uploaded"]
        assert {i["name"] for i in items if i["uploaded"]} == {"CMU-1.svs", "demo-upload.svs"}
        root_slide = ids(url)["demo.svs"]
        refused = httpx.delete(f"{url}/v1/slides/{root_slide}")
        assert refused.status_code == 405 and "only uploads" in refused.json()["error"]
        gone = httpx.delete(f"{url}/v1/slides/{first.json()['id']}")
        assert gone.status_code == 204
        assert httpx.get(f"{url}/v1/slides/{first.json()['id']}").status_code == 404
        stored = [p for p in (tmp_path / "data" / "uploads").iterdir() if p.is_file()]
        assert len([p for p in stored if not p.name.startswith(".")]) == 1  # the demo's
        assert [p.read_text() for p in stored if p.name.endswith(".name")] == [
            "demo-upload.svs"]


def test_qc_summary_and_overlay_equal_the_library(url: str, demo_slide: Path) -> None:
    from wsi_sampler.qc import slide_qc

    sid = ids(url)["demo.svs"]
    got = httpx.get(f"{url}/v1/slides/{sid}/qc", timeout=120)
    assert got.status_code == 200, got.text
    with open_slide(demo_slide) as slide:
        summary, _ = slide_qc(slide)
    assert got.json() == summary.to_dict()
    png = httpx.get(f"{url}/v1/slides/{sid}/qc.png", params={"max_size": 512}, timeout=120)
    assert png.headers["content-type"] == "image/png"
    image = cv2.imdecode(np.frombuffer(png.content, np.uint8), cv2.IMREAD_COLOR)
    assert max(image.shape[:2]) == 512
    assert httpx.get(f"{url}/v1/slides/{ids(url)['kidney.tif']}/qc").status_code == 422
    assert httpx.get(f"{url}/v1/slides/{sid}/qc", params={"tissue_mpp": 0}).status_code == 422
    assert httpx.get(f"{url}/v1/slides/{'0' * 24}/qc").status_code == 404
