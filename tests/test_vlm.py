"""The vision-language flow against a local OpenAI-compatible server (tests/_openai_server.py:
it validates every request with the ``openai`` package's own types and decodes every
image; no model runs here). Library, CLI, API and batch."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from _cli import run_cli
from _openai_server import OpenAIStub, create_openai_stub, validate_plain_request
from _servers import serve, wait_for_job

from api.app import create_app
from api.config import Settings
from wsi_sampler import Extractor, InvalidRequestError, medgemma_params, open_slide
from wsi_sampler.errors import WorkerError, WorkerUnavailableError
from wsi_sampler.report import prepare_bag, report_events
from wsi_sampler.worker.vlm import VlmConfig, VlmWorker, encode_data_uri

CLI = Path(sys.executable).with_name("wsi-sampler")
BAG = medgemma_params(seed=1, magnification=20)  # a few 896 px cells of the demo slide


@pytest.fixture(scope="module")
def stub() -> Iterator[tuple[OpenAIStub, str]]:
    state = OpenAIStub()
    with serve(create_openai_stub(state)) as url:
        yield state, f"{url}/v1"


@pytest.fixture(scope="module")
def n_bag(demo_slide: Path) -> int:
    """How many patches the library puts in the bag (what every surface must send)."""
    from wsi_sampler import make_plan

    with open_slide(demo_slide) as slide:
        n = len(make_plan(slide, BAG))
    assert n >= 3
    return n


def worker(url: str, model: str = "echo", **kw: object) -> VlmWorker:
    return VlmWorker(VlmConfig(url=url, model=model, retries=0, **kw))  # type: ignore[arg-type]


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def run_report(slide_path: Path, vlm: VlmWorker, prompt: str = "Describe the tissue."
               ) -> list[dict[str, object]]:
    with open_slide(slide_path) as slide:
        plan = prepare_bag(slide, BAG, vlm, prompt)
        return list(report_events(slide, plan, vlm, prompt))


def test_the_bag_reaches_the_model_as_the_notebook_sends_it(
        stub: tuple[OpenAIStub, str], demo_slide: Path) -> None:
    state, url = stub
    events = run_report(demo_slide, worker(url))
    bag, deltas, report = events[0], events[1:-1], events[-1]
    assert bag["type"] == "bag" and report["type"] == "report"
    assert "".join(str(d["text"]) for d in deltas) == report["text"]
    assert report["usage"]["prompt_tokens"] > 0  # type: ignore[index]
    got = state.received[-1]
    assert got.body["stream"] is True and got.body["temperature"] == 0
    assert [m["role"] for m in got.body["messages"]] == ["user"]
    parts = got.body["messages"][0]["content"]
    assert parts[0] == {"type": "text", "text": "Describe the tissue."}  # prompt first
    assert all(p["type"] == "image_url" for p in parts[1:])
    assert got.media_types == ["image/jpeg"] * bag["n_patches"]  # type: ignore[operator]
    with open_slide(demo_slide) as slide:
        plan = prepare_bag(slide, BAG, worker(url), "x")
        want = np.concatenate([b.images for b in Extractor(slide, plan).iter_batches()])
    assert len(got.images) == len(plan)
    for sent, patch in zip(got.images, want, strict=True):  # in bag order, 896 x 896
        assert sent.shape == (896, 896, 3)
        assert np.abs(sent.astype(int) - patch).mean() < 3  # JPEG q95


def test_png_images_and_a_system_prompt(stub: tuple[OpenAIStub, str], demo_slide: Path,
                                        n_bag: int) -> None:
    state, url = stub
    vlm = worker(url, image_format="png", system_prompt="You are a pathologist.")
    with open_slide(demo_slide) as slide:
        plan = prepare_bag(slide, BAG, vlm, "Describe.")
        uris = [encode_data_uri(im, "png")
                for b in Extractor(slide, plan).iter_batches() for im in b.images]
        report = vlm.complete(vlm.messages(uris, "Describe."))
        first = next(iter(Extractor(slide, plan).iter_batches())).images[0]
    got = state.received[-1]
    assert [m["role"] for m in got.body["messages"]] == ["system", "user"]
    assert got.media_types[0] == "image/png" and np.array_equal(got.images[0], first)
    assert report.text.startswith(f"Received {n_bag} images") and "stream" not in got.body


def test_limits_are_checked_before_anything_is_sent(stub: tuple[OpenAIStub, str],
                                                    demo_slide: Path) -> None:
    state, url = stub
    before = len(state.received)
    with open_slide(demo_slide) as slide:
        with pytest.raises(InvalidRequestError, match="at most 2 per prompt"):
            prepare_bag(slide, BAG, worker(url, max_images=2), "x")
        with pytest.raises(InvalidRequestError, match="context of 2,048"):
            prepare_bag(slide, BAG, worker(url, context_tokens=2048), "x")
    with pytest.raises(InvalidRequestError, match="MiB"):
        worker(url, max_request_mb=0.001).messages(["data:image/jpeg;base64," + "A" * 4096], "x")
    assert len(state.received) == before


@pytest.mark.parametrize(("model", "error", "needle"), [
    ("context-too-long", InvalidRequestError, "does not fit its context"),
    ("fail-500", WorkerError, "HTTP 500"),
    ("empty", WorkerError, "no text"),
])
def test_endpoint_failures_are_clear_errors(stub: tuple[OpenAIStub, str], demo_slide: Path,
                                            model: str, error: type[Exception], needle: str
                                            ) -> None:
    with pytest.raises(error, match=needle):
        run_report(demo_slide, worker(stub[1], model))


def test_endpoint_down_or_slow_is_unavailable(stub: tuple[OpenAIStub, str], demo_slide: Path
                                              ) -> None:
    with pytest.raises(WorkerUnavailableError, match="cannot be reached"):
        run_report(demo_slide, worker(closed_port_url()))
    t0 = time.monotonic()
    with pytest.raises(WorkerUnavailableError, match="did not answer within 2 s"):
        run_report(demo_slide, worker(stub[1], "slow", timeout_s=2))
    assert time.monotonic() - t0 < 20


def test_messages_export_parses_with_the_openai_types(demo_slide: Path, tmp_path: Path,
                                                      n_bag: int) -> None:
    done = subprocess.run(
        [str(CLI), "plan", str(demo_slide), "--strategy", "medgemma", "--magnification", "20",
         "--seed", "1", "--out", str(tmp_path / "bag.json"), "--messages",
         str(tmp_path / "messages.json")], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    body = json.loads((tmp_path / "messages.json").read_text())
    params = validate_plain_request(body)  # the openai package's own request types
    parts = params["messages"][0]["content"]
    assert parts[0]["type"] == "text" and len(parts) - 1 == n_bag
    assert body["model"] == "google/medgemma-1.5-4b-it" and body["temperature"] == 0
    bag = json.loads((tmp_path / "bag.json").read_text())
    assert bag["n_patches"] == n_bag and bag["selection"]["rule"]


def test_describe_prints_the_report_and_fails_in_one_line(
        stub: tuple[OpenAIStub, str], demo_slide: Path, tmp_path: Path, n_bag: int) -> None:
    args = ["describe", str(demo_slide), "--prompt", "Describe.", "--magnification", "20",
            "--vlm-model", "echo"]
    done = run_cli(*args, "--vlm-url", stub[1], "--out", tmp_path / "r.json")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"Received {n_bag} images (896x896)")
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["type"] == "report" and written["slide"] == demo_slide.name
    assert written["fingerprint"].startswith("sha256:") and written["bag"]["n_patches"] == n_bag
    down = run_cli(*args, "--vlm-url", closed_port_url())
    lines = down.stderr.strip().splitlines()
    assert down.returncode == 2 and lines[-1].startswith("error: ") and "Traceback" not in \
        down.stderr, down.stderr


CANARY = "sk-canary-5f2d9c1e7b"


def test_credentials_in_the_vlm_url_are_refused_without_being_repeated() -> None:
    for url in (f"http://user:{CANARY}@127.0.0.1:9/v1", f"http://127.0.0.1:9/v1?api-key={CANARY}"):
        with pytest.raises(InvalidRequestError, match="must not carry credentials") as exc:
            VlmConfig(url=url)
        assert CANARY not in str(exc.value)
        with pytest.raises(ValueError, match="must not carry credentials") as bad:
            Settings(vlm_url=url)  # type: ignore[call-arg]
        assert CANARY not in str(bad.value.errors()[0]["msg"])


def test_an_upstream_that_echoes_our_key_never_passes_it_on(
        stub: tuple[OpenAIStub, str], root: Path, monkeypatch: pytest.MonkeyPatch,
        demo_slide: Path, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("WSI_VLM_API_KEY", CANARY)
    vlm = worker(stub[1], "echo-secret")
    with caplog.at_level("INFO"), pytest.raises(WorkerError, match="HTTP 500") as exc:
        run_report(demo_slide, vlm)
    vlm.close()
    assert CANARY not in str(exc.value) and stub[1] not in str(exc.value)
    assert CANARY not in caplog.text
    with serve(create_app(settings(root, vlm_url=stub[1], vlm_model="echo-secret",
                                   data_dir=root.parent / "canary")), ready_path="/readyz") as u:
        sid = {i["name"]: i["id"] for i in httpx.get(f"{u}/v1/slides").json()["items"]}[
            "demo.svs"]
        answer = httpx.post(f"{u}/v1/slides/{sid}/reports", json=REPORT, timeout=120)
        assert answer.status_code == 502 and CANARY not in answer.text
        assert "127.0.0.1" not in answer.json()["error"]  # nor our upstream's address
        job = httpx.post(f"{u}/v1/jobs", json={"slides": [sid], "report": REPORT}).json()
        status = wait_for_job(u, job["id"])
        assert status["errors"] and CANARY not in json.dumps(status)
    done = subprocess.run([str(CLI), "describe", str(demo_slide), "--prompt", "Describe.",
                           "--magnification", "20", "--vlm-model", "echo-secret",
                           "--vlm-url", stub[1]], capture_output=True, text=True,
                          check=False, timeout=120, env=os.environ | {"WSI_VLM_API_KEY": CANARY})
    assert done.returncode != 0 and CANARY not in done.stderr + done.stdout


def test_garbage_from_the_vlm_is_a_502_and_one_line(
        stub: tuple[OpenAIStub, str], root: Path, demo_slide: Path) -> None:
    vlm = worker(stub[1], "garbage")
    with pytest.raises(WorkerError, match="not an OpenAI chat completion"):
        run_report(demo_slide, vlm)
    vlm.close()
    with serve(create_app(settings(root, vlm_url=stub[1], vlm_model="garbage")),
               ready_path="/readyz") as u:
        sid = {i["name"]: i["id"] for i in httpx.get(f"{u}/v1/slides").json()["items"]}[
            "demo.svs"]
        answer = httpx.post(f"{u}/v1/slides/{sid}/reports", json=REPORT, timeout=120)
        assert answer.status_code == 502 and "not an OpenAI" in answer.json()["error"]
    done = run_cli("describe", demo_slide, "--prompt", "Describe.", "--magnification", "20",
                   "--vlm-model", "garbage", "--vlm-url", stub[1])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert lines[-1].startswith("error: ") and "not an OpenAI" in lines[-1]


def test_the_timeout_bounds_the_whole_call_retries_included(
        stub: tuple[OpenAIStub, str], demo_slide: Path) -> None:
    vlm = VlmWorker(VlmConfig(url=stub[1], model="hang", retries=2, timeout_s=2))
    t0 = time.monotonic()
    with pytest.raises(WorkerUnavailableError, match="did not answer within 2 s"):
        run_report(demo_slide, vlm)
    assert time.monotonic() - t0 < 5  # not 3 x 2 s
    vlm.close()
    deadline = time.monotonic() + 10
    while stub[0].hanging:  # the upstream request was cut, not left hanging
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_an_answer_past_max_tokens_is_cut(stub: tuple[OpenAIStub, str], demo_slide: Path
                                          ) -> None:
    vlm = worker(stub[1], "flood", max_tokens=16)
    events = run_report(demo_slide, vlm)
    vlm.close()
    report = events[-1]
    assert report["type"] == "report" and report["finish_reason"] == "length"
    assert len(str(report["text"])) == 16 * 32
    assert sum(len(str(e["text"])) for e in events if e["type"] == "delta") == 16 * 32


# -- the API ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, demo_slide: Path, blank_slide: Path
         ) -> Path:
    path = tmp_path_factory.mktemp("vlm-api") / "slides"
    path.mkdir()
    shutil.copy(demo_slide, path / "demo.svs")
    shutil.copy(blank_slide, path / "blank.svs")
    return path


def settings(root: Path, **kw: object) -> Settings:
    values: dict[str, object] = {"slide_roots": [root], "data_dir": root.parent / "data",
                                 "demo_slide": False, "device": "cpu"}
    return Settings(**(values | kw))  # type: ignore[arg-type]


REPORT = {"prompt": "Describe.", "magnification": 20, "seed": 1}


def test_reports_stream_bag_deltas_and_report(stub: tuple[OpenAIStub, str], root: Path,
                                              n_bag: int) -> None:
    with serve(create_app(settings(root, vlm_url=stub[1], vlm_model="echo")),
               ready_path="/readyz") as u:
        ids = {i["name"]: i["id"] for i in httpx.get(f"{u}/v1/slides").json()["items"]}
        with httpx.stream("POST", f"{u}/v1/slides/{ids['demo.svs']}/reports", json=REPORT,
                          timeout=120) as resp:
            assert resp.status_code == 200 and resp.headers["x-patch-count"] == str(n_bag)
            events = [json.loads(line) for line in resp.iter_lines()]
        assert [e["type"] for e in events][0] == "bag" and events[-1]["type"] == "report"
        assert events[0]["n_patches"] == n_bag == len(events[0]["patches"])
        assert events[-1]["text"].startswith(f"Received {n_bag} images")
        blank = httpx.post(f"{u}/v1/slides/{ids['blank.svs']}/reports", json=REPORT)
        assert blank.status_code == 422 and "no tissue" in blank.json()["error"]


@pytest.mark.parametrize(("model", "status"), [("fail-500", 502), ("context-too-long", 422)])
def test_report_failures_before_the_first_byte_are_statuses(
        stub: tuple[OpenAIStub, str], root: Path, model: str, status: int) -> None:
    with serve(create_app(settings(root, vlm_url=stub[1], vlm_model=model)),
               ready_path="/readyz") as u:
        sid = httpx.get(f"{u}/v1/slides").json()["items"][1]["id"]
        resp = httpx.post(f"{u}/v1/slides/{sid}/reports", json=REPORT, timeout=120)
        assert resp.status_code == status and "error" in resp.json()


def test_clients_that_leave_a_hanging_model_free_their_stream_slots(
        stub: tuple[OpenAIStub, str], root: Path) -> None:
    with serve(create_app(settings(root, vlm_url=stub[1], vlm_model="hang",
                                   max_concurrent_streams=2)), ready_path="/readyz") as u:
        sid = {i["name"]: i["id"] for i in httpx.get(f"{u}/v1/slides").json()["items"]}[
            "demo.svs"]
        for _ in range(4):  # each client gives up after a second
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{u}/v1/slides/{sid}/reports", json=REPORT, timeout=1.0)
        deadline = time.monotonic() + 10
        while True:  # the slots come back within moments, not after vlm_timeout_s (600 s)
            patches = httpx.post(f"{u}/v1/slides/{sid}/patches",
                                 json={"strategy": "random", "n_patches": 2}, timeout=30)
            if patches.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert patches.status_code == 200
        while stub[0].hanging:  # and the upstream calls were cut
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_a_waiting_client_hears_from_a_slow_model_until_the_deadline(
        stub: tuple[OpenAIStub, str], root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import api.report_stream

    monkeypatch.setattr(api.report_stream, "FIRST_WORDS_GRACE_S", 0.5)
    monkeypatch.setattr(api.report_stream, "KEEPALIVE_S", 0.5)
    with serve(create_app(settings(root, vlm_url=stub[1], vlm_model="hang",
                                   vlm_timeout_s=3.0)), ready_path="/readyz") as u:
        sid = {i["name"]: i["id"] for i in httpx.get(f"{u}/v1/slides").json()["items"]}[
            "demo.svs"]
        lines: list[dict[str, object]] = []
        t0 = time.monotonic()
        with httpx.stream("POST", f"{u}/v1/slides/{sid}/reports", json=REPORT,
                          timeout=30) as resp, pytest.raises(httpx.RemoteProtocolError):
            assert resp.status_code == 200
            for line in resp.iter_lines():
                lines.append(json.loads(line))
    elapsed = time.monotonic() - t0
    kinds = [e["type"] for e in lines]
    assert kinds[0] == "bag" and "waiting" in kinds and kinds[-1] == "error", kinds
    assert "did not answer within 3 s" in str(lines[-1]["error"]) and elapsed < 6


def test_reports_without_a_configured_model_are_503(root: Path) -> None:
    with serve(create_app(settings(root)), ready_path="/readyz") as u:
        sid = httpx.get(f"{u}/v1/slides").json()["items"][0]["id"]
        resp = httpx.post(f"{u}/v1/slides/{sid}/reports", json=REPORT)
        assert resp.status_code == 503 and "vlm_url" in resp.json()["error"]


def test_batch_writes_a_report_per_slide(stub: tuple[OpenAIStub, str], root: Path,
                                         tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["score", str(root), "--out", str(out), "--vlm-url", stub[1],
            "--vlm-model", "echo", "--prompt", "Describe.", "-q"]
    done = run_cli(*args)  # in this process: torch is imported already
    assert done.returncode == 3, done.stderr  # the blank slide has no tissue: one failure
    reports = list(out.glob("slides/*/report.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    assert report["text"].startswith("Received") and report["bag"]["n_patches"] > 0
    assert report["prompt"] == "Describe." and report["model"] == "echo"
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert "no tissue" in failures[0]["message"]
    again = run_cli(*args)
    assert again.returncode == 3 and reports[0].read_text() == json.dumps(report, indent=2)


def test_jobs_produce_reports(stub: tuple[OpenAIStub, str], root: Path, n_bag: int) -> None:
    with serve(create_app(settings(root, vlm_url=stub[1], vlm_model="echo",
                                   data_dir=root.parent / "jobs")), ready_path="/readyz") as u:
        ids = {i["name"]: i["id"] for i in httpx.get(f"{u}/v1/slides").json()["items"]}
        sid = ids["demo.svs"]
        job = httpx.post(f"{u}/v1/jobs", json={"slides": [sid], "report": REPORT}).json()
        deadline = time.monotonic() + 120
        while (status := httpx.get(f"{u}/v1/jobs/{job['id']}").json())["state"] in (
                "queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert status["state"] == "succeeded" and status["patches_done"] == n_bag
        assert [r["name"] for r in status["results"]] == [f"{sid}.report.json"]
        report = httpx.get(f"{u}{status['results'][0]['url']}").json()
        assert report["text"].startswith(f"Received {n_bag} images")
    with serve(create_app(settings(root, data_dir=root.parent / "jobs2")),
               ready_path="/readyz") as u:
        sid = httpx.get(f"{u}/v1/slides").json()["items"][0]["id"]
        resp = httpx.post(f"{u}/v1/jobs", json={"slides": [sid], "report": REPORT})
        assert resp.status_code == 503 and "vlm_url" in resp.json()["error"]


def _corners(patches: list[dict[str, object]]) -> list[tuple[object, object]]:
    return [(p["x0"], p["y0"]) for p in patches]


def test_reports_and_the_tissue_layer_follow_the_services_tissue_settings(
        stub: tuple[OpenAIStub, str], root: Path, n_bag: int) -> None:
    """With only dark areas excluded (pen kept), the demo slide's bag has more cells than the
    library default's: the report, its job and the service's own medgemma plan (what the
    viewer draws) are one bag, and /tissue (the viewer's tissue layer) is the mask plans
    use; before, reports and /tissue ignored the service's tissue settings."""
    import cv2

    from wsi_sampler import compute_tissue_mask
    from wsi_sampler.tissue import TissueParams

    with open_slide(root / "demo.svs") as slide:
        dark_only = compute_tissue_mask(slide, params=TissueParams(exclude_artifacts=("dark",)))
        default = compute_tissue_mask(slide)
    assert not np.array_equal(dark_only.mask, default.mask)
    with serve(create_app(settings(root, vlm_url=stub[1], vlm_model="echo",
                                   exclude_artifacts=["dark"], data_dir=root.parent / "dark")),
               ready_path="/readyz") as u:
        sid = {i["name"]: i["id"] for i in httpx.get(f"{u}/v1/slides").json()["items"]}[
            "demo.svs"]
        plan = httpx.post(f"{u}/v1/slides/{sid}/plan", json={
            "strategy": "medgemma", "magnification": 20, "seed": 1}).json()
        assert plan["n_patches"] != n_bag  # the settings change the bag here
        png = httpx.get(f"{u}/v1/slides/{sid}/tissue?format=png").content
        layer = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE) > 127
        np.testing.assert_array_equal(layer, dark_only.mask)
        answer = httpx.post(f"{u}/v1/slides/{sid}/reports", json=REPORT, timeout=120)
        bag = json.loads(answer.text.splitlines()[0])
        assert bag["type"] == "bag" and _corners(bag["patches"]) == _corners(plan["patches"])
        assert len(stub[0].received[-1].images) == plan["n_patches"]
        job = httpx.post(f"{u}/v1/jobs", json={"slides": [sid], "report": REPORT}).json()
        status = wait_for_job(u, job["id"])
        report = httpx.get(f"{u}{status['results'][0]['url']}").json()
        assert _corners(report["bag"]["patches"]) == _corners(plan["patches"])
        # a report's own tissue_method, as a plan's
        fluo = httpx.post(f"{u}/v1/slides/{sid}/plan", json={
            "strategy": "medgemma", "magnification": 20, "seed": 1,
            "tissue_method": "fluorescence"}).json()
        assert _corners(fluo["patches"]) != _corners(plan["patches"])
        answer = httpx.post(f"{u}/v1/slides/{sid}/reports", timeout=120,
                            json=REPORT | {"tissue_method": "fluorescence"})
        assert _corners(json.loads(answer.text.splitlines()[0])["patches"]) == _corners(
            fluo["patches"])


