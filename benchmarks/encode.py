"""Slide file to feature bag: wsi-sampler vs a CLAM/TRIDENT-style pipeline, same patches.

Run ``python -m benchmarks.encode``. On the 40k x 30k benchmark slide (0.25 µm/px JPEG
pyramid), the same N random tissue patches (224 px at 0.5 µm/px) go through a ViT-S/16 and
a ResNet-50 with random weights (speed does not depend on the weights), from the slide file
to a features h5:

- **wsi-sampler**: ``score_slide`` (plan, extraction in parallel threads overlapping the
  model, features.h5);
- **CLAM-style**: what CLAM's ``extract_features_fp.py`` / TRIDENT's patch-feature step do:
  a coords h5, a Dataset that calls openslide ``read_region`` at the patch level, PIL, then
  torchvision ``Resize + ToTensor + Normalize``, a ``DataLoader`` with ``--workers``
  workers (default: every core, the budget ours gets as threads), the model under
  ``torch.inference_mode``, features saved to h5; it starts from wsi-sampler's planned
  coordinates (as CLAM starts from its own patching step's), ours from the slide file;
- **CLAM-style, channels-last input**: the same with the batch made channels-last before
  the model, as ours feeds it: isolates how much of the difference is memory layout (the
  convolutions of a CNN run faster on NHWC on CPU; a ViT is indifferent);
- **model only**: the model on patches already in memory (the ceiling of both).

Each contestant runs in its own process (peak RSS is its own). Goal: ours >= 1.3x the
CLAM-style pipeline on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ._harness import ensure_slide, machine, run_isolated, warm_page_cache
from .extract import SPECS

MODELS = ("vit-s16", "resnet50")


def torch_version() -> str:
    import torch

    return str(torch.__version__)


def _plan(path: Path, n: int) -> Any:
    from wsi_sampler import PlanParams, make_plan, open_slide

    with open_slide(path) as slide:
        return make_plan(slide, PlanParams(strategy="random", n_patches=n, seed=0,
                                           patch_size_px=224, target_mpp=0.5))


def c_ours(path: str, model: str, n: int, workers: int, precision: str = "fp32"
           ) -> dict[str, Any]:
    import torch

    from wsi_sampler import PlanParams, open_slide
    from wsi_sampler.models import load_model
    from wsi_sampler.scoring import score_slide
    from wsi_sampler.worker import InProcessWorker

    torch.manual_seed(0)
    worker = InProcessWorker(load_model(model, device="cpu", allow_random_weights=True,
                                        precision=precision))
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        with open_slide(path) as slide:
            result = score_slide(slide, PlanParams(strategy="random", n_patches=n, seed=0),
                                 worker, Path(out))
        seconds = time.perf_counter() - t
    check = worker.precision_info.get("check", {})
    return {"patches": len(result.plan), "seconds": seconds,
            "precision": worker.precision_info["chosen"],
            "min_cosine": check.get("min_cosine")}


def c_ours_bf16(path: str, model: str, n: int, workers: int) -> dict[str, Any]:
    return c_ours(path, model, n, workers, precision="bf16")


class _ClamBag:
    """CLAM's Whole_Slide_Bag_FP, as its feature extraction uses it."""

    def __init__(self, slide_path: str, coords_path: str, transform: Any) -> None:
        import h5py

        self.slide_path, self.transform = slide_path, transform
        with h5py.File(coords_path, "r") as f:
            self.coords = f["coords"][:]
            self.level = int(f["coords"].attrs["patch_level"])
            self.size = int(f["coords"].attrs["patch_size"])
        self.wsi: Any = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> Any:
        import openslide

        if self.wsi is None:  # one handle per DataLoader worker
            self.wsi = openslide.OpenSlide(self.slide_path)
        xy = tuple(int(v) for v in self.coords[i])
        img = self.wsi.read_region(xy, self.level, (self.size, self.size)).convert("RGB")
        return self.transform(img), self.coords[i]


