"""Stain normalisation speed: patches/s per method, NumPy (one thread, per patch) and torch
batched (this machine's CPU threads; a GPU when there is one).

The patches are real: 224 px at 0.5 µm/px from the shared CMU-1-Small-Region slide (or any
slide given), repeated to ``--patches``. Each row is the median of ``--repeats`` runs after
a warm-up. slideflow's published figures (A100 + Threadripper): Macenko ~900 img/s,
Reinhard ~4,200 img/s. 

Run: ``python -m benchmarks.stain`` (``--device cuda`` on a GPU machine).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from wsi_sampler import Extractor, PlanParams, make_plan, open_slide
from wsi_sampler.stain import StainNormalizer

from ._harness import machine

SHARED_SLIDE = Path(__file__).resolve().parents[1].parent / "shared/slides/CMU-1-Small-Region.svs"


def real_patches(slide_path: Path, n: int) -> np.ndarray:
    """``n`` tissue patches (224 px at 0.5 µm/px), the slide's own repeated as needed."""
    with open_slide(slide_path) as slide:
        plan = make_plan(slide, PlanParams(strategy="random", n_patches=64, seed=0,
                                           patch_size_px=224, min_tissue_fraction=0.5,
                                           target_mpp=max(0.5, slide.mpp[0])))
        patches = np.concatenate([b.images for b in Extractor(slide, plan).iter_batches()])
    return np.ascontiguousarray(np.resize(patches, (n, *patches.shape[1:])))


def _median_rate(fn: Any, n: int, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n / statistics.median(times)


def stain_rates(patches: np.ndarray, device: str, repeats: int = 3) -> list[dict[str, Any]]:
    """One row per (method, implementation): patches/s on these patches."""
    import torch

    from wsi_sampler.stain_torch import TorchStainNormalizer

    rows = []
    reference = patches[0]
    for method in ("macenko", "vahadane", "reinhard"):
        normalizer = StainNormalizer(method, reference if method == "reinhard" else None)
        few = np.ascontiguousarray(patches[: 32 if method == "vahadane" else 128])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            rate = _median_rate(partial(normalizer, few), len(few), repeats)
        finally:
            torch.set_num_threads(threads)
        rows.append({"method": method, "implementation": "numpy, 1 thread",
                     "patches_per_s": round(rate, 1)})
        batched = partial(_synchronised, TorchStainNormalizer(normalizer, device), patches)
        rows.append({"method": method, "implementation": f"torch batched, {device}",
                     "patches_per_s": round(_median_rate(batched, len(patches), repeats), 1)})
    return rows


def _synchronised(normalizer: Any, patches: np.ndarray) -> None:
    import torch

    normalizer(patches)
    if normalizer.device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, default=SHARED_SLIDE)
    parser.add_argument("--patches", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = stain_rates(real_patches(args.slide, args.patches), args.device, args.repeats)
    print(f"# {machine()}; `python -m benchmarks.stain --patches {args.patches} --device "
          f"{args.device}`\n")
    print("| method | implementation | patches/s (224 px) |\n|---|---|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['implementation']} | {r['patches_per_s']:,.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