def test_describe_and_batch_reports_use_the_tissue_options(
        stub: tuple[OpenAIStub, str], root: Path, tmp_path: Path, n_bag: int) -> None:
    """--exclude-artifacts dark (pen kept) changes the bag of describe and score --vlm-url
    as it changes plan's; score used to drop the tissue options with --vlm-url."""
    from dataclasses import replace

    from wsi_sampler import make_plan
    from wsi_sampler.tissue import TissueParams

    dark_only = TissueParams(exclude_artifacts=("dark",))
    with open_slide(root / "demo.svs") as slide:
        wanted = make_plan(slide, replace(BAG, tissue=dark_only))
        drawn = medgemma_params(seed=4)  # its magnification draw gives 20x
        batch_wanted = make_plan(slide, replace(drawn, tissue=dark_only))
        assert len(batch_wanted) != len(make_plan(slide, drawn))
    assert len(wanted) != n_bag
    done = run_cli("describe", str(root / "demo.svs"), "--prompt", "Describe.",
                   "--magnification", "20", "--seed", "1", "--vlm-model", "echo",
                   "--vlm-url", stub[1], "--exclude-artifacts", "dark",
                   "--out", tmp_path / "r.json")
    assert done.returncode == 0, done.stderr
    bag = json.loads((tmp_path / "r.json").read_text())["bag"]
    assert _corners(bag["patches"]) == list(zip(wanted.x0.tolist(), wanted.y0.tolist(),
                                                       strict=True))
    out = tmp_path / "out"
    done = run_cli("score", str(root), "--out", str(out), "--vlm-url", stub[1], "--vlm-model",
                   "echo", "--prompt", "Describe.", "--exclude-artifacts", "dark", "--seed", "4",
                   "-q")
    assert done.returncode == 3, done.stderr  # the blank slide: no tissue
    (report,) = [json.loads(p.read_text()) for p in out.glob("slides/*/report.json")]
    assert report["bag"]["n_patches"] == len(batch_wanted)
