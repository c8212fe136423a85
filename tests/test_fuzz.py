"""Fuzz corpus: damaged slides through the library, the CLI and every slide route.

Pass = success or a clear domain error (library), exit 0 or one ``error:`` line with exit 2
(CLI), only 2xx or a status the OpenAPI schema documents for the route (API), never a
traceback, never a stream that ends cleanly without all its patches, every call within a
time bound, and memory bounded. ``make test`` runs a sample; ``make fuzz`` runs
``WSI_FUZZ_MUTANTS`` mutants per seed slide (default there: 150).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from _servers import serve
from conftest import SHARED_SLIDES
from fuzz_corpus import MUTATIONS, mutants

from api.app import create_app
from api.config import Settings
from wsi_sampler import Extractor, PlanParams, WsiSamplerError, make_plan, open_slide
from wsi_sampler.demo import DemoSlideSpec, write_demo_slide

PER_SEED = int(os.environ.get("WSI_FUZZ_MUTANTS", "14"))
SEEDS = ["cmu", "generated"]
CASES = [(seed, i) for seed in SEEDS for i in range(PER_SEED)]
CALL_LIMIT_S = 30.0
RSS_GROWTH_LIMIT = 1536 << 20
SAMPLE = {"strategy": "random", "n_patches": 8, "patch_size_px": 128, "seed": 1,
          "min_tissue_fraction": 0.0}
CLI = Path(sys.executable).with_name("wsi-sampler")


def case_id(case: tuple[str, int]) -> str:
    seed, i = case
    return f"{seed}-{i:03d}-{MUTATIONS[i % len(MUTATIONS)].__name__}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every mutant, written once into one slide root: name -> path."""
    root = tmp_path_factory.mktemp("fuzz") / "slides"
    root.mkdir()
    seeds = {"generated": write_demo_slide(
        root.parent / "generated.svs",
        DemoSlideSpec(width=3000, height=2200, mpp=0.5, seed=3, tile_px=256)).read_bytes()}
    cmu = SHARED_SLIDES / "CMU-1-Small-Region.svs"
    if cmu.exists():
        seeds["cmu"] = cmu.read_bytes()
    paths = {}
    for seed, data in seeds.items():
        for name, mutated in mutants(seed, data, PER_SEED):
            paths[name] = root / f"{name}.svs"
            paths[name].write_bytes(mutated)
    return paths


def mutant(corpus: dict[str, Path], case: tuple[str, int]) -> Path:
    name = case_id(case)
    if name not in corpus:
        pytest.skip(f"seed slide of {name} not found in {SHARED_SLIDES}")
    return corpus[name]


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


@contextmanager
def bounded_memory() -> Iterator[None]:
    """Sample this process's RSS while the block runs; fail if it grew past the limit."""
    start, peak, stop = _rss(), [0], threading.Event()

    def watch() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], _rss())

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    assert peak[0] - start < RSS_GROWTH_LIMIT, f"RSS grew by {(peak[0] - start) >> 20} MiB"


def exercise_library(path: Path) -> str:
    try:
        with open_slide(path) as slide:
            slide.info()
            slide.thumbnail(max_size=512)
            plan = make_plan(slide, PlanParams(**SAMPLE))  # type: ignore[arg-type]
            for _ in Extractor(slide, plan, batch_size=4).iter_batches():
                pass
    except WsiSamplerError as exc:
        return type(exc).__name__
    return "ok"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_library(corpus: dict[str, Path], case: tuple[str, int]) -> None:
    path = mutant(corpus, case)
    t0 = time.monotonic()
    with bounded_memory():
        exercise_library(path)  # anything but a WsiSamplerError propagates and fails
    assert time.monotonic() - t0 < CALL_LIMIT_S


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cli(corpus: dict[str, Path], case: tuple[str, int], tmp_path: Path) -> None:
    path = mutant(corpus, case)
    done = subprocess.run(
        [str(CLI), "patches", str(path), "--out", str(tmp_path / "out"), "--strategy",
         "random", "-n", "4", "--size", "128", "--min-tissue", "0"],
        capture_output=True, text=True, timeout=CALL_LIMIT_S * 2, check=False)
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    if done.returncode != 0:
        # one error line, last; warnings the run gave before it (a damaged slide can look
        # mostly dark: "pen/dark exclusion removed 51 % of the tissue") may precede it
        lines = [ln for ln in done.stderr.strip().splitlines() if not ln.startswith("warning: ")]
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), \
            done.stderr[-2000:]


# -- the API --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def api(corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[tuple[str, dict[str, str], dict[str, set[int]]]]:
    root = next(iter(corpus.values())).parent
    data = tmp_path_factory.mktemp("fuzz-data")
    settings = Settings(slide_roots=[root], data_dir=data, demo_slide=False, device="cpu")
    with serve(create_app(settings), ready_path="/readyz") as url:
        items = httpx.get(f"{url}/v1/slides", params={"limit": 1000}).json()["items"]
        spec = httpx.get(f"{url}/openapi.json").json()
        documented = {f"{m.upper()} {p}": {int(s) for s in op["responses"] if s.isdigit()}
                      for p, ops in spec["paths"].items() for m, op in ops.items()}
        yield url, {i["name"]: i["id"] for i in items}, documented
    shutil.rmtree(data, ignore_errors=True)


