"""Patches over HTTP: streamed tar vs the in-process extractor, and time to first patch.

Run ``python -m benchmarks.api``. The service runs as its own process (``wsi-sampler
serve``) over a folder holding the ``make run`` demo slide (12,000 x 9,000); the client
reads the WebDataset tar as it streams. In-process baselines: the extractor alone, and the
extractor plus the same PNG encoding the stream does. Goals: >= 0.8 x in-process, first
patch < 300 ms.
"""

from __future__ import annotations

import argparse
import statistics
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from wsi_sampler import Extractor, make_plan, open_slide
from wsi_sampler.demo import write_demo_slide
from wsi_sampler.export import encode_image

from ._servers import cli_server

BODY = {"strategy": "grid", "patch_size_px": 224, "target_mpp": 0.5}


def in_process(path: Path, encode: bool) -> tuple[int, float]:
    from api.schemas import PatchRequest

    with open_slide(path) as s:
        plan = make_plan(s, PatchRequest(**BODY).to_params())  # type: ignore[arg-type]
        t = time.perf_counter()
        n = 0
        with ThreadPoolExecutor(2) as pool:
            for batch in Extractor(s, plan).iter_batches():
                if encode:
                    list(pool.map(encode_image, batch.images))
                n += len(batch)
        return n, time.perf_counter() - t


def over_http(url: str, sid: str) -> tuple[int, float, float]:
    """(patches, seconds, seconds to the first complete patch)."""
    t = time.perf_counter()
    first = None
    n = 0
    with httpx.stream("POST", f"{url}/v1/slides/{sid}/patches", json=BODY, timeout=600) as r:
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
        path = write_demo_slide(slides / "demo.svs")
        env = {"WSI_SLIDE_ROOTS": f'["{slides}"]', "WSI_DATA_DIR": str(Path(tmp) / "data"),
               "WSI_DEMO_SLIDE": "false", "WSI_DEVICE": "cpu"}
        raw = [in_process(path, encode=False) for _ in range(args.repeats + 1)][1:]
        enc = [in_process(path, encode=True) for _ in range(args.repeats + 1)][1:]
        with cli_server(["serve"], "/readyz", env=env) as url:
            sid = httpx.get(f"{url}/v1/slides").json()["items"][0]["id"]
            http = [over_http(url, sid) for _ in range(args.repeats + 1)][1:]
    n = raw[0][0]
    r_raw = n / statistics.median(s for _, s in raw)
    r_enc = n / statistics.median(s for _, s in enc)
    r_http = n / statistics.median(s for _, s, _ in http)
    ttfp = statistics.median(f for _, _, f in http) * 1000
    print(f"\n{n} patches of 224 px at 0.5 µm/px from the 12,000 x 9,000 demo slide\n")
    print("| path | patches/s | HTTP ÷ this |\n|---|---:|---:|")
    print(f"| in-process extractor | {r_raw:,.0f} | {r_http / r_raw:.2f} |")
    print(f"| in-process extractor + PNG encoding | {r_enc:,.0f} | {r_http / r_enc:.2f} |")
    print(f"| HTTP tar stream (PNG) | {r_http:,.0f} | 1.00 |")
    print(f"\ntime to first patch over HTTP: {ttfp:.0f} ms (median of {args.repeats})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
