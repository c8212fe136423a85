"""The same plan read from a local file, over HTTP (nginx), from S3 (moto) and from a
DICOMweb PACS (Orthanc), side by side: patches/s, bytes fetched, requests.

Run ``python -m benchmarks.remote`` (needs ``make system-deps`` and ``make tools``). The
servers run on loopback, so the numbers show what our side costs (requests, parsing,
decoding), not a network: a real link adds its round trips and bandwidth. Each run opens
the slide afresh (the shared header and DICOMweb series caches cleared), so metadata is
fetched every time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from wsi_sampler import Extractor, PlanParams, Slide, make_plan, open_slide
from wsi_sampler.demo import DemoSlideSpec
from wsi_sampler.sources.dicomweb import forget_open_series
from wsi_sampler.sources.remote_tiff import forget_shared_files

from ._harness import ensure_slide

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _remote_servers import (  # noqa: E402 - the tests' real servers, started the same way
    ORTHANC_PASSWORD,
    ORTHANC_USER,
    S3_ENV,
    dicomize,
    moto_s3,
    nginx,
    orthanc,
)

SPEC = DemoSlideSpec(width=32_768, height=24_576, mpp=0.25, seed=11, n_blobs=7,
                     tissue_scale=1.4, pen=False, artefact=False)
PLANS = {
    "grid 224 px @ 0.5 µm/px": PlanParams(patch_size_px=224, target_mpp=0.5),
    "random 64 x 224 px @ 0.25 µm/px": PlanParams(strategy="random", n_patches=64,
                                                  patch_size_px=224, target_mpp=0.25, seed=1),
}


def tile_bytes(local: Slide, params: PlanParams) -> tuple[int, int]:
    """(patches, stored bytes of the tiles they touch) from the local file's tables."""
    plan = make_plan(local, params)
    source = local.tile_source()
    assert source is not None
    lv, ds = source.levels[plan.level], plan.downsample
    size = round(plan.width0 / ds)
    keys = {k for x, y in zip(plan.x0.tolist(), plan.y0.tolist(), strict=True)
            for k in source.tiles_for_box(plan.level, int(x // ds), int(y // ds), size, size)}
    return len(plan), sum(int(lv.bytecounts[ty * lv.tiles_across + tx]) for tx, ty in keys)


def one_run(location: str, params: PlanParams) -> tuple[float, float, dict[str, int]]:
    """(open s, plan + extract s, io stats of the run)."""
    forget_open_series()
    forget_shared_files()
    t = time.perf_counter()
    with open_slide(location) as slide:
        opened = time.perf_counter() - t
        t = time.perf_counter()
        plan = make_plan(slide, params)
        for _ in Extractor(slide, plan).iter_batches():
            pass
        work = time.perf_counter() - t
        return opened, work, slide.io_stats() or {"requests": 0, "bytes_fetched": 0}


def measure(location: str, params: PlanParams, repeats: int) -> tuple[float, float, dict[str, int]]:
    one_run(location, params)  # warm up (imports, connection pools, the server's caches)
    runs = [one_run(location, params) for _ in range(repeats)]
    return (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs),
            runs[-1][2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    slide = ensure_slide("remote", SPEC)
    with tempfile.TemporaryDirectory() as tmp, open_slide(slide) as local:
        work = Path(tmp)
        (work / "www").mkdir()
        shutil.copy(slide, work / "www" / "slide.svs")
        w, h = local.dimensions
        with nginx(work / "www", work / "nginx") as web, moto_s3() as s3, \
                orthanc(work / "pacs") as pacs:
            os.environ.update(S3_ENV, AWS_ENDPOINT_URL_S3=s3,
                              WSI_DICOMWEB_USERNAME=ORTHANC_USER,
                              WSI_DICOMWEB_PASSWORD=ORTHANC_PASSWORD)
            import s3fs

            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir("bench")
            fs.put(str(slide), "bench/slide.svs")
            study, series = dicomize(pacs, slide, work, width_mm=w * SPEC.mpp / 1000,
                                     height_mm=h * SPEC.mpp / 1000, label="bench")
            sources = {"local file": str(slide), "HTTP (nginx)": f"{web.url}/slide.svs",
                       "S3 (moto)": "s3://bench/slide.svs",
                       "DICOMweb (Orthanc)": pacs.series_url(study, series)}
            report(local, sources, args.repeats, w, h)


def report(local: Slide, sources: dict[str, str], repeats: int, w: int, h: int) -> None:
    print(f"slide {w} x {h} px at {SPEC.mpp} µm/px, {repeats} runs each (median), loopback")
    for title, params in PLANS.items():
        n, needed = tile_bytes(local, params)
        print(f"\n{title}: {n} patches, their tiles {needed / 2**20:.2f} MiB stored")
        print(f"{'source':22} {'open s':>7} {'patches/s':>10} {'x local':>8} {'MiB fetched':>12}"
              f" {'/ tiles':>8} {'requests':>9}")
        base: Callable[[float], float] | None = None
        for name, location in sources.items():
            opened, secs, stats = measure(location, params, repeats)
            rate = n / secs
            base = base or (lambda r, local_rate=rate: r / local_rate)
            fetched = stats["bytes_fetched"]
            ratio = f"{fetched / needed:.2f}" if fetched else "-"
            print(f"{name:22} {opened:7.2f} {rate:10,.0f} {base(rate):8.2f} "
                  f"{fetched / 2**20:12.2f} {ratio:>8} {stats['requests']:9,}")


if __name__ == "__main__":
    main()
