"""The viewer in a real browser: headless Chromium (Debian ``chromium`` +
``chromium-driver``, installed by ``make system-deps``) driven by Selenium against a real
server on 127.0.0.1. Screenshots are saved under ``$WSI_ARTIFACTS`` (default: pytest's tmp
folder) for a person to look at."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from _servers import folder_settings, serve, slide_ids
from PIL import Image

from api.app import create_app
from api.routes.viewer import assets_dir

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="chromium + chromium-driver not found (installed by make test's system-deps)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (assets_dir() / "openseadragon.min.js").is_file():
        pytest.skip("OpenSeadragon not found in viewer/node_modules "
                    "(installed by make test: make viewer-assets)")
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1200,800", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("WSI_ARTIFACTS") or tmp_path_factory.mktemp("screens"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wait(what: str, ok: Callable[[], object], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def open_page(driver: Any, url: str, slide_id: str) -> None:
    """The viewer on ``slide_id``, once every tile of the first view has loaded."""
    driver.get(f"{url}/viewer?slide={slide_id}")
    wait("the slide's tiles", lambda: driver.execute_script(
        "return document.body.dataset.fullyLoaded === 'true'"))


def screenshot(driver: Any, folder: Path, name: str) -> np.ndarray:
    png = driver.get_screenshot_as_png()
    (folder / f"{name}.png").write_bytes(png)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def view_box(driver: Any) -> tuple[int, int, int, int]:
    rect = driver.execute_script(
        "const r = document.getElementById('osd').getBoundingClientRect();"
        "return [r.left, r.top, r.width, r.height];")
    return tuple(int(v) for v in rect)  # type: ignore[return-value]


def console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_the_viewer_shows_a_slide_its_scale_and_its_overlays(
        browser: Any, artifacts: Path, demo_slide: Path, tmp_path: Path) -> None:
    settings = folder_settings(tmp_path, {"demo.svs": demo_slide}, api_keys=["v1ewer"])
    with serve(create_app(settings), ready_path="/readyz") as url:
        sid = slide_ids(url, api_key="v1ewer")["demo.svs"]
        browser.get(f"{url}/viewer")  # the key goes where a user types it, then the slide
        browser.execute_script("sessionStorage.setItem('wsiApiKey', 'v1ewer')")
        assert any("401" in e for e in console_errors(browser))  # no key yet: refused
        open_page(browser, url, sid)
        assert browser.execute_script("return window.wsiViewer.tilesLoaded") > 0
        left, top, width, height = view_box(browser)
        plain = screenshot(browser, artifacts, "1-slide")[top:top + height, left:left + width]
        # tissue is where the slide's own tissue mask says, background elsewhere
        mask = np.asarray(Image.open(io.BytesIO(httpx.get(
            f"{url}/v1/slides/{sid}/tissue?format=png",
            headers={"Authorization": "Bearer v1ewer"}).content)).convert("L")) > 127
        item = browser.execute_script(
            "const it = window.wsiViewer.viewer.world.getItemAt(0);"
            "const a = it.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));"
            "const b = it.imageToViewerElementCoordinates("
            "  new OpenSeadragon.Point(it.source.width, it.source.height));"
            "return [a.x, a.y, b.x, b.y];")
        x0, y0, x1, y1 = (int(round(v)) for v in item)
        shown = plain[max(y0, 0):y1, max(x0, 0):x1]
        small = np.asarray(Image.fromarray(mask).resize(shown.shape[1::-1])) > 0
        tissue_rgb, glass_rgb = shown[small].mean(0), shown[~small].mean(0)
        assert glass_rgb.min() > 200 and tissue_rgb.mean() < glass_rgb.mean() - 25
        # the scale bar: its length in µm over its width in px is the MPP at this zoom
        scale = browser.execute_script("return window.wsiViewer.scale")
        zoom = (x1 - x0) / 8192  # screen px per level-0 px
        assert scale["um"] / scale["px"] == pytest.approx(0.25 / zoom, rel=0.02)
        label = browser.find_element("id", "scalebar-label").text
        assert label in (f"{scale['um']} µm", f"{scale['um'] / 1000:g} mm")
        # each overlay changes the pixels where it is drawn, and only there
        # no slide models here: neither the answer panel nor an attention layer is offered
        assert not browser.find_element("id", "answer-panel").is_displayed()
        assert not browser.find_element("id", "layer-attention").is_displayed()
        browser.find_element("id", "layer-tissue").click()
        wait("the tissue layer", lambda: browser.execute_script(
            "return !!window.wsiViewer.layers.tissue"))
        time.sleep(1.0)
        tinted = screenshot(browser, artifacts, "2-tissue")[top:top + height, left:left + width]
        changed = np.abs(tinted - plain).sum(2)[max(y0, 0):y1, max(x0, 0):x1] > 30
        assert changed[small].mean() > 0.8 and changed[~small].mean() < 0.05
        browser.find_element("id", "layer-tissue").click()
        _qc_layer_is_drawn_where_qc_found_it(browser, artifacts, url, sid, plain,
                                             (left, top, width, height), (x0, y0, x1, y1))
        browser.find_element("id", "layer-medgemma").click()
        wait("the MedGemma bag", lambda: browser.execute_script(
            "return !!window.wsiViewer.layers.medgemma"))
        n_boxes = browser.execute_script("return document.querySelectorAll('.box').length")
        assert n_boxes == httpx.post(f"{url}/v1/slides/{sid}/plan",
                                     json={"strategy": "medgemma", "seed": 0},
                                     headers={"Authorization": "Bearer v1ewer"}
                                     ).json()["n_patches"] > 0
        time.sleep(0.5)
        bag = screenshot(browser, artifacts, "3-medgemma")[top:top + height, left:left + width]
        assert (np.abs(bag - plain).sum(2) > 60).mean() > 0.001
        browser.find_element("id", "layer-predictions").click()
        wait("the predictions", lambda: browser.execute_script(
            "return !!window.wsiViewer.layers.predictions"), timeout=120)
        assert browser.find_element("id", "legend-title").text.startswith("tissue_fraction")
        # the predictions shown download as CSV: the stream's boxes and values, row by row
        csv_rows = browser.execute_script("return window.wsiViewer.predictionsCsv()").split()
        records = [json.loads(line) for line in httpx.post(
            f"{url}/v1/slides/{sid}/predictions?embedding_format=none",
            json={"strategy": "stratified", "n_patches": 300, "seed": 0},
            headers={"Authorization": "Bearer v1ewer"}, timeout=120).text.splitlines()]
        patches = [r for r in records if r["type"] == "patch"]
        assert csv_rows[0].startswith("minx,miny,width,height,tissue_fraction")
        assert len(csv_rows) == len(patches) + 1 > 10
        first = csv_rows[1].split(",")
        assert [int(v) for v in first[:4]] == [patches[0][k] for k in (
            "x0", "y0", "width0", "height0")]
        assert float(first[4]) == patches[0]["outputs"]["tissue_fraction"]
        assert browser.find_element("id", "download-predictions").is_displayed()
        # every download button's request is answered (the same method, body and key)
        for label, path, *rest in browser.execute_script("return window.wsiViewer.downloads"):
            options = rest[1] if len(rest) > 1 else None
            got = httpx.request((options or {}).get("method", "GET"), f"{url}{path}",
                                content=(options or {}).get("body"), timeout=120,
                                headers={"Authorization": "Bearer v1ewer",
                                         "Content-Type": "application/json"})
            assert got.status_code == 200 and got.content, label
        screenshot(browser, artifacts, "4-predictions")
        assert console_errors(browser) == []


def _qc_layer_is_drawn_where_qc_found_it(
        browser: Any, artifacts: Path, url: str, sid: str, plain: np.ndarray,
        view: tuple[int, int, int, int], item: tuple[int, int, int, int]) -> None:
    """The QC layer changes the pixels where /qc.png?background=none draws (what the
    exclusion removed, ink, dark), and only there; its legend is the QC summary's."""
    left, top, width, height = view
    x0, y0, x1, y1 = item
    headers = {"Authorization": "Bearer v1ewer"}
    layer = np.asarray(Image.open(io.BytesIO(httpx.get(
        f"{url}/v1/slides/{sid}/qc.png?background=none", headers=headers).content)))
    qc = httpx.get(f"{url}/v1/slides/{sid}/qc", headers=headers).json()
    assert layer.shape[2] == 4 and 0.001 < (layer[..., 3] > 0).mean() < 0.5
    browser.find_element("id", "layer-qc").click()
    wait("the QC layer", lambda: browser.execute_script("return !!window.wsiViewer.layers.qc"))
    time.sleep(1.0)
    shot = screenshot(browser, artifacts, "2b-qc")[top:top + height, left:left + width]
    changed = (np.abs(shot - plain).sum(2) > 30)[max(y0, 0):y1, max(x0, 0):x1]
    drawn = cv2.resize((layer[..., 3] > 0).astype(np.uint8), changed.shape[::-1],
                       interpolation=cv2.INTER_NEAREST)
    kernel = np.ones((7, 7), np.uint8)
    inside, outside = cv2.erode(drawn, kernel) > 0, cv2.dilate(drawn, kernel) == 0
    nx, ny, nw, nh = (int(v) for v in browser.execute_script(  # the navigator shows it too
        "const r = window.wsiViewer.viewer.navigator.element.getBoundingClientRect();"
        "return [r.left, r.top, r.width, r.height];"))
    ox, oy = left + max(x0, 0), top + max(y0, 0)  # the slide's corner on the page
    outside[max(ny - oy, 0):max(ny + nh - oy, 0), max(nx - ox, 0):max(nx + nw - ox, 0)] = False
    assert changed[inside].mean() > 0.8 and changed[outside].mean() < 0.02
    legend = [li.get_attribute("data-label") for li in
              browser.find_elements("css selector", "#qc-legend li[data-label]")]
    assert legend == list(qc["overlay_legend"]) == ["removed by exclusion", "ink", "dark"]
    browser.find_element("id", "layer-qc").click()
    assert not browser.find_element("id", "qc-legend").is_displayed()


