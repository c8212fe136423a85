"""The model servers labs run, for real, on 127.0.0.1: MLServer 1.7 and KServe's Python
ModelServer serve a small custom model (``tests/interop``) that our ``RemoteWorker``, the
API (``worker_url``) and ``wsi-sampler score --worker-url`` use; their own client code
calls our worker. Each lives in its own virtual environment (``tests/_tools.py``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from _servers import free_port, serve, slide_ids, stop_process
from _tools import tool_bin

from api.app import create_app
from api.config import Settings
from api.worker_app import create_worker_app
from wsi_sampler import Extractor, PlanParams, make_plan, open_slide
from wsi_sampler.errors import WorkerError
from wsi_sampler.models import load_model
from wsi_sampler.worker import RemoteWorker

INTEROP = Path(__file__).resolve().parent / "interop"
SIZE, MPP = 64, 2.0  # the custom model's input: 64 px at 2 µm/px
CLI = [sys.executable, "-c", "from wsi_sampler.cli import main; main()"]


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"{url}/v2/models/mean-colour/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)


def _mlserver(tmp: Path, port: int) -> list[str]:
    shutil.copy(INTEROP / "mean_colour_model.py", tmp)
    (tmp / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": port, "grpc_port": free_port(),
        "metrics_port": free_port(), "parallel_workers": 0}))
    (tmp / "model-settings.json").write_text(json.dumps({
        "name": "mean-colour", "implementation": "mean_colour_model.MeanColour",
        "inputs": [{"name": "patches", "datatype": "UINT8", "shape": [-1, SIZE, SIZE, 3]}],
        "outputs": [{"name": "mean_rgb", "datatype": "FP32", "shape": [-1, 3]}]}))
    return [str(tool_bin("mlserver", "mlserver")), "start", str(tmp)]


def _kserve(tmp: Path, port: int) -> list[str]:
    return [str(tool_bin("kserve", "python")), str(INTEROP / "kserve_mean_colour.py"),
            str(port), str(SIZE)]


@pytest.fixture(scope="module", params=["mlserver", "kserve"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[str]:
    kind, port = str(request.param), free_port()
    tmp = tmp_path_factory.mktemp(kind)
    cmd = (_mlserver if kind == "mlserver" else _kserve)(tmp, port)
    log = tmp / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log)
        yield url
    finally:
        stop_process(proc)


def _means(slide_path: Path, params: PlanParams) -> tuple[np.ndarray, np.ndarray]:
    """(level-0 corners, mean colour in 0..1) of the planned patches, computed here."""
    with open_slide(slide_path) as slide:
        plan = make_plan(slide, params)
        images = np.concatenate([b.images for b in Extractor(slide, plan).iter_batches()])
    return plan.coords, images.astype(np.float32).mean(axis=(1, 2)) / 255


PARAMS = PlanParams(strategy="random", n_patches=12, seed=5, patch_size_px=SIZE,
                    target_mpp=MPP)


def test_remote_worker_negotiates_json_and_matches(server: str) -> None:
    patches = np.random.default_rng(1).integers(0, 256, (70, SIZE, SIZE, 3), dtype=np.uint8)
    with RemoteWorker(server, "mean-colour", target_mpp=MPP) as worker:
        assert worker.binary is False  # neither server lists binary_tensor_data
        assert worker.card.patch_size_px == SIZE and worker.card.outputs[0].width == 3
        got = worker.infer(patches)["mean_rgb"]
    np.testing.assert_allclose(got, patches.astype(np.float32).mean(axis=(1, 2)) / 255,
                               atol=1e-6)


def test_binary_tensors_forced_on_a_server_that_lists_none(server: str) -> None:
    # Neither lists binary_tensor_data; KServe reads them all the same, MLServer 1.7.1
    # answers 500 (its log: UnicodeDecodeError), which must be a clear error, not garbage.
    patches = np.random.default_rng(2).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    name = str(httpx.get(f"{server}/v2").json().get("name", ""))
    with RemoteWorker(server, "mean-colour", target_mpp=MPP, binary=True, retries=0) as forced:
        if "mlserver" in name.lower():
            with pytest.raises(WorkerError, match=r"HTTP 500"):
                forced.infer(patches)
        else:
            np.testing.assert_allclose(forced.infer(patches)["mean_rgb"], patches.astype(
                np.float32).mean(axis=(1, 2)) / 255, atol=1e-6)


def test_score_cli_uses_the_server(server: str, demo_slide: Path, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(demo_slide, slides / "a.svs")
    done = subprocess.run([*CLI, "score", str(slides), "-o", str(tmp_path / "out"),
                           "--worker-url", server, "-m", "mean-colour",
                           "--worker-target-mpp", str(MPP), "--strategy", "random",
                           "-n", "12", "--seed", "5", "-q"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "HTTP Request" not in done.stderr  # -q is quiet, httpx included
    (csv_path,) = (tmp_path / "out" / "slides").glob("*/predictions.csv")
    rows = np.loadtxt(csv_path, delimiter=",", skiprows=1)
    header = csv_path.read_text().splitlines()[0].split(",")
    assert header[-3:] == ["mean_rgb_0", "mean_rgb_1", "mean_rgb_2"]
    coords, means = _means(slides / "a.svs", PARAMS)
    np.testing.assert_array_equal(rows[:, :2], coords)
    np.testing.assert_allclose(rows[:, -3:], means, atol=1e-4)


def test_the_api_serves_predictions_through_the_server(server: str, demo_slide: Path,
                                                       tmp_path: Path) -> None:
    root = tmp_path / "slides"
    root.mkdir()
    shutil.copy(demo_slide, root / "a.svs")
    settings = Settings(slide_roots=[root], data_dir=tmp_path / "data", demo_slide=False,
                        worker_url=server, model="mean-colour", worker_target_mpp=MPP)
    with serve(create_app(settings), ready_path="/readyz") as url:
        sid = slide_ids(url)["a.svs"]
        body = {"strategy": "random", "n_patches": 12, "seed": 5}
        lines = httpx.post(f"{url}/v1/slides/{sid}/predictions", json=body, timeout=120).text
    records = [json.loads(x) for x in lines.splitlines()]
    assert records[-1]["type"] == "summary" and records[-1]["patches"] == 12
    coords, means = _means(root / "a.svs", PARAMS)
    got = np.array([[r["outputs"][f"mean_rgb_{k}"] for k in range(3)] for r in records[:-1]])
    np.testing.assert_array_equal([[r["x0"], r["y0"]] for r in records[:-1]], coords)
    np.testing.assert_allclose(got, means, atol=1e-4)


@pytest.mark.parametrize("kind", ["kserve", "mlserver"])
def test_their_clients_call_our_worker(kind: str) -> None:
    python = tool_bin(kind, "python")
    model = load_model("tissue-qc", device="cpu")
    with serve(create_worker_app(lambda: model), ready_path="/v2/health/ready") as url:
        run = subprocess.run([str(python), str(INTEROP / "oip_clients.py"), kind, url,
                              "tissue-qc", "224"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout)
    patches = np.stack([np.full((224, 224, 3), i * 40, np.uint8) for i in range(4)])
    expected = model.predict(patches)
    assert set(got) == set(expected)
    for name, values in expected.items():
        np.testing.assert_allclose(np.array(got[name]), values, rtol=1e-5, atol=1e-5)
