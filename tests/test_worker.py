from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from _servers import serve

from api.worker_app import create_worker_app
from wsi_sampler.errors import InvalidRequestError, WorkerError, WorkerUnavailableError
from wsi_sampler.models import Model, load_model
from wsi_sampler.worker import InProcessWorker, MicroBatcher, RemoteWorker
from wsi_sampler.worker.oip import HEADER_LENGTH

RNG = np.random.default_rng(3)
PATCHES = RNG.integers(0, 256, (70, 224, 224, 3), dtype=np.uint8)
PATCHES[::3, :, :112] = (242, 241, 244)  # some background, so QC labels vary


@pytest.fixture(scope="module")
def model() -> Model:
    return load_model("tissue-qc", device="cpu")


@pytest.fixture(scope="module")
def reference(model: Model) -> dict[str, np.ndarray]:
    return InProcessWorker(model).infer(PATCHES)


@pytest.fixture(scope="module")
def url(model: Model) -> Iterator[str]:
    with serve(create_worker_app(lambda: model), ready_path="/v2/health/ready") as base:
        yield base


def test_in_process_worker_is_the_model(model: Model, reference: dict[str, np.ndarray]) -> None:
    assert set(reference) == {"measurements", "qc"}
    np.testing.assert_array_equal(reference["qc"], model.predict(PATCHES)["qc"])


# -- tritonclient, unchanged, against our server ---------------------------------------------------
def test_tritonclient_health_and_metadata(url: str) -> None:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tissue-qc")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata("tissue-qc")
    assert meta["inputs"] == [{"name": "patches", "datatype": "UINT8", "shape": [-1, 224, 224, 3]}]
    assert [o["name"] for o in meta["outputs"]] == ["measurements", "qc"]
    assert client.get_model_config("tissue-qc")["max_batch_size"] == 64
    client.close()


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infer_matches_in_process(
    url: str, reference: dict[str, np.ndarray], binary: bool
) -> None:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url.removeprefix("http://"))
    batch = PATCHES[:16]
    inp = triton.InferInput("patches", list(batch.shape), "UINT8")
    inp.set_data_from_numpy(batch, binary_data=binary)
    outs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("measurements", "qc")]
    result = client.infer("tissue-qc", [inp], outputs=outs, request_id="req-42")
    assert result.get_response()["id"] == "req-42"
    np.testing.assert_allclose(result.as_numpy("measurements"), reference["measurements"][:16],
                               rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(result.as_numpy("qc"), reference["qc"][:16])
    client.close()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_compressed_requests_and_statistics(
    url: str, reference: dict[str, np.ndarray], algorithm: str
) -> None:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url.removeprefix("http://"))
    before = client.get_inference_statistics("tissue-qc")["model_stats"][0]
    batch = PATCHES[:8]
    inp = triton.InferInput("patches", list(batch.shape), "UINT8")
    inp.set_data_from_numpy(batch, binary_data=True)
    result = client.infer("tissue-qc", [inp], request_compression_algorithm=algorithm,
                          response_compression_algorithm=algorithm)
    np.testing.assert_array_equal(result.as_numpy("qc"), reference["qc"][:8])
    after = client.get_inference_statistics("tissue-qc")["model_stats"][0]
    assert after["inference_count"] == before["inference_count"] + 8
    assert after["inference_stats"]["success"]["count"] == \
        before["inference_stats"]["success"]["count"] + 1
    assert after["last_inference"] > 0 and "statistics" in client.get_server_metadata()[
        "extensions"]
    assert client.get_model_repository_index() == [
        {"name": "tissue-qc", "version": "1", "state": "READY"}]
    client.close()


def test_unknown_or_broken_encodings_are_400(url: str) -> None:
    body = b"x" * 64
    for encoding, data in (("br", body), ("gzip", body)):
        resp = httpx.post(f"{url}/v2/models/tissue-qc/infer", content=data,
                          headers={"Content-Encoding": encoding})
        assert resp.status_code == 400 and encoding in resp.json()["error"]


# -- our client --------------------------------------------------------------------------------
@pytest.mark.parametrize("binary", [True, False])
def test_remote_worker_matches_in_process(
    url: str, reference: dict[str, np.ndarray], binary: bool
) -> None:
    with RemoteWorker(url, "tissue-qc", binary=binary) as worker:
        assert worker.card.patch_size_px == 224 and worker.card.target_mpp == 0.5
        assert worker.max_batch == 64  # from the server's config: 70 patches go as 64 + 6
        out = worker.infer(PATCHES)
    np.testing.assert_allclose(out["measurements"], reference["measurements"], rtol=1e-5,
                               atol=1e-4)
    np.testing.assert_array_equal(out["qc"], reference["qc"])


