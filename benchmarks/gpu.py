"""The GPU run: JPEG decode on the GPU vs our CPU path, and slide to embeddings in bf16.

Run on a GPU machine with ``bash benchmarks/gpu.sh`` (installs what the machine lacks, then
runs this), or ``python -m benchmarks.gpu``. ``--dry-run`` runs every step on the CPU with
tiny sizes (a small generated slide, a few patches): the test suite calls it, so the script
is known to work on the day a GPU is lent. Reports, in one table and as JSON:

(a) JPEG decode: 256 px JPEG tiles (quality 90, made from the slide's patches) decoded by
    nvjpeg (``torchvision.io.decode_jpeg`` on cuda, batched) vs OpenCV on all CPU cores;
(b) slide file to embeddings for a ResNet-50 and a ViT-L/16 (UNI's architecture), random
    weights, bf16 autocast: patches/s, and the fraction of the wall time spent in the model
    (goal >= 80 %: the GPU, not the data path, is the limit);
(c) peak GPU memory of each model run;
(d) slide to answer: the same slide through UNI's architecture and a CLAM-SB head (random
    weights) with every answer file (``predict_slide``: attention h5, heatmap, GeoJSON,
    top patches), against encoding alone (``score_slide``) on the same patches;
(e) the precision ``auto`` chose for each model, and why (in the JSON);
(f) stain normalisation patches/s (``benchmarks.stain``): NumPy on one CPU thread, torch
    batched on the GPU (Macenko, Reinhard), beside slideflow's A100 figures.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from wsi_sampler import Extractor, PlanParams, make_plan, open_slide
from wsi_sampler.demo import DemoSlideSpec, write_demo_slide
from wsi_sampler.models import Predictions, load_model
from wsi_sampler.scoring import score_slide
from wsi_sampler.worker import InProcessWorker

from ._harness import ensure_slide, machine
from .extract import SPECS
from .stain import real_patches, stain_rates

DRY_SPEC = DemoSlideSpec(width=4096, height=3072, mpp=0.25, seed=3)


class TimedWorker(InProcessWorker):
    """The in-process worker, counting the wall time spent in the model."""

    seconds = 0.0

    def infer(self, patches: np.ndarray) -> Predictions:
        t = time.perf_counter()
        try:
            return super().infer(patches)
        finally:
            self.seconds += time.perf_counter() - t


def _jpeg_tiles(slide_path: Path, n: int) -> list[bytes]:
    import cv2

    with open_slide(slide_path) as slide:
        plan = make_plan(slide, PlanParams(strategy="random", n_patches=n, seed=1,
                                           patch_size_px=256))
        images = np.concatenate([b.images for b in Extractor(slide, plan).iter_batches()])
    return [bytes(cv2.imencode(".jpg", im[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1])
            for im in images]


def _rate(fn: Callable[[], int], repeats: int) -> float:
    fn()  # warm up (nvjpeg handles, thread pools)
    t = time.perf_counter()
    count = sum(fn() for _ in range(repeats))
    return count / (time.perf_counter() - t)


def decode_rates(tiles: list[bytes], device: str, repeats: int) -> dict[str, float]:
    """(a): images/s decoding ``tiles`` with OpenCV on all cores and nvjpeg on ``device``."""
    import cv2
    import torch
    from torchvision.io import decode_jpeg

    arrays = [np.frombuffer(t, np.uint8) for t in tiles]
    cores = len(os.sched_getaffinity(0))
    with ThreadPoolExecutor(cores) as pool:
        cpu = _rate(lambda: len(list(pool.map(lambda a: cv2.imdecode(a, 1), arrays))),
                    repeats)
    tensors = [torch.from_numpy(a.copy()) for a in arrays]

    def gpu_batch() -> int:
        with warnings.catch_warnings():  # torchvision >= 0.29 points to TorchCodec; same nvjpeg
            warnings.simplefilter("ignore", DeprecationWarning)
            out = decode_jpeg(tensors, device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return len(out)

    return {"cpu_opencv_images_per_s": cpu, "cpu_cores": cores,
            f"decode_jpeg_{device}_images_per_s": _rate(gpu_batch, repeats)}


def embed(slide_path: Path, model: str, device: str, n: int) -> dict[str, Any]:
    """(b) and (c): slide file to embeddings for one model, random weights."""
    import torch

    loaded = load_model(model, device=device, allow_random_weights=True, precision="auto")
    worker = TimedWorker(loaded)
    params = PlanParams(strategy="random", n_patches=n, seed=2)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    warm_up = PlanParams(strategy="random", n_patches=min(n, worker.card.max_batch), seed=3)
    with open_slide(slide_path) as slide:
        # one batch warms up kernels, allocator and decoders; not the whole run again
        score_slide(slide, warm_up, worker, batch_size=worker.card.max_batch)
        worker.seconds = 0.0
        t = time.perf_counter()
        result = score_slide(slide, params, worker, batch_size=worker.card.max_batch)
        total = time.perf_counter() - t
    assert result.features is not None
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0.0
    return {"model": model, "patches": len(result.plan), "seconds": round(total, 3),
            "patches_per_s": round(len(result.plan) / total, 1),
            "model_fraction": round(worker.seconds / total, 3),
            "embedding_dim": int(result.features.shape[1]), "peak_gpu_mib": round(peak),
            "precision": loaded.precision_info}


def slide_answer(slide_path: Path, encoder_name: str, device: str, n: int) -> dict[str, Any]:
    """(d): slide -> answer + files against encoding alone, same encoder and patches."""
    from wsi_sampler.slide_models import SlideModelCard, load_slide_model, predict_slide

    encoder = InProcessWorker(load_model(encoder_name, device=device, allow_random_weights=True,
                                         precision="auto"))
    card = SlideModelCard(name="bench-head", architecture="clam_sb", class_names=("a", "b"),
                          patch_encoder=encoder_name)
    head = load_slide_model(card, device=device, allow_random_weights=True)
    params = PlanParams(strategy="random", n_patches=n, seed=2)
    with tempfile.TemporaryDirectory() as out:
        with open_slide(slide_path) as slide:  # warm-up round
            score_slide(slide, params, encoder)
        t = time.perf_counter()
        with open_slide(slide_path) as slide:
            patches = len(score_slide(slide, params, encoder).plan)
        alone = time.perf_counter() - t
        t = time.perf_counter()
        answer = predict_slide(slide_path, [head], Path(out), encoder=encoder, params=params)
        full = time.perf_counter() - t
    return {"encoder": encoder_name, "patches": patches, "encoding_s": round(alone, 3),
            "answer_s": round(full, 3), "ratio": round(full / alone, 3),
            "predicted": answer.records[0].get("predicted_class")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="everything on the CPU, tiny sizes: checks the script works")
    parser.add_argument("--patches", type=int, default=4096, help="patches per model run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    n = 4 if args.dry_run else args.patches
    models = ("resnet50", "vit-s16") if args.dry_run else ("resnet50", "uni")
    with tempfile.TemporaryDirectory() as tmp:
        slide = (write_demo_slide(Path(tmp) / "dry.svs", DRY_SPEC) if args.dry_run
                 else ensure_slide("A", SPECS["A"]))
        decode = decode_rates(_jpeg_tiles(slide, 16 if args.dry_run else 1024), device,
                              1 if args.dry_run else 5)
        runs = [embed(slide, m, device, n) for m in models]
        answer = slide_answer(slide, models[-1], device, n)
        stains = stain_rates(real_patches(slide, 4 if args.dry_run else 1024), device,
                             1 if args.dry_run else 3)
    results = {"machine": machine(), "device": device, "dry_run": args.dry_run,
               "decode": decode, "embed": runs, "slide_answer": answer, "stain": stains}
    print(f"# {results['machine']} ({device}{', dry run' if args.dry_run else ''})\n")
    for key, value in decode.items():
        print(f"- {key}: {value:,.0f}")
    print("\n| model | patches | s | patches/s | time in model | embedding | peak GPU MiB |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['model']} | {r['patches']} | {r['seconds']} | {r['patches_per_s']} | "
              f"{r['model_fraction']:.0%} | {r['embedding_dim']} | {r['peak_gpu_mib']} |")
    print(f"\nslide -> answer + files ({answer['encoder']} + CLAM-SB, {answer['patches']} "
          f"patches): {answer['answer_s']} s; encoding alone {answer['encoding_s']} s "
          f"(ratio {answer['ratio']})")
    print("\n| stain normalisation | implementation | patches/s (224 px) |\n|---|---|---:|")
    for r in stains:
        print(f"| {r['method']} | {r['implementation']} | {r['patches_per_s']:,.1f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
