"""Patches over HTTP: streamed tar vs the in-process extractor, and time to first patch.

Run ``python -m benchmarks.api``. The service runs as its own process (``wsi-sampler
serve``); the client reads the WebDataset tar as it streams. Throughput: every tissue patch
(256 px, native resolution) of the 40,000 x 30,000 benchmark slide, in each image form of
the stream (raw ``.npy`` arrays, JPEG, PNG); in-process baselines, timed from the plan like
the request: the extractor alone, and the extractor plus the same PNG encoding. Time to
first patch: the ``make run`` demo slide. Goals (issue 14): raw >= 0.8 x the in-process
extractor, JPEG >= 0.5 x, PNG >= 0.3 x; first patch < 150 ms.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from wsi_sampler import Extractor, make_plan, open_slide
from wsi_sampler.demo import write_demo_slide
from wsi_sampler.encoding import encode_image

from ._harness import ensure_slide
from ._servers import cli_server
from .extract import SPECS

BODY = {"strategy": "grid", "patch_size_px": 256}
FIRST = {"strategy": "grid", "patch_size_px": 224, "target_mpp": 0.5}
FORMS = ("raw", "jpeg", "png")


def in_process(path: Path, encode: bool) -> tuple[int, float]:
    from api.schemas import PatchRequest

    with open_slide(path) as s:
        t = time.perf_counter()
        plan = make_plan(s, PatchRequest(**BODY).to_params())  # type: ignore[arg-type]
        n = 0
        with ThreadPoolExecutor(2) as pool:
            for batch in Extractor(s, plan).iter_batches():
                if encode:
                    list(pool.map(encode_image, batch.images))
                n += len(batch)
        return n, time.perf_counter() - t


def over_http(url: str, sid: str, body: dict[str, object]) -> tuple[int, float, float]:
    """(patches, seconds, seconds to the first complete patch)."""
    t = time.perf_counter()
    first = None
    n = 0
    with httpx.stream("POST", f"{url}/v1/slides/{sid}/patches", json=body, timeout=600) as r:
        r.raise_for_status()
        total = int(r.headers["x-patch-count"])
        head = b""
        need = None  # bytes up to the end of the first member (its header says its size)
        for chunk in r.iter_bytes():
            if first is None:
                head += chunk
                if need is None and len(head) >= 512:
                    info = tarfile.TarInfo.frombuf(head[:512], "utf-8", "surrogateescape")
                    need = 512 + info.size
                if need is not None and len(head) >= need:
                    first = time.perf_counter() - t
        n = total
    return n, time.perf_counter() - t, first or 0.0


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
        raw = [in_process(path, encode=False) for _ in range(args.repeats + 1)][1:]
        enc = [in_process(path, encode=True) for _ in range(args.repeats + 1)][1:]
        with cli_server(["serve"], "/readyz", env=env) as url:
            ids = {i["name"]: i["id"] for i in httpx.get(f"{url}/v1/slides").json()["items"]}
            http = {form: [over_http(url, ids["big.svs"], BODY | {"image_format": form})
                           for _ in range(args.repeats + 1)][1:] for form in FORMS}
            first = {form: [over_http(url, ids["demo.svs"], FIRST | {"image_format": form})[2]
                            for _ in range(args.repeats + 1)][1:] for form in FORMS}
    n = raw[0][0]
    r_raw = n / statistics.median(s for _, s in raw)
    r_enc = n / statistics.median(s for _, s in enc)
    print(f"\n{n} patches of 256 px (native) from the 40,000 x 30,000 slide\n")
    print("| path | patches/s | ÷ in-process extractor | first patch (demo slide) |\n"
          "|---|---:|---:|---:|")
    print(f"| in-process extractor | {r_raw:,.0f} | 1.00 | |")
    print(f"| in-process extractor + PNG encoding | {r_enc:,.0f} | {r_enc / r_raw:.2f} | |")
    for form in FORMS:
        rate = n / statistics.median(s for _, s, _ in http[form])
        ttfp = statistics.median(first[form]) * 1000
        print(f"| HTTP tar stream ({form}) | {rate:,.0f} | {rate / r_raw:.2f} | "
              f"{ttfp:.0f} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
