"""The service with three slide roots side by side: a local folder, an S3 prefix (moto) and
a DICOMweb server (Orthanc), the same demo slide in each. Every endpoint answers the same
for all three; a PACS that fails is a clear error, never a 500 or a silent empty 200."""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from _remote_servers import (
    ORTHANC_PASSWORD,
    ORTHANC_USER,
    S3_ENV,
    Orthanc,
    dicomize,
    moto_s3,
    orthanc,
)
from _servers import serve
from pydantic import SecretStr

from api.app import create_app
from api.config import Settings
from wsi_sampler import open_slide

DEMO_MPP = 0.25
SAMPLE = {"strategy": "random", "n_patches": 12, "seed": 4, "patch_size_px": 128,
          "target_mpp": 1.0, "image_format": "raw"}
SOURCES = ["local", "s3", "dicomweb"]
# JPEG frames decoded by two decoders (libjpeg-turbo here, openslide's there) differ by
# rounding; the S3 copy is the same file, so its pixels are identical.
TOLERANCE = {"local": 0, "s3": 0, "dicomweb": 2}


def _demo_size(demo: Path) -> tuple[int, int]:
    with open_slide(demo) as s:
        return s.dimensions


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, demo_slide: Path
           ) -> Iterator[dict[str, str]]:
    """moto and Orthanc, each holding the demo slide; the environment pointing at them."""
    work = tmp_path_factory.mktemp("stores")
    with moto_s3() as endpoint, orthanc(work / "pacs") as pacs, \
            pytest.MonkeyPatch.context() as mp:
        for key, value in S3_ENV.items():
            mp.setenv(key, value)
        mp.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        mp.setenv("WSI_DICOMWEB_USERNAME", ORTHANC_USER)
        mp.setenv("WSI_DICOMWEB_PASSWORD", ORTHANC_PASSWORD)
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("lab-slides")
        fs.put(str(demo_slide), "lab-slides/cohort/demo.svs")
        w, h = _demo_size(demo_slide)
        dicomize(pacs, demo_slide, work, width_mm=w * DEMO_MPP / 1000,
                 height_mm=h * DEMO_MPP / 1000, label="demo")
        yield {"s3": "s3://lab-slides/cohort/", "dicomweb": pacs.dicomweb}


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, demo_slide: Path, stores: dict[str, str]
        ) -> Iterator[str]:
    base = tmp_path_factory.mktemp("svc")
    (base / "slides").mkdir()
    (base / "slides" / "demo.svs").write_bytes(demo_slide.read_bytes())
    settings = Settings(slide_roots=[base / "slides"], data_dir=base / "data", demo_slide=False,
                        device="cpu", remote_slide_roots=[stores["s3"], stores["dicomweb"]])
    with serve(create_app(settings), ready_path="/readyz") as u:
        yield u


def _ids(url: str) -> dict[str, str]:
    items = httpx.get(f"{url}/v1/slides").json()["items"]
    return {i["source"]: i["id"] for i in items}


def test_listing_shows_the_three_roots_side_by_side(url: str) -> None:
    body = httpx.get(f"{url}/v1/slides").json()
    assert body["total"] == 3
    by_source = {i["source"]: i for i in body["items"]}
    assert set(by_source) == set(SOURCES)
    assert by_source["s3"]["path"] == "demo.svs" and by_source["s3"]["format"] == "svs"
    assert by_source["dicomweb"]["format"] == "dicom"
    assert by_source["dicomweb"]["name"] == "demo" and by_source["dicomweb"]["size_bytes"] is None
    assert by_source["dicomweb"]["path"].startswith("studies/")
    assert body["unavailable_roots"] == []
    assert "127.0.0.1" not in json.dumps(body)  # ids and relative paths, no server URLs
    again = httpx.get(f"{url}/v1/slides").json()
    assert [i["id"] for i in again["items"]] == [i["id"] for i in body["items"]]  # stable ids


def _raw_patches(url: str, sid: str) -> dict[str, np.ndarray]:
    resp = httpx.post(f"{url}/v1/slides/{sid}/patches", json=SAMPLE, timeout=120)
    assert resp.status_code == 200, resp.text
    out = {}
    with tarfile.open(fileobj=io.BytesIO(resp.content)) as tar:
        for member in tar:
            data = tar.extractfile(member)
            if member.name.endswith(".npy") and data is not None:
                out[member.name] = np.load(io.BytesIO(data.read()))
    return out