def test_a_slide_uploaded_from_the_page_is_listed_and_opened(
        browser: Any, artifacts: Path, demo_slide: Path, tmp_path: Path) -> None:
    """The page's file input uploads the raw file with the tab's key (progress shown), lists
    it and opens it; a file that is no slide, or over max_upload_mb, is refused with the
    service's reason."""
    from conftest import shared_slide

    scan = tmp_path / "scan.svs"
    scan.write_bytes(shared_slide("CMU-1-Small-Region.svs").read_bytes())
    (tmp_path / "notes.svs").write_text("not a slide")
    (tmp_path / "big.svs").write_bytes(demo_slide.read_bytes())  # 3 MB: over the limit
    assert scan.stat().st_size < 2.5 * 2**20 < (tmp_path / "big.svs").stat().st_size
    settings = folder_settings(tmp_path, {"demo.svs": demo_slide}, api_keys=["upl0ad"],
                               max_upload_mb=2.5)
    with serve(create_app(settings), ready_path="/readyz") as url:
        browser.get(f"{url}/viewer")
        browser.execute_script("sessionStorage.setItem('wsiApiKey', 'upl0ad')")
        browser.get(f"{url}/viewer")
        wait("the slide list", lambda: browser.find_elements("css selector", "#slides button"))
        assert all("401" in e for e in console_errors(browser))  # before the key was set
        browser.find_element("id", "upload").send_keys(str(scan))
        wait("the uploaded slide", lambda: browser.execute_script(
            "return window.wsiViewer.info && window.wsiViewer.info.name === 'scan.svs'"
            " && document.body.dataset.fullyLoaded === 'true'"))
        names = [b.text.splitlines()[0] for b in
                 browser.find_elements("css selector", "#slides button[data-slide]")]
        assert names.count("scan.svs") == 1 and "demo.svs" in names
        deletable = browser.find_elements("css selector", "#slides button.delete")
        assert [b.get_attribute("aria-label") for b in deletable] == [
            "Delete the upload scan.svs"]  # the root's slides are not the service's to delete
        assert browser.find_element("id", "upload-status").text == "Uploaded scan.svs"
        uploaded = httpx.get(f"{url}/v1/slides", params={"limit": 1000},
                             headers={"Authorization": "Bearer upl0ad"}).json()["items"]
        (scan_id,) = [i["id"] for i in uploaded if i["name"] == "scan.svs"]
        assert browser.execute_script("return window.wsiViewer.id") == scan_id
        screenshot(browser, artifacts, "8-uploaded")
        browser.execute_script("window.confirm = () => true")
        deletable[0].click()
        wait("the deletion", lambda: browser.find_element("id", "upload-status").text
             == "Deleted scan.svs")
        assert browser.execute_script("return window.wsiViewer.id") is None
        listed = httpx.get(f"{url}/v1/slides", headers={"Authorization": "Bearer upl0ad"})
        assert [i["name"] for i in listed.json()["items"]] == ["demo.svs"]
        assert not browser.find_elements("css selector", "#slides button.delete")
        browser.find_element("id", "upload").send_keys(str(tmp_path / "notes.svs"))
        message = browser.find_element("id", "message")
        wait("the refusal", lambda: message.is_displayed())
        assert message.text.startswith("notes.svs was not uploaded: ")
        assert "(HTTP 422)" in message.text
        browser.find_element("id", "upload").send_keys(str(tmp_path / "big.svs"))
        wait("the size refusal", lambda: message.text.startswith("big.svs"))
        assert "exceeds the limit of a 2.5 MiB upload (HTTP 413)" in message.text
    assert not [e for e in console_errors(browser) if "422" not in e and "413" not in e]


