"""wsi_sampler.client against a real uvicorn: the arrays it yields are the extractor's."""

from __future__ import annotations

import shutil
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from _servers import serve, slide_ids
from _slides import corrupt_lower_half

from api.app import create_app
from api.config import Settings
from wsi_sampler import Extractor, PlanParams, make_plan, open_slide
from wsi_sampler.client import PatchStreamError, stream_patches

PLAN = {"strategy": "random", "n_patches": 70, "seed": 3, "patch_size_px": 224,
        "target_mpp": 0.5}
KEY = "client-test-key"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, demo_slide: Path) -> Path:
    base = tmp_path_factory.mktemp("client")
    (base / "slides").mkdir()
    shutil.copy(demo_slide, base / "slides" / "demo.svs")
    corrupt_lower_half(demo_slide, base / "slides" / "late-corrupt.svs")
    return base


@pytest.fixture(scope="module")
def url(root: Path) -> Iterator[str]:
    settings = Settings(slide_roots=[root / "slides"], data_dir=root / "data",  # type: ignore[call-arg]
                        demo_slide=False, device="cpu", api_keys=[KEY])
    with serve(create_app(settings), ready_path="/readyz") as base:
        yield base


def _active_streams(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("wsi_active_streams "):
            return float(line.split()[1])
    raise AssertionError("no wsi_active_streams gauge")


def _in_process(path: Path) -> tuple[list[tuple[int, int]], np.ndarray]:
    with open_slide(path) as slide:
        plan = make_plan(slide, PlanParams(**PLAN))  # type: ignore[arg-type]
        images = np.concatenate([b.images for b in Extractor(slide, plan).iter_batches()])
        return list(zip(plan.x0.tolist(), plan.y0.tolist(), strict=True)), images


def test_raw_and_png_patches_are_the_extractors_arrays(url: str, root: Path) -> None:
    sid = slide_ids(url, KEY)["demo.svs"]
    coords, expected = _in_process(root / "slides" / "demo.svs")
    for form in ("raw", "png"):
        got = list(stream_patches(url, sid, PLAN, image_format=form, api_key=KEY))
        assert [m["index"] for m, _ in got] == list(range(len(coords)))
        assert [(m["x0"], m["y0"]) for m, _ in got] == coords
        images = np.stack([im for _, im in got])
        assert images.dtype == np.uint8 and images.shape == expected.shape
        assert np.array_equal(images, expected), form


def test_jpeg_patches_are_the_extractor_pixels_within_jpeg_tolerance(url: str, root: Path
                                                                      ) -> None:
    # Compared with the extractor's own pixels, not with our encoder's output: the error
    # must be that of a quality-95 JPEG, measured here with OpenCV's independent encoder.
    import cv2

    sid = slide_ids(url, KEY)["demo.svs"]
    _, expected = _in_process(root / "slides" / "demo.svs")
    got = [im for _, im in stream_patches(url, sid, PLAN, image_format="jpeg", api_key=KEY)]
    assert len(got) == len(expected)
    for image, reference in zip(got, expected, strict=True):
        ok, data = cv2.imencode(".jpg", reference[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        opencv = cv2.imdecode(data, cv2.IMREAD_COLOR)[:, :, ::-1]
        ours = np.abs(image.astype(int) - reference).mean()
        theirs = np.abs(opencv.astype(int) - reference).mean()
        assert ok and ours <= theirs * 1.25 + 0.05, (ours, theirs)


def test_whole_stored_tiles_arrive_as_the_scanners_jpeg(url: str) -> None:
    """A 256 px grid at the native level of a slide tiled in 256 px: each JPEG member is the
    stored tile, decoding to exactly the raw patch (a quality-95 re-encode could not)."""
    sid = slide_ids(url, KEY)["demo.svs"]
    grid = {"strategy": "grid", "patch_size_px": 256}
    raw = list(stream_patches(url, sid, grid, api_key=KEY))
    jpeg = list(stream_patches(url, sid, grid, image_format="jpeg", api_key=KEY))
    assert len(raw) == len(jpeg) > 50
    for (meta_r, image_r), (meta_j, image_j) in zip(raw, jpeg, strict=True):
        assert meta_r == meta_j and np.array_equal(image_r, image_j)


def test_refusals_carry_the_services_message(url: str) -> None:
    with pytest.raises(PatchStreamError, match="HTTP 404"):
        list(stream_patches(url, "no-such-slide", PLAN, api_key=KEY))
    with pytest.raises(PatchStreamError, match="HTTP 401: .*API key"):
        list(stream_patches(url, slide_ids(url, KEY)["demo.svs"], PLAN))
    with pytest.raises(PatchStreamError, match="HTTP 422"):
        list(stream_patches(url, slide_ids(url, KEY)["demo.svs"], {"strategy": "nope"},
                            api_key=KEY))
    with pytest.raises(PatchStreamError, match="not an http"):
        list(stream_patches("ftp://example.org", "x"))
    from _servers import free_port

    with pytest.raises(PatchStreamError, match="could not be reached"):
        list(stream_patches(f"http://127.0.0.1:{free_port()}", "x"))


@pytest.mark.parametrize("form", ["raw", "jpeg"])
def test_a_stream_failing_mid_way_is_an_error_not_a_short_result(url: str, form: str) -> None:
    """jpeg: damaged stored tiles are not passed on, their decoding fails the stream."""
    sid = slide_ids(url, KEY)["late-corrupt.svs"]
    grid = {"strategy": "grid", "patch_size_px": 256, "min_tissue_fraction": 0.0}
    received = 0
    with pytest.raises(PatchStreamError, match=r"broke off after \d+ of \d+ patches") as info:
        for _ in stream_patches(url, sid, grid, image_format=form, api_key=KEY):
            received += 1
    planned = int(str(info.value).split(" of ")[1].split()[0])
    assert 0 < received < planned


def test_stopping_early_closes_the_connection(url: str, root: Path) -> None:
    coords, _ = _in_process(root / "slides" / "demo.svs")
    sid = slide_ids(url, KEY)["demo.svs"]
    stream = stream_patches(url, sid, PLAN, api_key=KEY)
    first = [next(stream) for _ in range(3)]
    stream.close()
    assert [m["index"] for m, _ in first] == [0, 1, 2]
    # The service notices the closed connection: its stream slot comes free, and the
    # next stream is whole.
    deadline = time.monotonic() + 10
    while _active_streams(url) != 0:
        assert time.monotonic() < deadline, "the closed stream still holds its slot"
        time.sleep(0.05)
    assert len(list(stream_patches(url, sid, PLAN, api_key=KEY))) == len(coords) > 3


def test_https_is_verified_and_a_private_ca_can_be_trusted(root: Path, tmp_path: Path) -> None:
    from _remote_servers import self_signed_certificate

    cert, key = self_signed_certificate(tmp_path)
    settings = Settings(slide_roots=[root / "slides"], data_dir=root / "data-tls",  # type: ignore[call-arg]
                        demo_slide=False, device="cpu")
    with serve(create_app(settings), ready_path="/readyz", tls=(cert, key)) as base:
        ca = ssl.create_default_context(cafile=str(cert))
        items = httpx.get(f"{base}/v1/slides", verify=ca).json()["items"]
        sid = next(i["id"] for i in items if i["path"] == "demo.svs")
        with pytest.raises(PatchStreamError, match="certificate could not be verified"):
            list(stream_patches(base, sid, PLAN))
        trusted = list(stream_patches(base, sid, PLAN, ca_bundle=str(cert)))
    assert len(trusted) > 3
