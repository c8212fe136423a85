"""Patch extraction, side by side: ours vs the JPEG decode floor, openslide, tiffslide, fastslide.

Run ``python -m benchmarks.extract`` (or ``make bench``). Slides are generated once into
``benchmarks/_slides/``. Every contestant runs in its own process (so peak RSS is its own),
on the same slide, the same patches and a warm page cache; times are medians of
``--repeats`` runs after one warm-up. Workloads (see issue "Fast patch extraction"):

- A: every tissue patch, 256 px at level-0 resolution, 40,000 x 30,000 JPEG pyramid;
- B: 224 px at 0.5 µm/px from the 0.25 µm/px slide (reads 448 px, resamples);
- C: the ``medgemma`` preset at 5x, 10x and 20x (896 px, <= 126 patches);
- D: a 100,000 x 80,000 slide: memory, tissue + planning time, and growth with tissue area.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsi_sampler import Extractor, PlanParams, make_plan, medgemma_params, open_slide
from wsi_sampler.demo import DemoSlideSpec
from wsi_sampler.extract import default_threads

from ._harness import (
    Row,
    ensure_slide,
    machine,
    median_seconds,
    run_isolated,
    table,
    warm_page_cache,
)

SPECS = {
    "A": DemoSlideSpec(width=40_000, height=30_000, mpp=0.25, seed=7, n_blobs=6,
                       pen=False, artefact=False),
    "D": DemoSlideSpec(width=100_000, height=80_000, mpp=0.25, seed=8, n_blobs=12,
                       pen=False, artefact=False),
}


# -- jobs: the patches every contestant reads ------------------------------------------
def plan_job(path: Path, params: PlanParams) -> dict[str, Any]:
    with open_slide(path) as s:
        plan = make_plan(s, params)
    ds = plan.downsample
    return {
        "params": params, "plan": plan, "x0": plan.x0, "y0": plan.y0, "level": plan.level,
        "downsample": ds,
        "region": (max(1, round(plan.width0 / ds)), max(1, round(plan.height0 / ds))),
        "out": plan.patch_size_px, "n": len(plan),
    }


def _each(fn: Callable[[Any], Any], items: list[Any], threads: int, *, chunksize: int) -> None:
    """Call ``fn`` on every item, in this thread or in a pool of ``threads``."""
    if threads == 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(fn, items, chunksize=chunksize):
            pass


def _finish(region: np.ndarray, job: dict[str, Any]) -> np.ndarray:
    """What every loop contestant does after reading: RGB, resampled to the output size."""
    rgb = region[:, :, :3]
    out = job["out"]
    if rgb.shape[:2] == (out, out):
        return rgb
    return cv2.resize(rgb, (out, out), interpolation=cv2.INTER_AREA)


# -- contestants (each runs in a child process) ----------------------------------------
# Every contestant opens the slide inside each timed run, so no run profits from a cache
# warmed by the previous one (openslide and fastslide keep tile caches per handle).


def c_ours(path: Path, job: dict[str, Any], threads: int, repeats: int,
           dct_scaling: bool = True) -> dict[str, Any]:
    plan = job["plan"]  # planned in the parent, like every contestant's patch list
    with open_slide(path) as s:
        probe = Extractor(s, plan, dct_scaling=dct_scaling)
        note = f"{probe.path_name} path" + (
            f", tiles decoded at 1/{probe.dct_scale}" if probe.dct_scale > 1 else "")

    def run() -> int:
        with open_slide(path) as s:
            return sum(len(b) for b in Extractor(s, plan, threads=threads,
                                                 dct_scaling=dct_scaling).iter_batches())

    n, sec = median_seconds(run, repeats)
    return {"patches": n, "seconds": sec, "note": note}


def c_ours_exact(path: Path, job: dict[str, Any], threads: int, repeats: int
                 ) -> dict[str, Any]:
    """Ours with dct_scaling=False: whole tiles decoded, then area-averaged."""
    return c_ours(path, job, threads, repeats, dct_scaling=False)


def _floor_blobs(path: Path, job: dict[str, Any]) -> tuple[Any, list[bytes]]:
    """The level's description and the stored bytes of every tile the patches touch."""
    with open_slide(path) as s:
        src = s.tile_source()
        assert src is not None
        level = job["level"]
        lv = src.levels[level]
        rw, rh = job["region"]
        keys = sorted({
            k for x, y in zip(job["x0"].tolist(), job["y0"].tolist(), strict=True)
            for k in src.tiles_for_box(level, int(x // job["downsample"]),
                                       int(y // job["downsample"]), rw, rh)
        })
        fd = os.open(path, os.O_RDONLY)
        blobs = []
        for tx, ty in keys:
            i = ty * lv.tiles_across + tx
            blobs.append(os.pread(fd, int(lv.bytecounts[i]), int(lv.offsets[i])))
        os.close(fd)
    return lv, blobs


def c_floor(path: Path, job: dict[str, Any], threads: int, repeats: int) -> dict[str, Any]:
    """Decode each stored tile the patches touch, once, from bytes already in memory."""
    import imagecodecs

    lv, blobs = _floor_blobs(path, job)

    def decode(b: bytes) -> Any:
        return imagecodecs.jpeg8_decode(b, tables=lv.jpeg_tables, colorspace=lv.jpeg_colorspace,
                                        outcolorspace=lv.jpeg_outcolorspace)

    def run() -> int:
        _each(decode, blobs, threads, chunksize=16)
        return job["n"]

    n, sec = median_seconds(run, repeats)
    note = f"{len(blobs)} tiles, {len(blobs) / sec:,.0f} tiles/s"
    return {"patches": n, "seconds": sec, "note": note}


def c_floor_half(path: Path, job: dict[str, Any], threads: int, repeats: int
                 ) -> dict[str, Any]:
    """The same tiles decoded at 1/2 by libjpeg-turbo's scaled inverse DCT (OpenCV's reduced
    read, the level's tables spliced in): the floor of any reader that decodes at 1/2."""
    from wsi_sampler._tiles import jpeg_stream

    lv, blobs = _floor_blobs(path, job)
    streams = [np.frombuffer(jpeg_stream(lv, b), np.uint8) for b in blobs]
    flags = cv2.IMREAD_REDUCED_COLOR_2

    def decode(stream: np.ndarray) -> Any:
        return cv2.imdecode(stream, flags)

    def run() -> int:
        _each(decode, streams, threads, chunksize=16)
        return int(job["n"])

    n, sec = median_seconds(run, repeats)
    note = f"{len(blobs)} tiles at 1/2, {len(blobs) / sec:,.0f} tiles/s"
    return {"patches": n, "seconds": sec, "note": note}


def c_fidelity(path: Path, job: dict[str, Any], threads: int, repeats: int
               ) -> dict[str, Any]:
    """|DCT-scaled path - exact path| over every patch of the plan: mean, 99.9 %, max."""
    plan = job["plan"]
    with open_slide(path) as s:
        diffs = [
            np.abs(fast.images.astype(np.int16) - exact.images.astype(np.int16))
            for fast, exact in zip(Extractor(s, plan, threads=threads).iter_batches(),
                                   Extractor(s, plan, threads=threads,
                                             dct_scaling=False).iter_batches(), strict=True)
        ]
    d = np.concatenate([x.ravel() for x in diffs])
    return {"mean": float(d.mean()), "p999": float(np.percentile(d, 99.9)),
            "max": int(d.max())}


def _loop(
    open_reader: Callable[[], Any], read: Callable[[Any, int, int], np.ndarray],
    job: dict[str, Any], threads: int, repeats: int,
) -> dict[str, Any]:
    """``read_region`` per patch on one handle, in this thread or a pool of ``threads``
    (openslide and tiffslide handles are safe to share between threads)."""
    coords = list(zip(job["x0"].tolist(), job["y0"].tolist(), strict=True))
    handle: Any = None

    def one(xy: tuple[int, int]) -> np.ndarray:
        return _finish(read(handle, *xy), job)

    def run() -> int:
        nonlocal handle
        with open_reader() as handle:
            _each(one, coords, threads, chunksize=8)
        return len(coords)

    n, sec = median_seconds(run, repeats)
    return {"patches": n, "seconds": sec,
            "note": "read_region loop" + (f", {threads} threads" if threads > 1 else "")}


def c_openslide(path: Path, job: dict[str, Any], threads: int, repeats: int) -> dict[str, Any]:
    import openslide

    level, size = job["level"], job["region"]
    return _loop(lambda: openslide.OpenSlide(str(path)),
                 lambda s, x, y: np.asarray(s.read_region((x, y), level, size)), job, threads,
                 repeats)


def c_tiffslide(path: Path, job: dict[str, Any], threads: int, repeats: int) -> dict[str, Any]:
    import tiffslide

    level, size = job["level"], job["region"]
    return _loop(lambda: tiffslide.TiffSlide(path),
                 lambda s, x, y: s.read_region((x, y), level, size, as_array=True), job,
                 threads, repeats)


def c_fastslide(path: Path, job: dict[str, Any], threads: int, repeats: int) -> dict[str, Any]:
    import fastslide

    level, size, ds = job["level"], job["region"], job["downsample"]
    coords = [(int(x // ds), int(y // ds)) for x, y in zip(job["x0"], job["y0"], strict=True)]
    s: Any = None

    def one(xy: tuple[int, int]) -> np.ndarray:
        return _finish(np.asarray(s.read_region(xy, level, size).numpy()), job)

    def run() -> int:
        nonlocal s
        # The same tile-cache budget as ours (256 MiB), so neighbours share decoded tiles.
        s = fastslide.FastSlide.from_file_path(str(path), cache=256 * 2**20)
        _each(one, coords, threads, chunksize=8)
        return len(coords)

    n, sec = median_seconds(run, repeats)
    return {"patches": n, "seconds": sec, "note": "read_region, level-native coords"}


def c_plan_time(path: Path, job: dict[str, Any], threads: int, repeats: int) -> dict[str, Any]:
    """Tissue detection + planning, from an open slide (median of repeats, cold each time)."""
    times = []
    for _ in range(repeats + 1):
        with open_slide(path) as s:
            t = time.perf_counter()
            plan = make_plan(s, job["params"])
            times.append(time.perf_counter() - t)
    return {"patches": len(plan), "seconds": statistics.median(times[1:]),
            "note": "tissue detection + plan"}


CONTESTANTS: dict[str, Callable[..., dict[str, Any]]] = {
    "decode floor": c_floor, "decode floor 1/2": c_floor_half, "openslide": c_openslide,
    "tiffslide": c_tiffslide,
    "fastslide": c_fastslide, "wsi-sampler": c_ours, "wsi-sampler exact": c_ours_exact,
}


# -- workloads ------------------------------------------------------------------------------
Workload = tuple[str, str, PlanParams, list[tuple[str, int]]]
"""(label, slide name, plan parameters, [(contestant, threads)])."""


def workloads(names: set[str], full_threads: int) -> list[Workload]:
    all_of = [("decode floor", 1), ("decode floor", full_threads), ("openslide", 1),
              ("openslide", full_threads), ("tiffslide", 1), ("tiffslide", full_threads),
              ("fastslide", 1), ("fastslide", full_threads), ("wsi-sampler", full_threads)]
    lean = [("decode floor", full_threads), ("fastslide", full_threads),
            ("wsi-sampler", full_threads)]
    out = []
    if "A" in names:
        out.append(("A", "A", PlanParams(patch_size_px=256), all_of))
    if "B" in names:
        out.append(("B", "A", PlanParams(patch_size_px=224, target_mpp=0.5),
                    [*all_of, ("decode floor 1/2", 1), ("decode floor 1/2", full_threads),
                     ("wsi-sampler exact", full_threads)]))
    if "C" in names:  # on the large slide: at 20x and 10x the 126-patch cap is what binds
        for mag in (5.0, 10.0, 20.0):
            out.append((f"C {mag:g}x", "D", medgemma_params(magnification=mag), all_of))
    if "D" in names:
        out.append(("D", "D", PlanParams(patch_size_px=256), lean))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="A,B,C,D", help="comma-separated subset of A,B,C,D")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contestant")
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="N for the N-thread runs (default: all cores)")
    parser.add_argument("--results", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    names = {w.strip().upper() for w in args.workloads.split(",")}
    rows: list[Row] = []
    ours: dict[str, float] = {}
    fidelity: dict[str, Any] = {}
    for label, slide_name, params, contestants in workloads(names, args.threads):
        path = ensure_slide(slide_name, SPECS[slide_name])
        warm_page_cache(path)
        job = plan_job(path, params)
        repeats = 1 if label == "D" else args.repeats
        print(f"\nworkload {label}: {job['n']} patches, {job['region'][0]} px read at level "
              f"{job['level']} -> {job['out']} px", flush=True)
        if label in ("A", "D") or label.startswith("C"):
            res = run_isolated(c_plan_time, path, job, 1, 3 if label == "A" else 1)
            rows.append(Row(label, "tissue + plan", 1, res.get("patches", 0),
                            res.get("seconds", float("nan")), res.get("peak_rss_mib", 0),
                            res.get("note", res.get("error", ""))))
            print(f"  tissue + plan: {res.get('seconds', float('nan')):.3f} s", flush=True)
        for name, threads in contestants:
            res = run_isolated(CONTESTANTS[name], path, job, threads, repeats)
            if "error" in res:
                print(f"  {name} ({threads}t): failed: {res['error']}", flush=True)
                continue
            row = Row(label, name, threads, res["patches"], res["seconds"], res["peak_rss_mib"],
                      res["note"])
            rows.append(row)
            if name == "wsi-sampler":
                ours[label] = row.rate
            print(f"  {name:13s} {threads:2d}t {row.rate:9,.0f} patches/s  "
                  f"peak RSS {row.peak_rss_mib:6,.0f} MiB  {row.note}", flush=True)
        if label == "B":
            fidelity = run_isolated(c_fidelity, path, job, args.threads, 1)
    text = table([r for r in rows if r.contestant != "tissue + plan"], ours)
    plan_rows = [r for r in rows if r.contestant == "tissue + plan"]
    summary = "\n".join(
        f"- tissue detection + planning, workload {r.workload}: {r.seconds:.2f} s, "
        f"peak RSS {r.peak_rss_mib:,.0f} MiB ({r.patches} patches planned)" for r in plan_rows
    )
    target_text = targets(rows, ours, fidelity)
    print("\n" + text + "\n\n" + summary + "\n\n" + target_text)
    if args.results:
        write_results(args.results, text, summary, target_text, args)
    return 0


def targets(rows: list[Row], ours: dict[str, float], fidelity: dict[str, Any]) -> str:
    def rate(workload: str, contestant: str, threads: int) -> float:
        for r in rows:
            if (r.workload, r.contestant, r.threads) == (workload, contestant, threads):
                return r.rate
        return float("nan")

    n = max((r.threads for r in rows), default=1)
    lines = [f"Targets (every ratio against a contestant on the same {n} threads):"]
    if "A" in ours:
        lines.append(f"- A: ours / decode floor = "
                     f"{ours['A'] / rate('A', 'decode floor', n):.2f} (target >= 0.8)")
        lines.append(f"- A: ours / fastslide = "
                     f"{ours['A'] / rate('A', 'fastslide', n):.2f} (target >= 1.1), "
                     f"/ openslide {ours['A'] / rate('A', 'openslide', n):.2f}, "
                     f"/ tiffslide {ours['A'] / rate('A', 'tiffslide', n):.2f}")
    if "B" in ours:
        lines.extend(_b_lines(rate, ours["B"], n, fidelity))
    for r in rows:
        if r.workload == "D" and r.contestant == "wsi-sampler":
            lines.append(f"- D: peak RSS {r.peak_rss_mib:,.0f} MiB (target < 1536)")
        if r.workload == "D" and r.contestant == "tissue + plan":
            lines.append(f"- D: tissue + plan {r.seconds:.2f} s (target < 1 s)")
    return "\n".join(lines)


def _b_lines(rate: Callable[[str, str, int], float], ours_b: float, n: int,
             fidelity: dict[str, Any]) -> list[str]:
    """Workload B's two paths, each against the floor of the same kind of decode."""
    exact = rate("B", "wsi-sampler exact", n)
    full, half = rate("B", "decode floor", n), rate("B", "decode floor 1/2", n)
    pixels = (f"mean {fidelity['mean']:.2f}, 99.9 % within {fidelity['p999']:.0f}, "
              f"max {fidelity['max']}" if "mean" in fidelity else "not measured")
    return [
        f"- B, exact path (full decode + area averaging): ours / full-decode floor = "
        f"{exact / full:.2f} (target >= 0.8)",
        f"- B, default path (tiles decoded at 1/2 by the scaled DCT): ours / 1/2-decode "
        f"floor = {ours_b / half:.2f}; ours / full-decode floor = {ours_b / full:.2f} "
        f"(different work: the floor decodes 4x the pixels)",
        f"- B, default vs exact path, |difference| in 8-bit levels over every patch: {pixels}",
    ]


BEGIN, END = "<!-- benchmarks.extract: begin -->", "<!-- benchmarks.extract: end -->"


def write_results(path: Path, text: str, summary: str, target_text: str, args: Any) -> None:
    """Write this run's section of ``path``: between its markers where the file has them
    (the other benchmarks' sections stay as they are), else the whole file."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"{BEGIN}\n## Extraction (`benchmarks.extract`)\n\n{stamp}; {machine()}.\n\n"
        f"Reproduce: `python -m benchmarks.extract --workloads {args.workloads} --repeats "
        f"{args.repeats} --threads {args.threads}` (or `make bench`).\n\n{text}\n\n"
        f"{summary}\n\n{target_text}\n{END}"
    )
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        path.write_text(head + section + rest.split(END, 1)[1])
    else:
        path.write_text(f"# Benchmark results\n\n{section}\n")


if __name__ == "__main__":
    raise SystemExit(main())