def test_remote_worker_errors(url: str) -> None:
    with pytest.raises(WorkerError, match="unknown model"):
        RemoteWorker(url, "no-such-model", retries=0)
    with RemoteWorker(url, "tissue-qc") as worker, pytest.raises(InvalidRequestError):
        worker.infer(np.zeros((2, 100, 100, 3), np.uint8))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(WorkerUnavailableError, match="after 3 attempts"):
        RemoteWorker(dead, "tissue-qc", retries=2, backoff_s=0.01)


# -- protocol error paths, raw ---------------------------------------------------------------------
def post(url: str, header: dict[str, object], blob: bytes = b"", **kw: str) -> httpx.Response:
    text = json.dumps(header).encode()
    headers = {HEADER_LENGTH: str(len(text))} if blob or kw.get("force") else {}
    return httpx.post(f"{url}/v2/models/{kw.get('model', 'tissue-qc')}/infer",
                      content=text + blob, headers=headers)


def spec(shape: list[int], datatype: str = "UINT8", size: int | None = None) -> dict[str, object]:
    n = int(np.prod(shape)) * (4 if datatype == "FP32" else 2 if datatype == "FP16" else 1)
    return {"name": "patches", "shape": shape, "datatype": datatype,
            "parameters": {"binary_data_size": n if size is None else size}}


@pytest.mark.parametrize(
    ("header", "blob", "status", "message"),
    [
        ({"inputs": [spec([1, 100, 100, 3])]}, bytes(30000), 400, "shape"),
        ({"inputs": [spec([1, 224, 224, 3], "FP32")]}, bytes(224 * 224 * 12), 400, "UINT8"),
        ({"inputs": [spec([65, 224, 224, 3])]}, bytes(65 * 224 * 224 * 3), 400, "max_batch"),
        ({"inputs": [spec([1, 224, 224, 3])]}, bytes(1000), 400, "ends"),
        ({"inputs": [spec([1, 224, 224, 3], size=10)]}, bytes(10), 400, "binary_data_size"),
        ({"inputs": [{"name": "patches", "shape": [1, 2], "datatype": "FP16", "data": [1, 2]}]},
         b"", 400, "FP16"),
        ({"inputs": [{"name": "patches", "shape": [3], "datatype": "UINT8", "data": [1, 2]}]},
         b"", 400, "do not fill"),
        ({"inputs": []}, b"", 400, "inputs"),
    ],
)
def test_bad_requests_are_4xx_json(
    url: str, header: dict[str, object], blob: bytes, status: int, message: str
) -> None:
    resp = post(url, header, blob)
    assert resp.status_code == status, resp.text
    assert message in resp.json()["error"]


def test_unknown_model_version_and_garbage(url: str) -> None:
    resp = post(url, {"inputs": [spec([1, 224, 224, 3])]}, bytes(224 * 224 * 3), model="nope")
    assert resp.status_code == 404 and "unknown model" in resp.json()["error"]
    assert httpx.get(f"{url}/v2/models/tissue-qc/versions/7").status_code == 404
    assert httpx.get(f"{url}/v2/models/tissue-qc/versions/1").status_code == 200
    resp = httpx.post(f"{url}/v2/models/tissue-qc/infer", content=b"\xff{{")
    assert resp.status_code == 400 and "JSON header" in resp.json()["error"]
    resp = httpx.post(f"{url}/v2/models/tissue-qc/infer", content=b"{}",
                      headers={HEADER_LENGTH: "99"})
    assert resp.status_code == 400


def test_json_request_gets_json_response_with_id(
    url: str, reference: dict[str, np.ndarray]
) -> None:
    patch = PATCHES[:1]
    header = {"id": "abc", "inputs": [{"name": "patches", "shape": list(patch.shape),
                                       "datatype": "UINT8", "data": patch.ravel().tolist()}]}
    resp = httpx.post(f"{url}/v2/models/tissue-qc/infer", json=header)
    assert resp.status_code == 200 and HEADER_LENGTH not in resp.headers
    body = resp.json()
    assert body["id"] == "abc" and body["model_name"] == "tissue-qc"
    qc = next(o for o in body["outputs"] if o["name"] == "qc")
    assert qc["shape"] == [1, 5] and qc["data"] == reference["qc"][0].tolist()


