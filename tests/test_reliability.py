"""Failures a lab must be able to see, and inputs that must not hurt the service.

Everything runs against a real uvicorn on 127.0.0.1, read with httpx, curl and raw sockets.
Faults are injected into real components (a worker that fails on its Nth batch, tiles
overwritten in a real slide), never by mocking the server.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from _servers import folder_settings, serve, slide_ids, wait_for_job
from _slides import corrupt_lower_half

from api.app import create_app
from api.config import Settings
from api.slides import SlideRegistry, _slide_id
from wsi_sampler.errors import WorkerError
from wsi_sampler.models import Predictions, load_model
from wsi_sampler.worker import InProcessWorker

GRID = {"patch_size_px": 256, "min_tissue_fraction": 0.0, "strategy": "grid"}


@contextmanager
def failing_worker(fail_at: int, status: int = 500, times: int = 10**9
                   ) -> Iterator[tuple[str, dict[str, int]]]:
    """The real OIP worker app (tissue-qc) on uvicorn, behind a layer that answers
    ``status`` to inference calls ``fail_at`` .. ``fail_at + times - 1`` (1-based), as a
    server out of memory or restarting does; yields its URL and the call counter."""
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import JSONResponse

    from api.worker_app import create_worker_app

    app = create_worker_app(lambda: load_model("tissue-qc", device="cpu"))
    calls = {"infer": 0}

    async def fail(request, call_next):  # type: ignore[no-untyped-def]
        if request.url.path.endswith("/infer"):
            calls["infer"] += 1
            if fail_at <= calls["infer"] < fail_at + times:
                return JSONResponse({"error": f"CUDA out of memory (call {calls['infer']})"},
                                    status_code=status)
        return await call_next(request)

    app.add_middleware(BaseHTTPMiddleware, dispatch=fail)
    with serve(app, ready_path="/v2/health/ready") as url:
        yield url, calls


class FailingWorker:
    """tissue-qc that raises ``error`` from its ``fail_at``-th batch on: a bug of our own
    (an unexpected exception), not a remote answer (those use :func:`failing_worker`)."""

    def __init__(self, fail_at: int, error: type[Exception] = WorkerError) -> None:
        self.inner = InProcessWorker(load_model("tissue-qc", device="cpu"))
        self.card = self.inner.card
        self.fail_at = fail_at
        self.error = error
        self.calls = 0

    def infer(self, patches: npt.NDArray[np.uint8]) -> Predictions:
        self.calls += 1
        if self.calls >= self.fail_at:
            raise self.error("the remote worker answered HTTP 500")
        return self.inner.infer(patches)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, demo_slide: Path) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("reliability")
    root, outside = base / "slides", base / "outside"
    root.mkdir()
    outside.mkdir()
    shutil.copy(demo_slide, root / "demo.svs")
    corrupt_lower_half(demo_slide, root / "late-corrupt.svs")
    shutil.copy(demo_slide, outside / "secret.dcm")
    os.mkfifo(root / "fifo.svs")
    (root / "dicom-fifo").mkdir()
    shutil.copy(demo_slide, root / "dicom-fifo" / "a.dcm")
    os.mkfifo(root / "dicom-fifo" / "b.dcm")
    (root / "dicom-link").mkdir()
    os.symlink(outside / "secret.dcm", root / "dicom-link" / "x.dcm")
    os.symlink("/etc/passwd", root / "passwd.svs")
    os.symlink(root / "loop-a.svs", root / "loop-b.svs")
    os.symlink(root / "loop-b.svs", root / "loop-a.svs")
    return {"root": root, "data": base / "data"}


def settings_for(env: dict[str, Path], **kw: object) -> Settings:
    values: dict[str, object] = {"slide_roots": [env["root"]], "data_dir": env["data"],
                                 "demo_slide": False, "device": "cpu"}
    return Settings(**(values | kw))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def url(env: dict[str, Path]) -> Iterator[str]:
    with serve(create_app(settings_for(env)), ready_path="/readyz") as base:
        yield base


ids = slide_ids


# -- failures after the stream started ---------------------------------------------------------

def test_worker_failing_mid_stream_ends_ndjson_with_an_error_and_aborts(
        env: dict[str, Path]) -> None:
    with failing_worker(fail_at=3) as (worker_url, calls), serve(
            create_app(settings_for(env, batch_size=4, worker_url=worker_url)),
            ready_path="/readyz") as u:
        sid = ids(u)["demo.svs"]
        body = {"strategy": "grid", "min_tissue_fraction": 0.0}  # 52 patches, 13 batches
        lines: list[dict[str, object]] = []
        with pytest.raises(httpx.RemoteProtocolError), \
                httpx.stream("POST", f"{u}/v1/slides/{sid}/predictions", json=body) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                lines.append(json.loads(line))
        assert lines and all(r["type"] == "patch" for r in lines[:-1])
        assert lines[-1]["type"] == "error" and lines[-1]["status"] == 502
        assert "(HTTP 500): CUDA out of memory" in str(lines[-1]["error"])
        assert "127.0.0.1" not in str(lines[-1]["error"])  # our upstream is not named
        assert not any(r["type"] == "summary" for r in lines)
        # curl sees a failed transfer too (18: partial file / 56: receive failure)
        calls["infer"] = 0
        done = subprocess.run(
            ["curl", "-sS", "-N", "-X", "POST", "-H", "content-type: application/json",
             "-d", json.dumps(body), f"{u}/v1/slides/{sid}/predictions"],
            capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode != 0, done.stdout[-300:]
        assert json.loads(done.stdout.strip().splitlines()[-1])["type"] == "error"


def test_worker_failing_on_the_first_batch_is_an_ordinary_502(env: dict[str, Path]) -> None:
    with failing_worker(fail_at=1) as (worker_url, _), serve(
            create_app(settings_for(env, worker_url=worker_url)), ready_path="/readyz") as u:
        resp = httpx.post(f"{u}/v1/slides/{ids(u)['demo.svs']}/predictions",
                          json={"strategy": "random", "n_patches": 8})
        assert resp.status_code == 502 and "HTTP 500" in resp.json()["error"]


@pytest.mark.parametrize("status", [502, 503, 504])
def test_a_worker_that_is_restarting_is_retried(env: dict[str, Path], status: int) -> None:
    # Two overloaded answers, then the worker is back: the client's retries carry the
    # stream through; past the retries it is a 503 saying the worker is unavailable.
    with failing_worker(fail_at=1, status=status, times=2) as (worker_url, calls), serve(
            create_app(settings_for(env, worker_url=worker_url)), ready_path="/readyz") as u:
        sid = ids(u)["demo.svs"]
        ok = httpx.post(f"{u}/v1/slides/{sid}/predictions", timeout=60,
                        json={"strategy": "random", "n_patches": 8})
        assert ok.status_code == 200 and calls["infer"] == 3, ok.text[:300]
    with failing_worker(fail_at=1, status=status) as (worker_url, _), serve(
            create_app(settings_for(env, worker_url=worker_url)), ready_path="/readyz") as u:
        down = httpx.post(f"{u}/v1/slides/{ids(u)['demo.svs']}/predictions", timeout=60,
                          json={"strategy": "random", "n_patches": 8})
        assert down.status_code == 503 and "failed after" in down.json()["error"]


def test_corrupt_tiles_after_the_first_batch_abort_the_tar(url: str) -> None:
    sid = ids(url)["late-corrupt.svs"]
    received = bytearray()
    with pytest.raises(httpx.RemoteProtocolError), \
            httpx.stream("POST", f"{url}/v1/slides/{sid}/patches", json=GRID) as resp:
        assert resp.status_code == 200
        planned = int(resp.headers["x-patch-count"])
        for chunk in resp.iter_bytes():
            received += chunk
    assert len(received) > 0 and not received.endswith(b"\0" * 1024)  # no tar end marker
    with tarfile.open(fileobj=_BytesReader(received), mode="r|") as tar:
        members = sum(1 for _ in tar)
    assert 0 < members < 2 * planned  # some patches arrived, not all of them


def test_corrupt_tiles_in_ndjson_end_with_an_error_record(url: str) -> None:
    sid = ids(url)["late-corrupt.svs"]
    lines = []
    with pytest.raises(httpx.RemoteProtocolError), httpx.stream(
            "POST", f"{url}/v1/slides/{sid}/patches", params={"format": "ndjson"},
            json=GRID) as resp:
        for line in resp.iter_lines():
            lines.append(json.loads(line))
    assert lines[-1]["type"] == "error" and lines[-1]["status"] == 422
    assert "damaged" in lines[-1]["error"]
    assert str(Path("/")) + "tmp" not in lines[-1]["error"]  # no server path


class _BytesReader:
    def __init__(self, data: bytes | bytearray) -> None:
        self.data, self.pos = bytes(data), 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        out, self.pos = self.data[self.pos : end], min(end, len(self.data))
        return out


# -- the slide roots ---------------------------------------------------------------------------

def test_fifos_links_and_loops_are_never_listed_nor_opened(url: str, env: dict[str, Path]
                                                          ) -> None:
    t0 = time.monotonic()
    listed = ids(url)
    assert time.monotonic() - t0 < 5
    assert set(listed) == {"demo.svs", "late-corrupt.svs"}  # no fifo, no link out, no loop
    root = env["root"].resolve()
    for rel in ("fifo.svs", "dicom-fifo", "dicom-link", "passwd.svs", "loop-a.svs"):
        for _ in range(50 if rel == "fifo.svs" else 1):  # more than the thread pool
            resp = httpx.get(f"{url}/v1/slides/{_slide_id(root, rel)}", timeout=5)
            assert resp.status_code == 404, rel
            assert "root:" not in resp.text
    assert httpx.get(f"{url}/v1/slides/{listed['demo.svs']}", timeout=5).status_code == 200


def test_unknown_ids_never_rescan_the_roots(tmp_path: Path) -> None:
    registry = SlideRegistry([tmp_path])
    registry.scan()

    def no_scan() -> None:
        raise AssertionError("an unknown id rescanned the roots")

    registry.scan = no_scan  # type: ignore[method-assign]
    with pytest.raises(FileNotFoundError):
        registry.get("0" * 24)


def test_errors_name_the_slide_not_the_server_path(url: str, env: dict[str, Path]) -> None:
    resp = httpx.get(f"{url}/v1/slides/{ids(url)['demo.svs']}/tissue",
                     params={"mpp_override": 0.05, "tissue_mpp": 0.25, "format": "geojson"})
    assert resp.status_code == 200
    (env["root"] / "cut.svs").write_bytes((env["root"] / "demo.svs").read_bytes()[:5000])
    try:
        with serve(create_app(settings_for(env)), ready_path="/readyz") as u:
            resp = httpx.post(f"{u}/v1/slides/{ids(u)['cut.svs']}/plan", json={})
    finally:
        (env["root"] / "cut.svs").unlink()
    assert resp.status_code == 422
    assert resp.json()["error"].startswith("cut.svs: ")
    assert str(env["root"]) not in resp.text and str(env["root"].resolve()) not in resp.text


@pytest.mark.parametrize("query", [
    {"mpp_override": 0.00001, "tissue_mpp": 0.00001},
    {"mpp_override": 0.01, "tissue_mpp": 0.01},
    {"tissue_mpp": 5e-324},
])
def test_absurd_resolutions_are_refused_at_once(url: str, query: dict[str, float]) -> None:
    t0 = time.monotonic()
    resp = httpx.get(f"{url}/v1/slides/{ids(url)['demo.svs']}/tissue", params=query)
    assert resp.status_code == 422 and "error" in resp.json()
    assert time.monotonic() - t0 < 2


def test_absurd_plan_parameters_are_refused(url: str) -> None:
    sid = ids(url)["demo.svs"]
    bodies = [({"target_mpp": 0.05, "patch_size_px": 8}, {422}),  # 5x finer than the scan
              ({"min_tissue_fraction": 0, "patch_size_px": 8}, {200}),  # 96k: big, allowed
              # a valid request on an absurdly fine claimed scan: an answer, empty, saying why
              ({"mpp_override": 0.05, "tissue_mpp": 0.25, "patch_size_px": 8}, {200})]
    for body, allowed in bodies:
        t0 = time.monotonic()
        resp = httpx.post(f"{url}/v1/slides/{sid}/plan", json=body)
        assert resp.status_code in allowed, resp.text[:300]
        assert time.monotonic() - t0 < 5


# -- bodies: authentication and size before reading -------------------------------------------

def _raw_chunked_post(url: str, path: str, total: int, headers: str = "") -> tuple[str, int]:
    """POST a chunked body of ``total`` bytes; return (status line, bytes sent)."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    assert host and port
    chunk = b"II*\x00" + b"\x00" * (64 * 1024 - 4)
    sent = 0
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
                     f"Content-Type: application/octet-stream\r\n{headers}\r\n".encode())
        try:
            while sent < total:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                sock.settimeout(0.001)  # a peek: has the server answered yet?
                try:
                    if sock.recv(1, socket.MSG_PEEK):
                        break  # the server answered before the body ended
                except (TimeoutError, BlockingIOError):
                    pass
                finally:
                    sock.settimeout(10)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status = sock.recv(4096).split(b"\r\n", 1)[0].decode()
    return status, sent


