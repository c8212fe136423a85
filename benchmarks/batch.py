"""Batch scoring: slides/hour local vs Dask, and the batch layer's overhead.

Run ``python -m benchmarks.batch``. A folder of generated 16,384 x 12,288 slides is scored
with the built-in model (grid at the model's 224 px / 0.5 µm/px). "Bare pipeline" is the
same work with no batch layer: open, plan, extract, infer, one slide after another, no
files written. Goal: batch overhead < 10 % (local executor, one slide at a time).

``--cohort 50``: a cohort of generated slides of mixed sizes (2k to 30k px a side, cached in
benchmarks/_slides/cohort/), scored locally and on a Dask LocalCluster with 2 workers:
slides/hour, and how a slide's time grows with its tissue area (patches scored): a
least-squares line through (patches, seconds) per slide, with its R².
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np

from wsi_sampler import PlanParams, open_slide
from wsi_sampler.batch import BatchConfig, discover, run_batch
from wsi_sampler.demo import DemoSlideSpec, write_demo_slide
from wsi_sampler.models import load_model
from wsi_sampler.scoring import score_slide
from wsi_sampler.worker import InProcessWorker

from ._harness import SLIDE_DIR


def SPEC(seed: int) -> DemoSlideSpec:  # noqa: N802 - reads like a constant
    return DemoSlideSpec(width=16_384, height=12_288, seed=seed, n_blobs=6, tissue_scale=1.4,
                         pen=False, artefact=False)


def bare(folder: Path) -> float:
    t = time.perf_counter()  # loading the model counts: the batch run loads it too
    worker = InProcessWorker(load_model("tissue-qc", device="cpu"))
    for task in discover(folder).slides:
        with open_slide(task.path) as slide:
            score_slide(slide, PlanParams(), worker)
    return time.perf_counter() - t


def batch(folder: Path, out: Path, executor: str, workers: int) -> float:
    t = time.perf_counter()
    report = run_batch(folder, out, BatchConfig(device="cpu"), executor=executor,  # type: ignore[arg-type]
                       workers=workers, resume=False)
    assert not report.failures, report.failures
    return time.perf_counter() - t


def cohort_folder(n: int) -> Path:
    """``n`` generated slides of mixed sizes (seeded), made once."""
    folder = SLIDE_DIR / f"cohort-{n}"
    rng = np.random.default_rng(50)
    for i in range(n):
        path = folder / f"case-{i:03d}.svs"
        w = int(rng.integers(2_048, 30_000))
        h = int(w * rng.uniform(0.6, 1.0))
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            write_demo_slide(path, DemoSlideSpec(width=w, height=h, seed=i, n_blobs=4,
                                                 tissue_scale=float(rng.uniform(0.6, 1.6)),
                                                 pen=False, artefact=False))
    return folder


def cohort(n: int) -> int:
    folder = cohort_folder(n)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for executor, workers in (("local", 2), ("dask", 2)):
            out = Path(tmp) / executor
            sec = batch(folder, out, executor, workers)
            with (out / "summary.csv").open() as fh:
                per_slide = [(int(r["patches"]), float(r["seconds"])) for r in csv.DictReader(fh)]
            patches, seconds = np.array(per_slide, dtype=float).T
            slope, icept = np.polyfit(patches, seconds, 1)
            r2 = 1 - ((seconds - (slope * patches + icept)) ** 2).sum() / (
                (seconds - seconds.mean()) ** 2).sum()
            rows.append((executor, workers, sec, int(patches.sum()), slope, icept, r2))
    print(f"\ncohort of {n} slides (2k-30k px a side), tissue-qc, grid 224 px at 0.5 µm/px\n")
    print("| executor | in flight | seconds | slides/hour | patches | s per 1k patches "
          "(slope) | s per slide (intercept) | R² |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for ex, w, sec, total, slope, icept, r2 in rows:
        print(f"| {ex} | {w} | {sec:.0f} | {n / sec * 3600:,.0f} | {total:,} | "
              f"{slope * 1000:.2f} | {icept:.2f} | {r2:.3f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--cohort", type=int, help="score a generated cohort of this size")
    args = parser.parse_args(argv)
    if args.cohort:
        return cohort(args.cohort)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "slides"
        folder.mkdir()
        for seed in range(args.slides):
            write_demo_slide(folder / f"slide-{seed}.svs", SPEC(seed))
        rows = [("bare pipeline (no batch layer)", bare(folder))]
        for executor, workers in (("local", 1), ("local", 2), ("dask", 2)):
            out = Path(tmp) / f"out-{executor}-{workers}"
            rows.append((f"{executor}, {workers} slide(s) in flight"
                         + (" (LocalCluster start included)" if executor == "dask" else ""),
                         batch(folder, out, executor, workers)))
    base = rows[0][1]
    print(f"\n{args.slides} slides of 16,384 x 12,288, tissue-qc, grid 224 px at 0.5 µm/px\n")
    print("| run | seconds | slides/hour | time ÷ bare |\n|---|---:|---:|---:|")
    for label, sec in rows:
        print(f"| {label} | {sec:.1f} | {args.slides / sec * 3600:,.0f} | {sec / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
