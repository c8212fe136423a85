"""Encoder runtimes on this CPU, model only: what beats torch eager fp32, by measurement.

The same N real tissue patches of the 40k x 30k benchmark slide (224 px at 0.5 µm/px), in
batches of 32, through each catalogue encoder with random weights (speed does not depend on
them), on every core. Contestants, each in its own process (peak RSS its own), each checked
against eager fp32 on the same patches (minimum per-patch cosine of the embeddings):

- **eager fp32**: what the service runs (``LoadedModel.predict``: channels-last input,
  ``inference_mode``);
- **eager fp32, 1 intra-op thread**: the thread split a pipeline could make on few cores
  (one core for the model, the rest for decoding);
- **eager bf16** (autocast): only on a CPU with native bf16 (AVX512-BF16 / AMX), where
  ``precision = auto`` picks it;
- **torch.compile (inductor)**: the compile time is reported apart, then the batches;
- **ONNX Runtime fp32**: the module exported with ``torch.onnx.export`` (TorchScript
  exporter, opset 17), ``CPUExecutionProvider`` with every core as intra-op threads. Needs
  ``onnxruntime`` and ``onnx``: ``--ort-path DIR`` adds a directory they were installed into
  (``pip install --target DIR onnxruntime onnx``); they are not dependencies of ours.

``--large`` adds UNI2-h and Virchow2 (ViT-H/14, ~630 M parameters; their architectures are
checked on ``meta`` against the published parameter counts by the catalogue tests) at eager
fp32, with fewer patches.

Run: ``python -m benchmarks.runtimes`` (``--patches``, ``--models``, ``--large``, ``--ort-path``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ._harness import ensure_slide, machine, run_isolated, warm_page_cache
from .encode import torch_version
from .extract import SPECS

MODELS = ("vit-s16", "resnet50", "uni")
LARGE = ("uni2-h", "virchow2")
BATCH = 32


def _patches(path: str, n: int) -> np.ndarray:
    from wsi_sampler import Extractor, PlanParams, make_plan, open_slide

    with open_slide(path) as slide:
        plan = make_plan(slide, PlanParams(strategy="random", n_patches=n, seed=0,
                                           patch_size_px=224, target_mpp=0.5))
        return np.concatenate([b.images for b in Extractor(slide, plan).iter_batches()])


def _reference(loaded: Any, images: np.ndarray) -> np.ndarray:
    """Eager fp32 embeddings of ``images`` (the first output), batch by batch."""
    import torch

    outs = []
    with torch.inference_mode():
        for start in range(0, len(images), BATCH):
            outs.append(loaded.module(loaded._to_tensor(images[start : start + BATCH])))
    return torch.cat([o.float() for o in outs]).numpy()


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min())


def _timed(run: Any, images: np.ndarray) -> tuple[np.ndarray, float]:
    run(images[:BATCH])  # warm-up (and compile, for compiled modules)
    start = time.perf_counter()
    outs = [run(images[i : i + BATCH]) for i in range(0, len(images), BATCH)]
    return np.concatenate(outs), time.perf_counter() - start


def contestant(path: str, model: str, n: int, name: str, ort_path: str | None
               ) -> dict[str, Any]:
    """Run in a child: one runtime on one model; seconds for the batches after warm-up."""
    import torch

    from wsi_sampler.models import load_model

    torch.manual_seed(0)
    if name == "eager fp32, 1 intra-op thread":
        torch.set_num_threads(1)
    precision = "bf16" if name == "eager bf16" else "fp32"
    loaded = load_model(model, device="cpu", allow_random_weights=True, precision=precision)
    images = _patches(path, n)
    extra: dict[str, Any] = {}
    if name == "eager fp32":  # the reference itself
        first = loaded.card.outputs[0].name
        out, seconds = _timed(lambda x: loaded.predict(x)[first], images)
        return {"patches": len(images), "seconds": seconds, "min_cosine": 1.0}
    reference = _reference(loaded, images)
    if name.startswith("eager"):
        first = loaded.card.outputs[0].name
        out, seconds = _timed(lambda x: loaded.predict(x)[first], images)
    elif name == "torch.compile (inductor)":
        compiled = torch.compile(loaded.module)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled(loaded._to_tensor(images[:BATCH]))
        extra["compile_s"] = time.perf_counter() - start

        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return compiled(loaded._to_tensor(x)).float().numpy()  # type: ignore[no-any-return]

        out, seconds = _timed(run, images)
    else:
        out, seconds, extra = _onnxruntime(loaded, images, ort_path)
    return {"patches": len(images), "seconds": seconds,
            "min_cosine": _min_cosine(reference, out), **extra}


def _onnxruntime(loaded: Any, images: np.ndarray, ort_path: str | None
                 ) -> tuple[np.ndarray, float, dict[str, Any]]:
    import torch

    if ort_path:
        sys.path.append(ort_path)  # after ours: its own numpy must not shadow ours
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = str(Path(tmp) / "model.onnx")
        start = time.perf_counter()
        example = loaded._to_tensor(images[:BATCH]).contiguous()
        torch.onnx.export(loaded.module, (example,), onnx_path, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamo=False,
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
        options = ort.SessionOptions()
        options.intra_op_num_threads = len(os.sched_getaffinity(0))
        session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        export_s = time.perf_counter() - start

    def run(x: np.ndarray) -> np.ndarray:
        tensor = loaded._to_tensor(x).contiguous().numpy()
        return session.run(["y"], {"x": tensor})[0]  # type: ignore[no-any-return]

    out, seconds = _timed(run, images)
    return out, seconds, {"compile_s": export_s, "version": ort.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=96)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--large", action="store_true", help="also UNI2-h and Virchow2")
    parser.add_argument("--large-patches", type=int, default=32)
    parser.add_argument("--ort-path", help="a directory with onnxruntime + onnx installed")
    parser.add_argument("--bf16", choices=("auto", "yes"), default="auto",
                        help="the bf16 row: auto = only on a CPU with native bf16")
    parser.add_argument("--runtimes", help="comma-separated subset of the runtime names")
    args = parser.parse_args(argv)
    path = str(ensure_slide("A", SPECS["A"]))
    warm_page_cache(Path(path))
    from wsi_sampler.models.precision import cpu_bf16_support

    native, isa = cpu_bf16_support()
    names = ["eager fp32", "eager fp32, 1 intra-op thread", "torch.compile (inductor)",
             "ONNX Runtime fp32"]
    if native or args.bf16 == "yes":
        names.insert(1, "eager bf16")
    if args.runtimes:
        names = [n for n in names if n in args.runtimes.split(",")]
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine()}; CPU: {isa}; "
          f"torch {torch_version()}; `python -m benchmarks.runtimes --patches {args.patches}"
          f"{' --large' if args.large else ''}`; batches of {BATCH}, model only\n")
    print("| model | runtime | patches | s | patches/s | ÷ eager fp32 | min cosine | "
          "compile / export s | peak RSS MiB |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")
    cases = [(m, args.patches, names) for m in args.models.split(",")]
    if args.large:
        cases += [(m, args.large_patches, [n for n in names if n == "eager fp32"])
                  for m in LARGE]
    for model, n, runtimes in cases:
        eager_rate = None
        for name in runtimes:
            r = run_isolated(contestant, path, model, n, name, args.ort_path)
            if "error" in r:
                print(f"| {model} | {name} | failed: {r['error'][:120]} |||||||", flush=True)
                continue
            rate = r["patches"] / r["seconds"]
            eager_rate = eager_rate or rate  # the first row (eager fp32 unless filtered)
            compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
            print(f"| {model} | {name} | {r['patches']} | {r['seconds']:.1f} | {rate:.2f} | "
                  f"{rate / eager_rate:.2f} | {r['min_cosine']:.5f} | {compile_s} | "
                  f"{r['peak_rss_mib']:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