def test_chunked_upload_is_refused_unauthenticated_before_its_body(env: dict[str, Path]
                                                                   ) -> None:
    settings = settings_for(env, api_keys=["s3cret"], data_dir=env["data"] / "auth")
    with serve(create_app(settings), ready_path="/readyz") as u:
        status, sent = _raw_chunked_post(u, "/v1/slides", 64 << 20)
    assert " 401 " in status
    assert sent < 8 << 20  # answered long before the 64 MiB were sent
    assert not any((settings.uploads_dir / ".incoming").glob("*"))


def test_chunked_upload_over_the_limit_is_413_as_it_arrives(env: dict[str, Path]) -> None:
    settings = settings_for(env, max_upload_mb=1, data_dir=env["data"] / "limit")
    with serve(create_app(settings), ready_path="/readyz") as u:
        status, sent = _raw_chunked_post(u, "/v1/slides", 64 << 20)
        assert " 413 " in status and sent < 16 << 20
        big = {"slides": ["0" * 24] * 200_000}  # ~6 MiB of JSON
        assert httpx.post(f"{u}/v1/jobs", json=big).status_code == 413

        def chunks() -> Iterator[bytes]:
            yield json.dumps(big).encode()

        assert httpx.post(f"{u}/v1/jobs", content=chunks(),
                          headers={"content-type": "application/json"}).status_code == 413
    assert not any((settings.uploads_dir / ".incoming").glob("*"))