def _png(data: bytes, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    assert image is not None
    return image


@pytest.mark.parametrize("source", ["s3", "dicomweb"])
def test_every_endpoint_answers_as_for_the_local_file(url: str, source: str) -> None:
    ids = _ids(url)
    local, remote = ids["local"], ids[source]
    info_l = httpx.get(f"{url}/v1/slides/{local}").json()
    info_r = httpx.get(f"{url}/v1/slides/{remote}", timeout=60).json()
    for key in ("width", "height", "level_count", "level_dimensions"):
        assert info_r[key] == info_l[key], key
    assert info_r["mpp_x"] == pytest.approx(info_l["mpp_x"], rel=1e-6)

    thumbs = [_png(httpx.get(f"{url}/v1/slides/{sid}/thumbnail", params={"max_size": 256},
                             timeout=60).content) for sid in (local, remote)]
    assert thumbs[0].shape == thumbs[1].shape
    assert float(np.abs(thumbs[0].astype(int) - thumbs[1]).mean()) <= 1.0

    masks = [_png(httpx.get(f"{url}/v1/slides/{sid}/tissue", timeout=60).content,
                  cv2.IMREAD_GRAYSCALE) for sid in (local, remote)]
    assert masks[0].shape == masks[1].shape
    assert float((masks[0] != masks[1]).mean()) < 0.01

    plan_body = {k: v for k, v in SAMPLE.items() if k != "image_format"}
    plans = [httpx.post(f"{url}/v1/slides/{sid}/plan", json=plan_body, timeout=60).json()
             for sid in (local, remote)]
    assert plans[0]["patches"] == plans[1]["patches"] and len(plans[0]["patches"]) == 12

    want, got = _raw_patches(url, local), _raw_patches(url, remote)
    assert sorted(want) == sorted(got) and len(want) == 12
    for name, patch in want.items():
        assert int(np.abs(got[name].astype(int) - patch).max()) <= TOLERANCE[source], name

    # DeepZoom, as a viewer reads it: the same pyramid and tiles (PNG) as the local file
    dzis = [httpx.get(f"{url}/v1/slides/{sid}/deepzoom.dzi", timeout=60) for sid in (local,
                                                                               remote)]
    assert dzis[0].status_code == dzis[1].status_code == 200 and dzis[0].text == dzis[1].text
    for level, col, row in ((13, 0, 0), (13, 16, 12), (10, 1, 1)):
        tiles = [_png(httpx.get(f"{url}/v1/slides/{sid}/deepzoom_files/{level}/{col}_{row}.png",
                                timeout=60).content) for sid in (local, remote)]
        assert tiles[0].shape == tiles[1].shape
        assert int(np.abs(tiles[0].astype(int) - tiles[1]).max()) <= TOLERANCE[source]

    body = {"strategy": "random", "n_patches": 16, "seed": 2}
    records = [[json.loads(line) for line in httpx.post(
        f"{url}/v1/slides/{sid}/predictions", json=body, timeout=120).text.splitlines()]
        for sid in (local, remote)]
    assert records[0][-1]["type"] == records[1][-1]["type"] == "summary"
    assert [r["x0"] for r in records[0][:-1]] == [r["x0"] for r in records[1][:-1]]
    tissue = [np.array([r["outputs"]["tissue_fraction"] for r in recs[:-1]]) for recs in records]
    np.testing.assert_allclose(tissue[1], tissue[0], atol=0.02)


@contextmanager
def own_pacs(tmp_path: Path, demo_slide: Path, **settings: object
             ) -> Iterator[tuple[Orthanc, Settings]]:
    """An Orthanc of this test's own holding the demo slide, and service settings whose
    only remote root it is."""
    with orthanc(tmp_path / "pacs") as pacs:
        w, h = _demo_size(demo_slide)
        dicomize(pacs, demo_slide, tmp_path, width_mm=w * DEMO_MPP / 1000,
                 height_mm=h * DEMO_MPP / 1000, label="own")
        (tmp_path / "slides").mkdir()
        yield pacs, Settings(
            slide_roots=[tmp_path / "slides"], data_dir=tmp_path / "data", demo_slide=False,
            device="cpu", remote_slide_roots=[pacs.dicomweb], dicomweb_username=ORTHANC_USER,
            dicomweb_password=SecretStr(ORTHANC_PASSWORD), **settings)  # type: ignore[arg-type]


def test_a_pacs_crashing_mid_stream_aborts_the_tar_then_answers_503(
        tmp_path: Path, demo_slide: Path) -> None:
    """A second Orthanc, killed while the service streams from it."""
    with own_pacs(tmp_path, demo_slide, batch_size=16) as (pacs, settings):
        with serve(create_app(settings), ready_path="/readyz") as u:
            sid = _ids(u)["dicomweb"]
            grid = {"strategy": "grid", "patch_size_px": 256, "min_tissue_fraction": 0.0,
                    "image_format": "raw"}
            received = bytearray()
            with pytest.raises(httpx.RemoteProtocolError), httpx.stream(
                    "POST", f"{u}/v1/slides/{sid}/patches", json=grid, timeout=120) as resp:
                assert resp.status_code == 200
                planned = int(resp.headers["x-patch-count"])
                for chunk in resp.iter_bytes():
                    if not received:
                        pacs.crash()  # the PACS goes away after the first bytes
                    received += chunk
            assert planned > 50 and not received.endswith(b"\0" * 1024)  # no tar end marker
            down = httpx.get(f"{u}/v1/slides/{sid}/thumbnail", params={"max_size": 4000},
                             timeout=60)
            assert down.status_code == 503, down.text
            assert "could not be reached" in down.json()["error"]
            assert "127.0.0.1" not in down.json()["error"]  # the PACS URL is not echoed


def test_a_deleted_series_is_404_and_refused_credentials_are_reported(
        tmp_path: Path, demo_slide: Path) -> None:
    with own_pacs(tmp_path, demo_slide) as (pacs, settings):
        with serve(create_app(settings), ready_path="/readyz") as u:
            sid = _ids(u)["dicomweb"]
            auth = (ORTHANC_USER, ORTHANC_PASSWORD)
            for series in httpx.get(f"{pacs.rest}/series", auth=auth).json():
                httpx.delete(f"{pacs.rest}/series/{series}", auth=auth).raise_for_status()
            gone = httpx.get(f"{u}/v1/slides/{sid}/tissue", timeout=60)
            assert gone.status_code == 404, gone.text
            assert "not found" in gone.json()["error"]
        refused = settings.model_copy(update={"dicomweb_password": SecretStr("not-the-password")})
        with serve(create_app(refused), ready_path="/readyz") as u:
            listed = httpx.get(f"{u}/v1/slides").json()
            assert listed["total"] == 0  # the PACS refused the listing, and the answer says so
            (failed,) = listed["unavailable_roots"]
            assert (failed["source"], failed["root"]) == ("dicomweb", 0)
            assert "refused the credentials (HTTP 401)" in failed["error"]
            assert "127.0.0.1" not in failed["error"] and "not-the-password" not in json.dumps(
                listed)


def test_a_job_scores_slides_from_all_three_roots_alike(url: str) -> None:
    ids = _ids(url)
    body = {"slides": [ids[s] for s in SOURCES],
            "sampling": {"strategy": "random", "n_patches": 12, "seed": 1}}
    resp = httpx.post(f"{url}/v1/jobs", json=body)
    assert resp.status_code == 202, resp.text
    job = resp.json()["id"]
    deadline = time.monotonic() + 180
    while (status := httpx.get(f"{url}/v1/jobs/{job}").json())["state"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert status["state"] == "succeeded" and status["slides_done"] == 3, status
    tables = {s: httpx.get(f"{url}/v1/jobs/{job}/results/{ids[s]}.predictions.csv").text
              for s in SOURCES}
    rows = {s: [line.split(",") for line in text.splitlines()[1:]] for s, text in tables.items()}
    assert len(rows["local"]) == 12
    for source in ("s3", "dicomweb"):
        assert [r[:4] for r in rows[source]] == [r[:4] for r in rows["local"]]  # same patches


def test_canary_credentials_of_s3_and_a_pacs_never_reach_an_answer_or_log(
        tmp_path: Path, demo_slide: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    key_id, secret, token = "AKIACANARY0000000042", "canary-s3-secret-77", "canary-pacs-99"
    with moto_s3() as endpoint, own_pacs(tmp_path, demo_slide) as (_, settings):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        # a bucket that is not there, and a PACS that refuses our (bearer) token
        refused = settings.model_copy(update={
            "remote_slide_roots": ["s3://no-such-bucket/cohort/", *settings.remote_slide_roots],
            "dicomweb_password": None, "dicomweb_username": None,
            "dicomweb_token": SecretStr(token)})
        with caplog.at_level("INFO"), serve(create_app(refused), ready_path="/readyz") as u:
            listed = httpx.get(f"{u}/v1/slides")
            job = httpx.post(f"{u}/v1/slides/0123456789abcdef01234567/plan", json={})
    text = listed.text + job.text + "\n".join(r.getMessage() for r in caplog.records)
    assert len(listed.json()["unavailable_roots"]) == 2, listed.text
    for canary in (key_id, secret, token):
        assert canary not in text