ROUTES = [
    ("GET", "/v1/slides/{slide_id}", None, None),
    ("GET", "/v1/slides/{slide_id}/thumbnail", {"max_size": 512}, None),
    ("GET", "/v1/slides/{slide_id}/tissue", {"format": "geojson"}, None),
    ("POST", "/v1/slides/{slide_id}/plan", None, SAMPLE),
    ("POST", "/v1/slides/{slide_id}/patches", None, SAMPLE),
    ("POST", "/v1/slides/{slide_id}/patches", {"format": "ndjson"}, SAMPLE),
    ("POST", "/v1/slides/{slide_id}/predictions", None,
     {"strategy": "random", "n_patches": 8, "min_tissue_fraction": 0.0}),
]


def call_route(url: str, method: str, route: str, sid: str, params: dict[str, object] | None,
               body: dict[str, object] | None) -> tuple[int, str]:
    """(status, how the body ended: complete | aborted | n/a)."""
    target = url + route.replace("{slide_id}", sid)
    with httpx.stream(method, target, params=params, json=body, timeout=CALL_LIMIT_S) as resp:
        if resp.status_code != 200 or not route.endswith(("patches", "predictions")):
            resp.read()
            return resp.status_code, "n/a"
        planned = int(resp.headers["x-patch-count"])
        try:
            data = resp.read()
        except httpx.RemoteProtocolError:
            return 200, "aborted"  # the contract: a failure after the start aborts
    if resp.headers["content-type"] == "application/x-tar":
        complete = data.endswith(b"\0" * 1024) and data.count(b"ustar") == 2 * planned
    else:
        lines = data.decode().splitlines()
        complete = len(lines) == planned + 1 and json.loads(lines[-1])["type"] == "summary"
    return 200, "complete" if complete else "clean end without every patch"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_api(corpus: dict[str, Path], api: tuple[str, dict[str, str], dict[str, set[int]]],
             case: tuple[str, int]) -> None:
    path = mutant(corpus, case)
    url, ids, documented = api
    sid = ids[path.name]
    with bounded_memory():
        for method, route, params, body in ROUTES:
            t0 = time.monotonic()
            status, ending = call_route(url, method, route, sid, params, body)
            assert time.monotonic() - t0 < CALL_LIMIT_S
            assert status == 200 or status in documented[f"{method} {route}"], (route, status)
            assert status < 500, (route, status)
            assert ending in ("complete", "aborted", "n/a"), (route, ending)
    assert httpx.get(f"{url}/healthz").status_code == 200


# -- truncations: never a slide of zeros ----------------------------------------------------------

CUTS = [0.001, 0.05, 0.2, 0.35, 0.5, 0.66, 0.8, 0.9, 0.93, 0.97, 0.99, 0.999]


def _seed_files(tmp: Path) -> dict[str, bytes]:
    seeds = {"generated": write_demo_slide(
        tmp / "generated.svs",
        DemoSlideSpec(width=3000, height=2200, mpp=0.5, seed=3, tile_px=256)).read_bytes()}
    for name in ("CMU-1-Small-Region.svs", "test3-DAPI-2-387.ndpi"):
        if (SHARED_SLIDES / name).exists():
            seeds[name] = (SHARED_SLIDES / name).read_bytes()
    return seeds


def test_a_file_cut_anywhere_is_never_a_slide_of_zeros(tmp_path: Path) -> None:
    # A cut file is refused at open; were one to open, what it shows must be real pixels.
    import numpy as np

    for name, data in _seed_files(tmp_path).items():
        suffix = Path(name).suffix or ".svs"
        for cut in CUTS:
            path = tmp_path / f"cut-{cut}{suffix}"
            path.write_bytes(data[: int(len(data) * cut)])
            try:
                with open_slide(path) as slide:
                    thumb = slide.thumbnail(max_size=256)
            except WsiSamplerError:
                continue
            assert np.ptp(thumb) > 0, f"{name} cut at {cut:.1%} opened as a blank slide"


def test_cut_files_through_the_api_are_422_everywhere(tmp_path: Path) -> None:
    root = tmp_path / "slides"
    root.mkdir()
    data = _seed_files(tmp_path)["generated"]
    for cut in (0.0005, 0.5, 0.93, 0.999):
        (root / f"cut-{cut}.svs").write_bytes(data[: int(len(data) * cut)])
    settings = Settings(slide_roots=[root], data_dir=tmp_path / "data", demo_slide=False,
                        device="cpu")
    with serve(create_app(settings), ready_path="/readyz") as url:
        items = httpx.get(f"{url}/v1/slides", params={"limit": 1000}).json()["items"]
        for item in items:
            for method, route, params, body in ROUTES:
                status, _ = call_route(url, method, route, item["id"], params, body)
                assert status == 422, (item["name"], route, status)
            upload = httpx.post(f"{url}/v1/slides", content=(root / item["name"]).read_bytes(),
                                headers={"content-type": "application/octet-stream"})
            assert upload.status_code == 422, (item["name"], upload.text)