def test_same_bytes_under_three_names_are_stored_once(env: dict[str, Path], cmu_svs: Path
                                                      ) -> None:
    settings = settings_for(env, data_dir=env["data"] / "dedupe")
    data = cmu_svs.read_bytes()
    with serve(create_app(settings), ready_path="/readyz") as u:
        got = [httpx.post(f"{u}/v1/slides", files={"file": (name, data)}).json()
               for name in ("a.svs", "b.tiff", "c.ndpi")]
        raw = httpx.post(f"{u}/v1/slides", content=data,
                         headers={"content-type": "application/octet-stream"}).json()
    assert len({g["id"] for g in got} | {raw["id"]}) == 1
    assert got[0]["format"] == "svs"  # from the content, whatever the name says
    assert {g["name"] for g in got} | {raw["name"]} == {"a.svs"}  # the first name kept
    stored = [p for p in settings.uploads_dir.iterdir() if p.is_file()]
    slides = [p for p in stored if not p.name.startswith(".")]  # beside it: its .name
    assert len(slides) == 1 and oct(slides[0].stat().st_mode & 0o777) != oct(0o600)
    assert slides[0].suffix == ".svs" and len(stored) == 2


# -- jobs ----------------------------------------------------------------------------------------

def test_a_job_never_stays_running_after_an_unexpected_error(env: dict[str, Path]) -> None:
    settings = settings_for(env, data_dir=env["data"] / "jobs")
    with serve(create_app(settings, worker_factory=lambda: FailingWorker(1, ValueError)),
               ready_path="/readyz") as u:
        sid = ids(u)["demo.svs"]
        job = httpx.post(f"{u}/v1/jobs", json={"slides": [sid, sid]}).json()["id"]
        deadline = time.monotonic() + 60
        while (status := httpx.get(f"{u}/v1/jobs/{job}").json())["state"] in ("queued",
                                                                             "running"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert status["state"] == "failed" and status["slides_done"] == 2
    assert [e["error"] for e in status["errors"]] == ["ValueError", "ValueError"]


def test_a_job_on_a_slide_without_tissue_succeeds_and_says_why(
        blank_slide: Path, tmp_path: Path) -> None:
    settings = folder_settings(tmp_path, {"blank.svs": blank_slide})
    with serve(create_app(settings), ready_path="/readyz") as url:
        sid = slide_ids(url)["blank.svs"]
        job = httpx.post(f"{url}/v1/jobs", json={"slides": [sid]}).json()["id"]
        status = wait_for_job(url, job)
        assert status["state"] == "succeeded", status
        assert status["errors"] == [] and "no grid cell" in status["notes"][0]["message"]
        names = {r["name"] for r in status["results"]}
        assert f"{sid}.heatmap.png" in names
        summary = httpx.get(f"{url}/v1/jobs/{job}/results/{sid}.summary.json").json()
        assert summary["patches"] == 0 and "no grid cell" in summary["message"]
        csv_text = httpx.get(f"{url}/v1/jobs/{job}/results/{sid}.predictions.csv").text
        assert csv_text.splitlines() == [csv_text.splitlines()[0]]  # the header alone


def test_messages_lose_whole_server_paths_only() -> None:
    from api.errors import MessageScrubber

    scrub = MessageScrubber([Path("data"), Path("/srv/slides")], ["s3://bucket/scans"])
    assert scrub("x: no microns-per-pixel (MPP) metadata, so data cannot") == \
        "x: no microns-per-pixel (MPP) metadata, so data cannot"
    assert scrub("data/uploads/ab.svs: damaged") == "uploads/ab.svs: damaged"
    assert scrub("/srv/slides/a/b.svs: damaged; /srv/slides is slow") == \
        "a/b.svs: damaged; <slide root> is slow"
    assert scrub("/srv/slides2/x.svs") == "/srv/slides2/x.svs"  # another folder
    assert scrub("s3://bucket/scans/x.svs answered") == "x.svs answered"
    assert "abcdef123456" not in scrub("sent Authorization: Bearer abcdef123456")


def test_a_missing_mpp_message_reads_right_with_the_default_data_folder(
        kidney_tif: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # data_dir "data", relative, as make run has it
    (tmp_path / "slides").mkdir()
    shutil.copy(kidney_tif, tmp_path / "slides" / "kidney.tif")
    settings = Settings(slide_roots=[Path("slides")], data_dir=Path("data"),  # type: ignore[call-arg]
                        demo_slide=False, device="cpu")
    with serve(create_app(settings), ready_path="/readyz") as url:
        sid = slide_ids(url)["kidney.tif"]
        answer = httpx.post(f"{url}/v1/slides/{sid}/plan", json={})
    assert answer.status_code == 422
    assert "(MPP) metadata, so physical sizes" in answer.json()["error"]
    assert "<slide root>" not in answer.json()["error"]


def test_jobs_belong_to_their_key_and_are_bounded(demo_slide: Path, tmp_path: Path) -> None:
    settings = folder_settings(tmp_path, {"demo.svs": demo_slide},
                               api_keys=["key-a", "key-b", "key-c"], max_jobs_per_key=2,
                               max_queued_jobs=3)
    a, b, c = ({"Authorization": f"Bearer key-{k}"} for k in "abc")
    with serve(create_app(settings), ready_path="/readyz") as url:
        sid = slide_ids(url, "key-a")["demo.svs"]
        long_job = {"slides": [sid] * 40, "sampling": {"strategy": "random", "n_patches": 64}}
        made = [httpx.post(f"{url}/v1/jobs", json=long_job, headers=a) for _ in range(4)]
        assert [r.status_code for r in made] == [202, 202, 429, 429]
        assert made[2].headers["retry-after"] and "max_jobs_per_key" in made[2].json()["error"]
        mine = [r.json()["id"] for r in made[:2]]
        # key b sees none of a's jobs and can touch none of them
        assert httpx.get(f"{url}/v1/jobs", headers=b).json() == {"items": [], "total": 0}
        for job in mine:
            assert httpx.get(f"{url}/v1/jobs/{job}", headers=b).status_code == 404
            assert httpx.delete(f"{url}/v1/jobs/{job}", headers=b).status_code == 404
            assert httpx.get(f"{url}/v1/jobs/{job}/results/{sid}.summary.json",
                             headers=b).status_code == 404
        listed = httpx.get(f"{url}/v1/jobs", headers=a).json()
        assert listed["total"] == 2 and {j["id"] for j in listed["items"]} == set(mine)
        # b has a quota of its own; then the queue (a's second job, b's two) is full for c
        for _ in range(2):
            assert httpx.post(f"{url}/v1/jobs", json=long_job, headers=b).status_code == 202
        full = httpx.post(f"{url}/v1/jobs", json=long_job, headers=c)
        assert full.status_code == 429 and "queue is full" in full.json()["error"]
        for job in mine:  # cancel, then once finished, DELETE removes the job and its files
            assert httpx.delete(f"{url}/v1/jobs/{job}", headers=a).json()["state"] == "cancelled"
        for job in mine:
            wait_for_job(url, job, a)
            deadline = time.monotonic() + 60
            while httpx.delete(f"{url}/v1/jobs/{job}", headers=a).status_code == 200 and \
                    httpx.get(f"{url}/v1/jobs/{job}", headers=a).status_code == 200:
                assert time.monotonic() < deadline  # its thread is still winding down
                time.sleep(0.1)
            assert httpx.get(f"{url}/v1/jobs/{job}", headers=a).status_code == 404
            assert not (tmp_path / "data" / "jobs" / job).exists()


def test_finished_jobs_are_removed_after_the_retention(demo_slide: Path, tmp_path: Path
                                                        ) -> None:
    settings = folder_settings(tmp_path, {"demo.svs": demo_slide}, job_retention_hours=1 / 3600)
    small = {"sampling": {"strategy": "random", "n_patches": 4}}
    with serve(create_app(settings), ready_path="/readyz") as url:
        sid = slide_ids(url)["demo.svs"]
        first = httpx.post(f"{url}/v1/jobs", json={"slides": [sid]} | small).json()["id"]
        assert wait_for_job(url, first, {})["slides_complete"] == [sid]
        assert (tmp_path / "data" / "jobs" / first).is_dir()
        time.sleep(1.5)  # past the retention of one second
        httpx.post(f"{url}/v1/jobs", json={"slides": [sid]} | small)  # cleanup runs here
        assert httpx.get(f"{url}/v1/jobs/{first}").status_code == 404
        assert not (tmp_path / "data" / "jobs" / first).exists()


def test_a_dicomweb_root_that_redirects_or_is_no_pacs_is_unavailable(tmp_path: Path) -> None:
    # A "PACS" that sends its series search elsewhere, and a JSON server that is no PACS:
    # neither is followed or listed; both roots are reported unavailable.
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, RedirectResponse
    from starlette.routing import Route

    from wsi_sampler.errors import SlideStoreError
    from wsi_sampler.sources.dicomweb import list_series

    async def elsewhere(request):  # type: ignore[no-untyped-def]
        return RedirectResponse("http://127.0.0.1:9/series?token=canary-3e1f", status_code=302)

    async def not_qido(request):  # type: ignore[no-untyped-def]
        return JSONResponse([{"status": "ok"}])

    fake = Starlette(routes=[Route("/moved/series", elsewhere), Route("/json/series", not_qido)])
    with serve(fake) as base:
        roots = [f"dicomweb+{base}/moved", f"dicomweb+{base}/json"]
        for root, needle in zip(roots, ("redirect", "not a QIDO-RS answer"), strict=True):
            with pytest.raises(SlideStoreError, match=needle) as exc:
                list_series(root)
            assert "canary" not in str(exc.value)
        (tmp_path / "slides").mkdir()
        settings = Settings(slide_roots=[tmp_path / "slides"], remote_slide_roots=roots,
                            data_dir=tmp_path / "data", demo_slide=False,
                            device="cpu")  # type: ignore[call-arg]
        with serve(create_app(settings), ready_path="/readyz") as url:
            listing = httpx.get(f"{url}/v1/slides").json()
    assert listing["items"] == [] and len(listing["unavailable_roots"]) == 2
    assert "canary" not in json.dumps(listing)


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs as the service's data folder (root only: skipped, saying so, else)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_is_a_507_and_leaves_nothing_behind(
        demo_slide: Path, tmp_path: Path, small_disk: Path) -> None:
    root = tmp_path / "slides"
    root.mkdir()
    shutil.copy(demo_slide, root / "demo.svs")
    data = demo_slide.read_bytes()
    assert len(data) > 2 << 20  # the slide does not fit on the small disk
    settings = Settings(slide_roots=[root], data_dir=small_disk,  # type: ignore[call-arg]
                        demo_slide=False, device="cpu", min_free_disk_mb=0)
    with serve(create_app(settings), ready_path="/readyz") as url:
        declared = httpx.post(f"{url}/v1/slides", content=data,
                              headers={"content-type": "application/octet-stream"})
        assert declared.status_code == 507 and "not enough free disk" in declared.text

        def chunks() -> Iterator[bytes]:  # no Content-Length: found out while writing
            for at in range(0, len(data), 1 << 20):
                yield data[at: at + (1 << 20)]

        streamed = httpx.post(f"{url}/v1/slides", content=chunks(), timeout=60,
                              headers={"content-type": "application/octet-stream"})
        assert streamed.status_code == 507 and "disk filled up" in streamed.text
        assert list((small_disk / "uploads" / ".incoming").glob("*")) == []
        # a job whose results do not fit: the slide fails saying so, no partial files stay
        ballast = small_disk / "ballast"
        free = shutil.disk_usage(small_disk).free
        ballast.write_bytes(bytes(max(0, free - 48 * 1024)))
        sid = slide_ids(url)["demo.svs"]
        job = httpx.post(f"{url}/v1/jobs", json={"slides": [sid], "sampling": {
            "strategy": "grid", "patch_size_px": 224}}).json()["id"]
        status = wait_for_job(url, job, {})
        assert status["state"] == "failed", status
        error = status["errors"][0]  # type: ignore[index]
        assert error["error"] == "StorageFullError" and "disk filled up" in error["message"]
        assert list((small_disk / "jobs" / job).iterdir()) == []
        ballast.unlink()
        with_limit = Settings(slide_roots=[root], data_dir=small_disk,  # type: ignore[call-arg]
                              demo_slide=False, device="cpu", min_free_disk_mb=64)
    with serve(create_app(with_limit), ready_path="/readyz") as url:
        refused = httpx.post(f"{url}/v1/jobs", json={"slides": [sid]})
        assert refused.status_code == 507 and "MiB needed" in refused.json()["error"]