def test_a_job_scores_the_open_slide_and_offers_its_result_files(
        browser: Any, artifacts: Path, demo_slide: Path, tmp_path: Path) -> None:
    """"Score the whole slide" runs a job with the service's model, shows its progress and
    state, and lists its result files, each downloadable as the API serves it."""
    settings = folder_settings(tmp_path, {"demo.svs": demo_slide})
    with serve(create_app(settings), ready_path="/readyz") as url:
        sid = slide_ids(url)["demo.svs"]
        open_page(browser, url, sid)
        browser.find_element("id", "job-start").click()
        status = browser.find_element("id", "job-status")
        wait("the job", lambda: status.get_attribute("data-state") not in (
            None, "queued", "running"), timeout=120)
        assert status.get_attribute("data-state") == "succeeded", status.text
        job_id = browser.execute_script("return window.wsiViewer.job.id")
        job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
        assert status.text == (f"succeeded: 1 of 1 slide(s), {job['patches_done']} patches")
        buttons = browser.find_elements("css selector", "#job-results button")
        shown = [(b.get_attribute("data-name"), b.get_attribute("data-url")) for b in buttons]
        assert shown == [(r["name"], r["url"]) for r in job["results"]]
        assert f"{sid}.predictions.csv" in dict(shown)
        assert "predictions.csv" in [b.text for b in buttons]  # named without the slide id
        for _, path in shown:
            assert httpx.get(f"{url}{path}").status_code == 200
        assert not browser.find_element("id", "job-cancel").is_displayed()
        browser.execute_script("document.getElementById('job-results').scrollIntoView()")
        screenshot(browser, artifacts, "9-job")
    assert console_errors(browser) == []


