"""Patches over HTTP: streamed tar vs the in-process extractor, and time to first patch.

Run ``python -m benchmarks.api``. The service runs as its own process (``wsi-sampler
serve``); the client reads the WebDataset tar as it streams. Throughput: every tissue patch
(256 px, native resolution) of the 40,000 x 30,000 benchmark slide; in-process baselines,
timed from the plan like the request: the extractor alone, and the extractor plus the same
PNG encoding the stream does. Time to first patch: the ``make run`` demo slide
(12,000 x 9,000). Goals: >= 0.8 x in-process, first patch < 300 ms.
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
from wsi_sampler.export import encode_image

from ._harness import ensure_slide
from ._servers import cli_server
from .extract import SPECS

BODY = {"strategy": "grid", "patch_size_px": 256}
FIRST = {"strategy": "grid", "patch_size_px": 224, "target_mpp": 0.5}


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
            http = [over_http(url, ids["big.svs"], BODY) for _ in range(args.repeats + 1)][1:]
            first = [over_http(url, ids["demo.svs"], FIRST)[2] for _ in range(args.repeats + 1)]
    n = raw[0][0]
    r_raw = n / statistics.median(s for _, s in raw)
    r_enc = n / statistics.median(s for _, s in enc)
    r_http = n / statistics.median(s for _, s, _ in http)
    ttfp = statistics.median(first[1:]) * 1000
    print(f"\n{n} patches of 256 px (native) from the 40,000 x 30,000 slide\n")
    print("| path | patches/s | HTTP ÷ this |\n|---|---:|---:|")
    print(f"| in-process extractor | {r_raw:,.0f} | {r_http / r_raw:.2f} |")
    print(f"| in-process extractor + PNG encoding | {r_enc:,.0f} | {r_http / r_enc:.2f} |")
    print(f"| HTTP tar stream (PNG) | {r_http:,.0f} | 1.00 |")
    print(f"\ntime to first patch over HTTP, demo slide: {ttfp:.0f} ms "
          f"(median of {args.repeats})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
