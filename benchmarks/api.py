"""Patches over HTTP: the streamed tar in each image form vs the in-process extractor.

Run ``python -m benchmarks.api``. The service runs as its own process (``wsi-sampler
serve``); clients read the WebDataset tar as it streams, on the same machine. Two plans on
the 40,000 x 30,000 benchmark slide (0.25 µm/px, JPEG tiles of 256 px): every tissue patch
of 256 px at the native level (tile-aligned: JPEG members are the stored tiles) and of
224 px at 0.5 µm/px (resampled: JPEG members are encoded). Per plan: the in-process
extractor (timed from the plan, like a request) alone and with each encoding on every
core (what a stream of that form can deliver at most, HTTP aside), then each form over
HTTP read by

- ``http.client`` into one buffer (the least a client can spend: what the server gives),
- httpx ``iter_bytes`` (a common client; it allocates every piece),
- ``wsi_sampler.client.stream_patches`` (raw: ``.npy`` members read into numpy arrays).

Also the image encoders per core (ours vs OpenCV's, same quality) and the time to the
first patch on the ``make run`` demo slide. Goals (issue 14): raw >= 0.8 x the in-process
extractor, JPEG >= 0.5 x, PNG >= 0.3 x; first patch < 150 ms.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import cv2
import httpx
import numpy as np

from wsi_sampler import Extractor, make_plan, open_slide
from wsi_sampler._tiles import default_threads
from wsi_sampler.client import stream_patches
from wsi_sampler.demo import write_demo_slide
from wsi_sampler.encoding import encode_jpeg, encode_png

from ._harness import ensure_slide
from ._servers import cli_server
from .extract import SPECS

PLANS = {"256 px native (tile-aligned)": {"strategy": "grid", "patch_size_px": 256},
         "224 px at 0.5 µm/px": {"strategy": "grid", "patch_size_px": 224, "target_mpp": 0.5}}
FIRST = {"strategy": "grid", "patch_size_px": 224, "target_mpp": 0.5}
FORMS = ("raw", "jpeg", "png")


def in_process(path: Path, body: dict[str, Any],
               encode: Callable[[np.ndarray], bytes] | None = None) -> float:
    """Seconds from the plan to the last patch read (and encoded on every core, with
    ``encode``: the most a stream of that form can deliver, HTTP aside)."""
    from api.schemas import PatchRequest

    with open_slide(path) as s, ThreadPoolExecutor(default_threads()) as pool:
        t = time.perf_counter()
        plan = make_plan(s, PatchRequest(**body).to_params())
        for batch in Extractor(s, plan).iter_batches():
            if encode is not None:
                list(pool.map(encode, batch.images))
        return time.perf_counter() - t


def in_process_stored(path: Path, body: dict[str, Any]) -> float:
    """Seconds from the plan to every patch's stored JPEG bytes (no decoding): what a JPEG
    stream of a tile-aligned plan sends, HTTP aside."""
    from api.schemas import PatchRequest

    with open_slide(path) as s:
        t = time.perf_counter()
        extractor = Extractor(s, make_plan(s, PatchRequest(**body).to_params()))
        for start, end in extractor.batch_bounds():
            stored = extractor.stored_jpegs(range(start, end))
            assert all(data is not None for data in stored)
        return time.perf_counter() - t


def passes_stored_jpeg(path: Path, body: dict[str, Any]) -> bool:
    from api.schemas import PatchRequest

    with open_slide(path) as s:
        return Extractor(s, make_plan(s, PatchRequest(**body).to_params())).passes_stored_jpeg


def read_http_client(url: str, sid: str, body: dict[str, Any]) -> int:
    """Bytes of the stream read with http.client into one reused buffer."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port)
    conn.request("POST", f"/v1/slides/{sid}/patches", body=json.dumps(body),
                 headers={"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    view, n = memoryview(bytearray(1 << 20)), 0
    while got := resp.readinto(view):
        n += got
    conn.close()
    return n


def read_httpx(url: str, sid: str, body: dict[str, Any]) -> int:
    n = 0
    with httpx.stream("POST", f"{url}/v1/slides/{sid}/patches", json=body, timeout=600) as r:
        r.raise_for_status()
        for chunk in r.iter_bytes():
            n += len(chunk)
    return n


def read_arrays(url: str, sid: str, body: dict[str, Any]) -> int:
    plan = {k: v for k, v in body.items() if k != "image_format"}
    return sum(im.nbytes for _, im in stream_patches(url, sid, plan,
                                                    image_format=body["image_format"]))


READERS: list[tuple[str, Callable[[str, str, dict[str, Any]], int]]] = [
    ("http.client", read_http_client), ("httpx", read_httpx),
    ("wsi_sampler.client (arrays)", read_arrays)]


def median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def first_patch_s(url: str, sid: str, body: dict[str, Any]) -> float:
    t = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/slides/{sid}/patches", json=body, timeout=600) as r:
        head = b""
        for chunk in r.iter_bytes():
            head += chunk
            if len(head) >= 512:
                info = tarfile.TarInfo.frombuf(head[:512], "utf-8", "surrogateescape")
                if len(head) >= 512 + info.size:
                    return time.perf_counter() - t
    raise RuntimeError("no complete first patch")


def codec_table(path: Path) -> None:
    with open_slide(path) as s:
        from api.schemas import PatchRequest

        plan = make_plan(s, PatchRequest(**PLANS["256 px native (tile-aligned)"]).to_params())
        images = next(Extractor(s, plan, batch_size=300).iter_batches()).images

    def cv2_encode(ext: str, flags: list[int]) -> Callable[[np.ndarray], bytes]:
        def encode(im: np.ndarray) -> bytes:
            return bytes(cv2.imencode(ext, np.ascontiguousarray(im[:, :, ::-1]), flags)[1])
        return encode

    rows = [("JPEG q95", "OpenCV imencode", cv2_encode(".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95])),
            ("JPEG q95", "ours (imagecodecs libjpeg-turbo)", encode_jpeg),
            ("PNG", "OpenCV imencode (libpng, zlib 1)", cv2_encode(".png", [])),
            ("PNG", "ours (Up filter, libdeflate 1)", encode_png)]
    print("\n| codec | encoder | patches/s per core | size / raw |\n|---|---|---:|---:|")
    for codec, name, fn in rows:
        seconds = median_s(partial(encode_all, fn, images), 3)
        size = sum(len(fn(im)) for im in images[:50]) / images[:50].nbytes
        print(f"| {codec} | {name} | {len(images) / seconds:,.0f} | {size:.3f} |")


def encode_all(fn: Callable[[np.ndarray], bytes], images: np.ndarray) -> None:
    for im in images:
        fn(im)


def plan_table(path: Path, url: str, sid: str, title: str, body: dict[str, Any], n: int,
               repeats: int) -> None:
    """One plan: each HTTP form and client against the in-process run that makes the same
    output (arrays against arrays, stored JPEG bytes against stored JPEG bytes)."""
    arrays = n / median_s(partial(in_process, path, body), repeats)
    stored = passes_stored_jpeg(path, body)
    bytes_base = (n / median_s(partial(in_process_stored, path, body), repeats)
                  if stored else None)
    print(f"\n{title}: {n} patches\n\n| path | client | client gets | patches/s | "
          "compared with | ratio |\n|---|---|---|---:|---|---:|")
    print(f"| in-process extractor | | arrays | {arrays:,.0f} | | |")
    if bytes_base is not None:
        print(f"| in-process stored JPEG tiles (no decode) | | JPEG bytes | {bytes_base:,.0f} "
              "| | |")
    encoded: dict[str, float] = {}
    for name, encode in (("jpeg", encode_jpeg), ("png", encode_png)):
        encoded[name] = rate = n / median_s(partial(in_process, path, body, encode), repeats)
        print(f"| in-process extractor + {name.upper()} encoding on every core | | "
              f"{name.upper()} bytes | {rate:,.0f} | | |")
    for form in FORMS:
        for client, read in (READERS if form == "raw" else [READERS[0], READERS[2]]):
            decoded = read is read_arrays
            seconds = median_s(partial(read, url, sid, body | {"image_format": form}), repeats)
            rate = n / seconds
            if form == "raw":
                gets = "arrays" if decoded else "raw .npy bytes (arrays as sent)"
                base, base_name = arrays, "in-process arrays"
            elif decoded:
                gets, base, base_name = "arrays", arrays, "in-process arrays"
            elif form == "jpeg" and bytes_base is not None:
                gets, base, base_name = "stored JPEG bytes", bytes_base, "in-process stored JPEG"
            else:
                gets, base = f"{form.upper()} bytes", encoded[form]
                base_name = f"in-process + {form.upper()} encoding"
            if form != "raw" and decoded:
                gets = "arrays (decoded in the client, 1 thread)"
            print(f"| HTTP tar ({form}) | {client} | {gets} | {rate:,.0f} | {base_name} | "
                  f"{rate / base:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        slides = Path(tmp) / "slides"
        slides.mkdir()
        write_demo_slide(slides / "demo.svs")
        path = Path(shutil.copy(ensure_slide("A", SPECS["A"]), slides / "big.svs"))
        env = {"WSI_SLIDE_ROOTS": f'["{slides}"]', "WSI_DATA_DIR": str(Path(tmp) / "data"),
               "WSI_DEMO_SLIDE": "false", "WSI_DEVICE": "cpu"}
        codec_table(path)
        with cli_server(["serve"], "/readyz", env=env) as url:
            ids = {i["name"]: i["id"] for i in httpx.get(f"{url}/v1/slides").json()["items"]}
            for title, body in PLANS.items():
                n = int(httpx.post(f"{url}/v1/slides/{ids['big.svs']}/plan",
                                   json=body).json()["n_patches"])
                plan_table(path, url, ids["big.svs"], title, body, n, args.repeats)
            print("\n| time to first patch (demo slide) | " + " | ".join(FORMS) + " |\n|---|" +
                  "---:|" * len(FORMS))
            firsts = [statistics.median(first_patch_s(url, ids["demo.svs"], FIRST | {
                "image_format": form}) for _ in range(args.repeats)) for form in FORMS]
            print("| ms | " + " | ".join(f"{s * 1000:.0f}" for s in firsts) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