def test_concurrent_requests_all_answered_correctly(
    url: str, reference: dict[str, np.ndarray]
) -> None:
    with RemoteWorker(url, "tissue-qc") as worker, ThreadPoolExecutor(8) as pool:
        parts = list(pool.map(lambda i: worker.infer(PATCHES[i * 8 : i * 8 + 8]), range(8)))
    np.testing.assert_array_equal(np.concatenate([p["qc"] for p in parts]), reference["qc"][:64])


def test_not_ready_until_the_model_has_loaded(model: Model) -> None:
    loaded = threading.Event()

    def slow_load() -> Model:
        loaded.wait(30)
        return model

    with serve(create_worker_app(slow_load)) as base:
        assert httpx.get(f"{base}/v2/health/live").status_code == 200
        resp = httpx.get(f"{base}/v2/health/ready")
        assert resp.status_code == 503
        assert httpx.get(f"{base}/v2/models/tissue-qc").status_code == 503
        loaded.set()
        with RemoteWorker(base, "tissue-qc", retries=20, backoff_s=0.05) as worker:
            assert worker.infer(PATCHES[:2])["qc"].shape == (2, 5)


# -- micro-batching, deterministic -----------------------------------------------------------
def test_micro_batcher_groups_waiting_requests_up_to_max_batch() -> None:
    calls: list[int] = []
    release = threading.Event()

    def predict(x: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(len(x))
        release.wait(10)
        return {"v": x[:, :1, 0, 0].astype(np.float32)}

    async def scenario() -> list[dict[str, np.ndarray]]:
        batcher = MicroBatcher(predict, max_batch=8, max_delay_s=0.0)
        batcher.start()
        inputs = [np.full((n, 1, 1, 3), i, np.uint8) for i, n in enumerate([2, 4, 4, 3])]
        first = asyncio.create_task(batcher.submit(inputs[0]))
        while not calls:  # the model is now busy with the first request
            await asyncio.sleep(0.001)
        rest = [asyncio.create_task(batcher.submit(x)) for x in inputs[1:]]
        await asyncio.sleep(0.05)
        release.set()
        results = await asyncio.gather(first, *rest)
        with pytest.raises(InvalidRequestError, match="max batch"):
            await batcher.submit(np.zeros((9, 1, 1, 3), np.uint8))
        await batcher.stop()
        return list(results)

    results = asyncio.run(scenario())
    assert calls == [2, 8, 3]  # 4 + 4 waited together; 3 did not fit and went next
    for i, r in enumerate(results):
        assert r["v"].ravel().tolist() == [i] * len(r["v"])


def test_our_worker_lists_the_binary_extension_and_is_spoken_to_in_binary(
        model: Model) -> None:
    # Servers that list no binary_tensor_data (MLServer, KServe) are spoken to in JSON:
    # tests/test_interop_servers.py runs the real ones.
    with serve(create_worker_app(lambda: model), ready_path="/v2/health/ready") as base, \
            RemoteWorker(base, "tissue-qc") as ours:
        assert ours.binary is True


def test_a_worker_that_echoes_our_credentials_never_passes_them_on() -> None:
    # The real worker app behind a proxy-like layer that fails inference echoing the
    # request's Authorization header (httpx sends the URL's user info as Basic auth).
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import JSONResponse

    from wsi_sampler.errors import WorkerError

    canary = "canary-6b1f0e"
    app = create_worker_app(lambda: load_model("tissue-qc", device="cpu"))

    async def echo(request, call_next):  # type: ignore[no-untyped-def]
        if request.url.path.endswith("/infer"):
            return JSONResponse({"error": "bad gateway; you sent Authorization="
                                          f"{request.headers.get('authorization')} "
                                          f"token={canary}"}, status_code=400)
        return await call_next(request)

    app.add_middleware(BaseHTTPMiddleware, dispatch=echo)
    with serve(app, ready_path="/v2/health/ready") as base:
        url = base.replace("http://", f"http://lab:{canary}@")
        patches = np.zeros((2, 224, 224, 3), np.uint8)
        with RemoteWorker(url, "tissue-qc", retries=0) as worker, \
                pytest.raises(WorkerError, match="HTTP 400") as exc:
            worker.infer(patches)
    message = str(exc.value)
    assert canary not in message and "lab:" not in message  # nor user info in the URL
    assert "Authorization=[redacted]" in message and "token=[redacted]" in message