def test_the_tissue_detection_chosen_on_the_page_reaches_the_layers_and_downloads(
        browser: Any, demo_slide: Path, tmp_path: Path) -> None:
    """Choosing fluorescence redraws the tissue layer with the service's fluorescence mask
    (a far larger area on this brightfield slide), and the downloads ask for it too."""
    from selenium.webdriver.support.ui import Select

    settings = folder_settings(tmp_path, {"demo.svs": demo_slide})
    with serve(create_app(settings), ready_path="/readyz") as url:
        sid = slide_ids(url)["demo.svs"]
        masks = {m: np.asarray(Image.open(io.BytesIO(httpx.get(
            f"{url}/v1/slides/{sid}/tissue", params={"tissue_method": m}).content))) > 127
            for m in ("auto", "fluorescence")}
        assert masks["fluorescence"].sum() > 3 * masks["auto"].sum()
        open_page(browser, url, sid)
        browser.find_element("id", "layer-tissue").click()
        wait("the tissue layer", lambda: browser.execute_script(
            "return !!window.wsiViewer.layers.tissue"))
        first = browser.execute_script("return window.wsiViewer.layers.tissue.mask")
        Select(browser.find_element("id", "tissue-method")).select_by_value("fluorescence")
        wait("the layer redrawn", lambda: browser.execute_script(
            "const t = window.wsiViewer.layers.tissue; return !!t && t.mask !== arguments[0]",
            first))
        drawn = browser.execute_script("return window.wsiViewer.layers.tissue.mask")
        assert drawn == int(masks["fluorescence"].sum()) and first == int(masks["auto"].sum())
        wait("the choice back", lambda: browser.find_element("id", "tissue-method").is_enabled())
        urls = [d[1] for d in browser.execute_script("return window.wsiViewer.downloads")]
        assert all("tissue_method=fluorescence" in u for u in urls
                   if "/tissue" in u or "/qc" in u)
    assert console_errors(browser) == []