def c_clam(path: str, model: str, n: int, workers: int, channels_last: bool = False
           ) -> dict[str, Any]:
    import h5py
    import torch
    from torchvision import transforms

    from wsi_sampler import open_slide
    from wsi_sampler.export import write_clam_h5
    from wsi_sampler.models import load_model

    torch.manual_seed(0)
    loaded = load_model(model, device="cpu", allow_random_weights=True)
    module, card = loaded.module, loaded.card
    transform = transforms.Compose([
        transforms.Resize(224), transforms.ToTensor(),
        transforms.Normalize(card.normalization.mean, card.normalization.std)])
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        coords_path = str(Path(out) / "coords.h5")
        with open_slide(path) as slide:  # the patching step: same tissue patches as ours
            write_clam_h5(coords_path, _plan(Path(path), n), slide)
        loader = torch.utils.data.DataLoader(_ClamBag(path, coords_path, transform),
                                             batch_size=64, num_workers=workers)
        feats, coords = [], []
        with torch.inference_mode():
            for x, xy in loader:
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                feats.append(module(x).numpy())
                coords.append(xy.numpy())
        with h5py.File(Path(out) / "features.h5", "w") as f:
            f["features"] = np.concatenate(feats)
            f["coords"] = np.concatenate(coords)
        seconds = time.perf_counter() - t
    return {"patches": sum(len(x) for x in feats), "seconds": seconds}


def c_model_only(path: str, model: str, n: int, workers: int) -> dict[str, Any]:
    import torch

    from wsi_sampler import Extractor, open_slide
    from wsi_sampler.models import load_model

    torch.manual_seed(0)
    loaded = load_model(model, device="cpu", allow_random_weights=True)
    with open_slide(path) as slide:
        plan = _plan(Path(path), n)
        images = np.concatenate([b.images for b in Extractor(slide, plan).iter_batches()])
    t = time.perf_counter()
    loaded.predict(images)
    return {"patches": len(images), "seconds": time.perf_counter() - t}


def c_clam_channels_last(path: str, model: str, n: int, workers: int) -> dict[str, Any]:
    return c_clam(path, model, n, workers, channels_last=True)


CONTESTANTS = {"wsi-sampler": c_ours, "CLAM-style (DataLoader)": c_clam,
               "CLAM-style, channels-last input": c_clam_channels_last,
               "model only (patches in memory)": c_model_only}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=512)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--bf16", choices=("auto", "yes", "no"), default="auto",
                        help="also run ours in bf16 (auto: only on a CPU with native bf16)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="DataLoader workers of the CLAM-style rows (ours: as many "
                        "threads); default every core")
    args = parser.parse_args(argv)
    path = ensure_slide("A", SPECS["A"])
    warm_page_cache(path)
    from wsi_sampler.models.precision import cpu_bf16_support

    native, isa = cpu_bf16_support()
    contestants = dict(CONTESTANTS)
    if args.bf16 == "yes" or (args.bf16 == "auto" and native):
        contestants = {"wsi-sampler": c_ours, "wsi-sampler bf16": c_ours_bf16,
                       **{k: v for k, v in CONTESTANTS.items() if k != "wsi-sampler"}}
    print(f"CPU: {isa}; bf16 rows: {'yes' if len(contestants) > len(CONTESTANTS) else 'no'}")
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# {stamp}; {machine()}; `python -m benchmarks.encode --patches {args.patches} "
          f"--workers {args.workers}`; torch {torch_version()}, {args.workers} workers / "
          "threads per contestant\n\n| model | contestant | patches | s | patches/s | "
          "ours ÷ this | peak RSS MiB |\n|---|---|---:|---:|---:|---:|---:|", flush=True)
    rows = []
    for model in args.models.split(","):
        results = {name: run_isolated(fn, str(path), model, args.patches, args.workers)
                   for name, fn in contestants.items()}
        ours = results["wsi-sampler"]
        for name, res in results.items():
            if "error" in res:
                print(f"| {model} | {name} | failed: {res['error']} |||||")
                continue
            rate = res["patches"] / res["seconds"]
            ratio = (ours["patches"] / ours["seconds"]) / rate
            cos = f" (bf16 min cosine {res['min_cosine']})" if res.get("min_cosine") else ""
            print(f"| {model} | {name}{cos} | {res['patches']} | {res['seconds']:.1f} | "
                  f"{rate:.1f} | {ratio:.2f} | {res['peak_rss_mib']:,.0f} |", flush=True)
            rows.append({"model": model, "contestant": name, **res})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
