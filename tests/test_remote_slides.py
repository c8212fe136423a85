"""Slides on servers, read for real: nginx (HTTP Range), moto's S3 server, Orthanc DICOMweb.

Every remote read is compared with the same slide read from the local file: the same plan,
the same pixels. Byte counts come from our own counter and, for nginx, from the server's
access log, so "reads only the tiles it needs" is measured on both ends.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _cli import run_cli
from _remote_servers import (
    ORTHANC_PASSWORD,
    ORTHANC_USER,
    S3_ENV,
    Nginx,
    Orthanc,
    dicomize,
    moto_s3,
    nginx,
    orthanc,
    self_signed_certificate,
    upload_dicom,
)

from wsi_sampler import (
    Extractor,
    InvalidRequestError,
    PlanParams,
    Slide,
    SlideNotFoundError,
    SlideStoreError,
    SlideStoreUnavailableError,
    compute_tissue_mask,
    make_plan,
    open_slide,
)
from wsi_sampler.sources.location import parse_location
from wsi_sampler.sources.ranged import coalesce

PLAN64 = PlanParams(strategy="random", n_patches=64, patch_size_px=224, target_mpp=0.25, seed=7,
                    min_tissue_fraction=0.25)


def _pixels(slide: Slide, params: PlanParams = PLAN64, **kw: object) -> tuple[object, np.ndarray]:
    plan = make_plan(slide, params)
    batches = [b.images for b in Extractor(slide, plan, **kw).iter_batches()]  # type: ignore[arg-type]
    return plan, np.concatenate(batches)


def _same_plan(a: object, b: object) -> None:
    assert np.array_equal(a.x0, b.x0) and np.array_equal(a.y0, b.y0)  # type: ignore[attr-defined]
    assert a.level == b.level  # type: ignore[attr-defined]


def _tile_bytes(local: Slide, plan: object) -> tuple[int, int]:
    """(tiles, stored bytes) the plan's patches touch (from the local file's tables)."""
    source = local.tile_source()
    assert source is not None
    level, ds = plan.level, plan.downsample  # type: ignore[attr-defined]
    lv = source.levels[level]
    size = round(plan.width0 / ds)  # type: ignore[attr-defined]
    keys = {k for x, y in zip(plan.x0.tolist(), plan.y0.tolist(), strict=True)  # type: ignore[attr-defined]
            for k in source.tiles_for_box(level, int(x // ds), int(y // ds), size, size)}
    return len(keys), sum(int(lv.bytecounts[ty * lv.tiles_across + tx]) for tx, ty in keys)


# -- locations ------------------------------------------------------------------------------

def test_locations_parse_and_refuse_what_they_cannot_be() -> None:
    assert parse_location("/data/a.svs").kind == "file"
    assert parse_location("file:///data/a.svs").url == "/data/a.svs"
    assert parse_location("https://h/slides/a.svs").kind == "http"
    s3 = parse_location("s3://bucket/cohort/a.svs")
    assert (s3.kind, s3.name) == ("s3", "a.svs")
    dw = parse_location("dicomweb+http://pacs:8042/dicom-web/studies/1.2.3/series/1.2.3.4")
    assert (dw.server, dw.study, dw.series) == ("http://pacs:8042/dicom-web", "1.2.3", "1.2.3.4")
    assert parse_location("dicomweb://pacs/dicom-web").server == "https://pacs/dicom-web"
    assert parse_location("dicomweb://pacs/dicom-web").study == ""
    with pytest.raises(InvalidRequestError, match="credentials"):
        parse_location("https://user:pw@h/a.svs")
    with pytest.raises(InvalidRequestError, match="unknown scheme"):
        parse_location("ftp://h/a.svs")
    with pytest.raises(InvalidRequestError, match="studies/<study UID>/series/<series UID>"):
        parse_location("dicomweb://pacs/dicom-web/studies/1.2/series/x;drop")
    with pytest.raises(InvalidRequestError, match="not a DICOM UID"):
        parse_location("dicomweb://pacs/dicom-web/studies/1.2/series/" + "1." * 40 + "1")
    with pytest.raises(InvalidRequestError, match="openslide reads local files only"):
        open_slide("https://127.0.0.1:9/a.svs", backend="openslide")


def test_coalescing_merges_near_ranges_only() -> None:
    assert coalesce([(100, 200), (0, 50), (210, 300), (1 << 20, (1 << 20) + 10)], gap=16) == [
        (0, 50), (100, 300), (1 << 20, (1 << 20) + 10)]
    assert coalesce([(0, 10), (5, 8)]) == [(0, 10)]
    assert coalesce([(0, 0)]) == []


# -- HTTP (nginx) ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory, demo_slide: Path, cmu_svs: Path
        ) -> Iterator[Nginx]:
    www = tmp_path_factory.mktemp("www")
    shutil.copy(demo_slide, www / "demo.svs")
    shutil.copy(cmu_svs, www / "cmu.svs")
    with nginx(www, tmp_path_factory.mktemp("nginx")) as server:
        yield server


@pytest.mark.parametrize("name", ["demo.svs", "cmu.svs"])
def test_http_slide_reads_the_same_plan_and_pixels_as_the_file(web: Nginx, name: str) -> None:
    with open_slide(web.www / name) as local, open_slide(f"{web.url}/{name}") as remote:
        assert remote.backend == "tiffslide" and remote.path is None
        assert (remote.dimensions, remote.level_dimensions, remote.mpp) == (
            local.dimensions, local.level_dimensions, local.mpp)
        assert remote.fingerprint == local.fingerprint  # same bytes, same fingerprint
        params = PlanParams(strategy="random", n_patches=64, patch_size_px=224,
                            target_mpp=local.mpp[0] * 2 if local.mpp else 0.5, seed=3,
                            min_tissue_fraction=0.0)
        local_plan, local_px = _pixels(local, params)
        remote_plan, remote_px = _pixels(remote, params)
        _same_plan(local_plan, remote_plan)
        assert np.array_equal(local_px, remote_px)
        assert Extractor(remote, remote_plan).path_name == "tiles"
        assert np.array_equal(remote.thumbnail(max_size=256), local.thumbnail(max_size=256))


def test_a_64_patch_plan_fetches_its_tiles_and_little_else(web: Nginx) -> None:
    with open_slide(web.www / "demo.svs") as local, \
            open_slide(f"{web.url}/demo.svs") as remote:
        plan = make_plan(remote, PLAN64)
        assert len(plan) == 64
        logged_before, ours_before = web.bytes_sent(), remote.io_stats()
        lines_before = len(web.requests())
        assert ours_before is not None
        list(Extractor(remote, plan).iter_batches())
        ours = remote.io_stats()
        assert ours is not None
        fetched = ours["bytes_fetched"] - ours_before["bytes_fetched"]
        logged = web.bytes_sent() - logged_before
        tiles, needed = _tile_bytes(local, plan)
        ratio = fetched / needed
        assert logged == fetched  # nginx counts what we count
        assert 1.0 <= ratio <= 1.10, ratio
        # ...in fewer requests than tiles (neighbours coalesced), every one a ranged GET
        requests = ours["requests"] - ours_before["requests"]
        assert requests < tiles, (requests, tiles)
        during = web.requests()[lines_before:]
        assert len(during) == requests
        assert all(r.startswith('206 ') and ' GET "bytes=' in r for r in during), during[:3]


def test_tissue_detection_reads_a_low_level_only(web: Nginx) -> None:
    with open_slide(web.www / "demo.svs") as local, \
            open_slide(f"{web.url}/demo.svs") as remote:
        assert remote.tile_source() is not None  # its header parsed: tiles only from here
        before = remote.io_stats()
        assert before is not None
        compute_tissue_mask(remote, tissue_mpp=8.0)
        after = remote.io_stats()
        assert after is not None
        source = local.tile_source()
        assert source is not None
        level = local.best_level_for_downsample(8.0 / local.mpp[0])  # type: ignore[index]
        assert level == local.level_count - 1 > 0
        level_bytes = int(source.levels[level].bytecounts.sum())
        level0_bytes = int(source.levels[0].bytecounts.sum())
        fetched = after["bytes_fetched"] - before["bytes_fetched"]
        assert 0 < fetched <= level_bytes * 1.05, (fetched, level_bytes)
        assert fetched < level0_bytes / 10


def test_a_slide_reopened_within_a_minute_reuses_its_header(web: Nginx) -> None:
    """The service opens a slide per request: the second open costs no request."""
    from wsi_sampler.sources.remote_tiff import forget_shared_files

    forget_shared_files()
    with open_slide(f"{web.url}/cmu.svs") as first:
        assert first.tile_source() is not None
        opened = first.io_stats()
    assert opened is not None and opened["requests"] > 0
    logged = len(web.requests())
    with open_slide(f"{web.url}/cmu.svs") as again:
        assert again.tile_source() is not None
        assert again.io_stats() == {"requests": 0, "bytes_fetched": 0}
    assert len(web.requests()) == logged


def test_http_errors_are_clear(web: Nginx) -> None:
    with pytest.raises(SlideNotFoundError, match="not found"):
        open_slide(f"{web.url}/missing.svs")
    from _servers import free_port

    with pytest.raises(SlideStoreUnavailableError, match="could not be reached"):
        open_slide(f"http://127.0.0.1:{free_port()}/demo.svs")


def test_cli_reads_http_slides_and_reports_errors_in_one_line(web: Nginx) -> None:
    cli = [sys.executable, "-c", "from wsi_sampler.cli import main; main()"]
    info = subprocess.run([*cli, "info", f"{web.url}/demo.svs"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert info.returncode == 0, info.stderr
    assert "8192" in info.stdout
    missing = subprocess.run([*cli, "info", f"{web.url}/nope.svs"], capture_output=True,
                             text=True, timeout=120, check=False)
    assert missing.returncode != 0
    assert "not found" in missing.stderr and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


# -- S3 (moto) ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3(demo_slide: Path) -> Iterator[str]:
    with moto_s3() as endpoint:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in S3_ENV.items():
                mp.setenv(key, value)
            mp.setenv("AWS_ENDPOINT_URL_S3", endpoint)
            import s3fs

            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir("slides")
            fs.put(str(demo_slide), "slides/cohort/a/demo.svs")
            # more keys than one ListObjectsV2 page (1,000), the slide after them
            fs.pipe({f"slides/cohort/notes/{i:04d}.txt": b"x" for i in range(1005)})
            fs.put(str(demo_slide), "slides/cohort/zz/demo-copy.svs")
            yield endpoint


def test_s3_slide_reads_the_same_plan_and_pixels_as_the_file(s3: str, demo_slide: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3)
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    with open_slide(demo_slide) as local, open_slide("s3://slides/cohort/a/demo.svs") as remote:
        assert remote.fingerprint == local.fingerprint
        local_plan, local_px = _pixels(local)
        remote_plan = make_plan(remote, PLAN64)
        before = remote.io_stats()
        batches = Extractor(remote, remote_plan).iter_batches()
        remote_px = np.concatenate([b.images for b in batches])
        after = remote.io_stats()
        _same_plan(local_plan, remote_plan)
        assert np.array_equal(local_px, remote_px)
        assert before is not None and after is not None
        _, needed = _tile_bytes(local, remote_plan)
        assert 1.0 <= (after["bytes_fetched"] - before["bytes_fetched"]) / needed <= 1.10
    with pytest.raises(SlideNotFoundError):
        open_slide("s3://slides/cohort/missing.svs")
    with pytest.raises(SlideNotFoundError):
        open_slide("s3://no-such-bucket/demo.svs")


def test_s3_prefix_listing_pages_through_every_key(s3: str, monkeypatch: pytest.MonkeyPatch
                                                   ) -> None:
    from wsi_sampler.sources.listing import list_remote_root

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3)
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    found = list_remote_root("s3://slides/cohort/")
    assert [(s.relpath, s.format) for s in found] == [("a/demo.svs", "svs"),
                                                       ("zz/demo-copy.svs", "svs")]
    assert found[0].location == "s3://slides/cohort/a/demo.svs"
    assert found[0].size_bytes and found[0].size_bytes > 1_000_000


def test_batch_scores_an_s3_prefix_as_it_scores_a_folder(
        s3: str, demo_slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_sampler import PlanParams
    from wsi_sampler.batch import BatchConfig, run_batch

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3)
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "local" / "a").mkdir(parents=True)
    shutil.copy(demo_slide, tmp_path / "local" / "a" / "demo.svs")
    cfg = BatchConfig(params=PlanParams(strategy="random", n_patches=24, seed=1), device="cpu")
    local = run_batch(tmp_path / "local", tmp_path / "out-local", cfg)
    remote = run_batch("s3://slides/cohort/", tmp_path / "out-s3", cfg)
    assert not local.failures and not remote.failures
    summary = (tmp_path / "out-s3" / "summary.csv").read_text()
    assert "a/demo.svs,done" in summary and "zz/demo-copy.svs,done" in summary
    key = local.done[0]["key"]  # the same relative path, the same result folder
    assert (tmp_path / "out-s3" / "slides" / key / "coords.h5").is_file()
    assert (tmp_path / "out-s3" / "slides" / key / "predictions.csv").read_text() == \
        (tmp_path / "out-local" / "slides" / key / "predictions.csv").read_text()

    # the command line, in this process (torch is imported already)
    done = run_cli("score", "s3://slides/cohort/", "-o", tmp_path / "cli", "-q",
                   "--n-patches", "8", "--strategy", "random", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "zz/demo-copy.svs,done" in (tmp_path / "cli" / "summary.csv").read_text()
    for root, says in (("s3://no-such-bucket/x/", "not found"),
                       ("https://example.org/slides/", "cannot be listed")):
        failed = run_cli("score", root, "-o", tmp_path / "bad", "-q")
        assert failed.returncode != 0 and says in failed.stderr, failed.stderr
        assert "Traceback" not in failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1


# -- DICOMweb (Orthanc) ---------------------------------------------------------------------

DEMO_MPP = 0.25


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, demo_slide: Path, dicom_dir: Path
         ) -> Iterator[tuple[Orthanc, dict[str, str]]]:
    work = tmp_path_factory.mktemp("orthanc")
    with orthanc(work / "storage") as server, pytest.MonkeyPatch.context() as mp:
        mp.setenv("WSI_DICOMWEB_USERNAME", ORTHANC_USER)
        mp.setenv("WSI_DICOMWEB_PASSWORD", ORTHANC_PASSWORD)
        with open_slide(demo_slide) as s:
            w, h = s.dimensions
        demo = dicomize(server, demo_slide, work, width_mm=w * DEMO_MPP / 1000,
                        height_mm=h * DEMO_MPP / 1000, label="demo")
        bone = upload_dicom(server, next(dicom_dir.glob("*.dcm")))
        yield server, {"demo": server.series_url(*demo), "bone": server.series_url(*bone)}


def test_dicomweb_demo_reads_the_same_plan_and_pixels_as_the_svs(
        pacs: tuple[Orthanc, dict[str, str]], demo_slide: Path) -> None:
    _, urls = pacs
    with open_slide(demo_slide) as local, open_slide(urls["demo"]) as remote:
        assert remote.backend == "wsidicom"
        assert remote.level_dimensions == local.level_dimensions
        assert remote.mpp is not None and np.allclose(remote.mpp, local.mpp or (), rtol=1e-6)
        local_plan, local_px = _pixels(local)
        remote_plan = make_plan(remote, PLAN64)
        extractor = Extractor(remote, remote_plan)
        assert extractor.path_name == "tiles"
        before = remote.io_stats()
        remote_px = np.concatenate([b.images for b in extractor.iter_batches()])
        after = remote.io_stats()
        _same_plan(local_plan, remote_plan)
        assert int(np.abs(local_px.astype(int) - remote_px).max()) <= 2
        # frames come in batched WADO-RS requests (64 frames each), not one per tile
        tiles, _ = _tile_bytes(local, remote_plan)
        assert before is not None and after is not None
        assert after["requests"] - before["requests"] <= tiles // 64 + 3, (after, tiles)
        _, reference_px = _pixels(remote, mode="reference")  # through wsidicom's own reader
        assert int(np.abs(reference_px.astype(int) - remote_px).max()) <= 2
        thumb_local, thumb_remote = local.thumbnail(max_size=256), remote.thumbnail(max_size=256)
        assert thumb_local.shape == thumb_remote.shape
        assert float(np.abs(thumb_local.astype(int) - thumb_remote).mean()) < 1.0


def test_dicomweb_single_level_slide_matches_the_local_dicom(
        pacs: tuple[Orthanc, dict[str, str]], dicom_dir: Path) -> None:
    _, urls = pacs
    with open_slide(dicom_dir) as local, open_slide(urls["bone"]) as remote:
        assert remote.dimensions == local.dimensions == (957, 715)
        assert remote.mpp == pytest.approx(local.mpp, rel=1e-6)
        whole = local.read_region((0, 0), 0, (957, 715))
        assert int(np.abs(remote.read_region((0, 0), 0, (957, 715)).astype(int) - whole).max()) <= 2
        source = remote.tile_source()  # its JPEG frames, decoded by the fast path
        assert source is not None
        for tx, ty in [(0, 0), (3, 2), (1, 1)]:
            tile = source.read_tile(0, tx, ty)
            w, h = min(256, 957 - 256 * tx), min(256, 715 - 256 * ty)
            expected = local.read_region((256 * tx, 256 * ty), 0, (w, h))
            assert int(np.abs(tile[:h, :w].astype(int) - expected).max()) <= 2


def test_dicomweb_errors_are_clear(pacs: tuple[Orthanc, dict[str, str]],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    server, urls = pacs
    study = urls["demo"].split("/studies/")[1].split("/")[0]
    with pytest.raises(SlideNotFoundError):
        open_slide(server.series_url(study, "1.2.3.4.5.6.7"))
    with pytest.raises(SlideNotFoundError, match="not a slide"):
        open_slide(server.dicomweb)
    monkeypatch.setenv("WSI_DICOMWEB_PASSWORD", "wrong")
    with pytest.raises(SlideStoreError, match="refused the credentials") as err:
        open_slide(urls["bone"])
    assert err.value.status == 401 and "wrong" not in str(err.value)
    from _servers import free_port

    with pytest.raises(SlideStoreUnavailableError, match="could not be reached"):
        open_slide(f"dicomweb+http://127.0.0.1:{free_port()}/dicom-web/studies/1.2/series/1.3")


def test_dicomweb_server_listing(pacs: tuple[Orthanc, dict[str, str]]) -> None:
    from wsi_sampler.sources.listing import list_remote_root

    server, urls = pacs
    found = {s.location: s for s in list_remote_root(server.dicomweb)}
    assert set(found) == set(urls.values())
    assert found[urls["demo"]].name == "demo" and found[urls["demo"]].format == "dicom"


def test_batch_scores_every_series_of_a_dicomweb_server(
        pacs: tuple[Orthanc, dict[str, str]], tmp_path: Path) -> None:
    from wsi_sampler import PlanParams
    from wsi_sampler.batch import BatchConfig, run_batch

    server, urls = pacs
    cfg = BatchConfig(params=PlanParams(strategy="random", n_patches=16, seed=2), device="cpu")
    report = run_batch(server.dicomweb, tmp_path / "out", cfg)
    rows = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    demo_rel = urls["demo"].split("/dicom-web/", 1)[1]
    bone_rel = urls["bone"].split("/dicom-web/", 1)[1]
    assert any(r.startswith(f"{demo_rel},done,") for r in rows), rows
    # the bone slide's made-up 16.8 µm/px cannot give 0.5 µm/px patches: it fails alone,
    # saying why
    assert [f["slide"] for f in report.failures] == [bone_rel]
    assert "µm/px" in report.failures[0]["message"] or "mpp" in report.failures[0]["message"]


def test_tls_is_verified_and_a_private_ca_can_be_trusted(
        pacs: tuple[Orthanc, dict[str, str]], demo_slide: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """nginx over HTTPS (a self-signed certificate) serving a file and proxying Orthanc."""
    server, urls = pacs
    (tmp_path / "www").mkdir()
    shutil.copy(demo_slide, tmp_path / "www" / "demo.svs")
    cert = self_signed_certificate(tmp_path)
    with nginx(tmp_path / "www", tmp_path / "nginx", tls=cert,
               proxy_dicomweb=server.rest) as front:
        https_file = f"{front.url}/demo.svs"
        series = urls["bone"].split("/dicom-web/", 1)[1]
        dicomweb = f"dicomweb://{front.url.split('://', 1)[1]}/dicom-web/{series}"
        with pytest.raises(SlideStoreError, match="TLS certificate could not be verified"):
            open_slide(https_file)
        with pytest.raises(SlideStoreError, match="WSI_DICOMWEB_CA_BUNDLE"):
            open_slide(dicomweb)
        monkeypatch.setenv("WSI_HTTP_CA_BUNDLE", str(cert[0]))
        monkeypatch.setenv("WSI_DICOMWEB_CA_BUNDLE", str(cert[0]))
        with open_slide(https_file) as s, open_slide(demo_slide) as local:
            assert s.fingerprint == local.fingerprint
        with open_slide(dicomweb) as s:
            assert s.dimensions == (957, 715)


def test_cli_plan_of_a_dicomweb_slide(pacs: tuple[Orthanc, dict[str, str]], tmp_path: Path
                                      ) -> None:
    _, urls = pacs
    out = tmp_path / "plan.json"
    done = subprocess.run(
        [sys.executable, "-c", "from wsi_sampler.cli import main; main()", "plan", urls["demo"],
         "--strategy", "random",
         "--n-patches", "16", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(out.read_text())["patches"]) == 16