def test_a_slide_that_fails_shows_a_readable_error(
        browser: Any, artifacts: Path, demo_slide: Path, tmp_path: Path) -> None:
    settings = folder_settings(tmp_path, {"demo.svs": demo_slide})
    with serve(create_app(settings), ready_path="/readyz") as url:
        browser.get(f"{url}/viewer?slide=nosuchslide")
        message = browser.find_element("id", "message")
        wait("the error message", lambda: message.is_displayed())
        assert "could not be opened" in message.text and "unknown slide id" in message.text
        screenshot(browser, artifacts, "5-error")
        # the slide list is there, and a click opens the slide
        browser.find_element("css selector", "#slides button").click()
        wait("the slide's tiles", lambda: browser.execute_script(
            "return document.body.dataset.fullyLoaded === 'true'"))
        assert not message.is_displayed()


def test_a_medgemma_report_streams_beside_its_bag(
        browser: Any, artifacts: Path, demo_slide: Path, tmp_path: Path) -> None:
    """With a VLM configured (here the local OpenAI-compatible stand-in, which checks the
    requests with the openai package's own types and describes what it received), the
    report's text streams into the panel and the bag it was made from is drawn."""
    from _openai_server import OpenAIStub, create_openai_stub

    stub = OpenAIStub()
    with serve(create_openai_stub(stub)) as vlm:
        settings = folder_settings(tmp_path, {"demo.svs": demo_slide}, vlm_url=f"{vlm}/v1",
                                   vlm_model="echo")
        with serve(create_app(settings), ready_path="/readyz") as url:
            sid = slide_ids(url)["demo.svs"]
            open_page(browser, url, sid)
            browser.find_element("id", "describe").click()
            wait("the report", lambda: browser.execute_script(
                "return !!window.wsiViewer.report"), timeout=120)
            text = browser.find_element("id", "report").text
            n_boxes = browser.execute_script("return document.querySelectorAll('.box').length")
            drawn = browser.execute_script(
                "return window.wsiViewer.layers.medgemma.plan.patches.map((p) => [p.x0, p.y0])")
            plan = httpx.post(f"{url}/v1/slides/{sid}/plan",
                              json={"strategy": "medgemma", "seed": 0}).json()
            screenshot(browser, artifacts, "6-report")
    (request,) = stub.received
    assert text.startswith(f"Received {len(request.images)} images (896x896)")
    assert n_boxes == len(request.images) > 0  # the bag on the slide is the bag described
    assert drawn == [[p["x0"], p["y0"]] for p in plan["patches"]]  # the service's bag
    assert browser.find_element("id", "layer-medgemma").is_selected()


def test_a_slide_answer_and_its_attention_on_the_slide(
        browser: Any, artifacts: Path, tmp_path: Path) -> None:
    """With a slide model configured, the viewer answers the slide (its probabilities in the
    panel, the same as the API's stream) and draws each patch's attention, coloured by its
    percentile, where the patch is."""
    from _slide_tasks import write_clam_task

    from wsi_sampler.demo import DemoSlideSpec, write_demo_slide
    from wsi_sampler.models import load_model
    from wsi_sampler.worker import InProcessWorker

    # a small slide: 11 patches of the encoder's 224 px at 0.5 µm/px, each encoded twice
    slide = write_demo_slide(tmp_path / "case.svs",
                             DemoSlideSpec(width=2560, height=1920, mpp=0.5, seed=4))
    card, ckpt = write_clam_task(tmp_path)
    vits = InProcessWorker(load_model("vit-s16", device="cpu", allow_random_weights=True))
    settings = folder_settings(tmp_path, {"case.svs": slide},
                               slide_models=[{"card": card, "weights": ckpt}])
    console_errors(browser)  # what earlier tests left in the browser's log
    with serve(create_app(settings, worker_factory=lambda: vits), ready_path="/readyz") as url:
        sid = slide_ids(url)["case.svs"]
        open_page(browser, url, sid)
        assert browser.find_element("id", "answer-panel").is_displayed()
        assert browser.find_element("id", "layer-attention").is_displayed()
        browser.find_element("id", "answer").click()
        wait("the answer", lambda: browser.execute_script(
            "return !!(window.wsiViewer.layers.attention)"), timeout=180)
        answer = browser.execute_script("return window.wsiViewer.answer")
        streamed = [json.loads(line) for line in httpx.post(
            f"{url}/v1/slides/{sid}/slide-predictions", json={}, timeout=180).text.splitlines()]
        (result,) = [r for r in streamed if r["type"] == "result"]
        assert answer["probabilities"] == pytest.approx(result["probabilities"], abs=1e-5)
        shown = browser.find_element("id", "answer-result").text
        assert result["predicted_class"] in shown
        n_boxes = browser.execute_script("return document.querySelectorAll('.attn').length")
        assert n_boxes == result["n_patches"] > 0
        assert browser.find_element("id", "legend-title").text.startswith("attention percentile")
        # the hottest patch is drawn red-ish (jet's top), the coldest blue-ish
        pct = browser.execute_script("return window.wsiViewer.layers.attention.pct")
        colours = browser.execute_script(
            "return [...document.querySelectorAll('.attn')].map(e => e.style.background)")
        hot, cold = colours[int(np.argmax(pct))], colours[int(np.argmin(pct))]
        hot_rgb = [int(v) for v in hot[hot.index("(") + 1:hot.index(")")].split(",")]
        cold_rgb = [int(v) for v in cold[cold.index("(") + 1:cold.index(")")].split(",")]
        assert hot_rgb[0] > hot_rgb[2] and cold_rgb[2] > cold_rgb[0]
        rows = browser.execute_script("return window.wsiViewer.attentionCsv()").split()
        assert rows[0] == "minx,miny,width,height,attention,attention_percentile"
        assert len(rows) == n_boxes + 1
        assert browser.find_element("id", "download-attention").is_displayed()
        time.sleep(0.5)
        screenshot(browser, artifacts, "7-attention")
        assert console_errors(browser) == []
