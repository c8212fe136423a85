"""Slide-level models: bags/s per architecture from stored bags, ours against a CLAM
``eval.py``-style loop over the same bags, and end to end (slide -> answer) against encoding
alone.

From bags. Every contestant reads the same K bags of N x 1024 float32 features and answers
each, one after the other, on the same threads:

- **wsi-sampler**: ``read_bag`` of our ``features.h5`` (h5py) and ``SlideModel.predict``
  (inference mode, probabilities and attention as numpy).
- **CLAM eval-style**: what CLAM's ``eval.py`` does (``utils/eval_utils.summary``): a
  Dataset that ``torch.load``s ``pt_files/<slide>.pt``, a ``DataLoader(batch_size=1)`` with
  a concatenating collate, the model under ``torch.no_grad()`` and ``Y_prob.cpu().numpy()``
  per slide. The model is the same module (the math is identical; the loop differs).

End to end. One slide through the encoder (ViT-S/16, random weights) on a random plan:
``score_slide`` alone against ``predict_slide`` (encoding + the head + every answer file:
attention h5, heatmap, GeoJSON, top/bottom patches). The goal: within 5 % of encoding alone.

Run: ``python -m benchmarks.slide_models`` (``--patches`` per bag, ``--bags``, ``--e2e-patches``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from benchmarks._harness import ensure_slide, machine, run_isolated
from benchmarks.encode import torch_version
from benchmarks.extract import SPECS

ARCHITECTURES = ("clam_sb", "clam_mb", "mil_fc", "abmil", "trident_abmil", "transmil", "mean")
DIM = 1024


def _card(arch: str) -> Any:
    from wsi_sampler.slide_models import SlideModelCard

    return SlideModelCard(name=f"bench-{arch}", architecture=arch,
                          class_names=("a", "b", "c") if arch != "mil_fc" else ("a", "b"),
                          patch_encoder="uni")


def write_bags(folder: Path, bags: int, patches: int) -> None:
    rng = np.random.default_rng(0)
    (folder / "h5").mkdir(parents=True)
    (folder / "pt_files").mkdir()
    for i in range(bags):
        feats = rng.normal(size=(patches, DIM)).astype(np.float32)
        with h5py.File(folder / "h5" / f"slide-{i}.h5", "w") as f:
            f["features"] = feats
            f["coords"] = np.zeros((patches, 2), np.int64)
        torch.save(torch.from_numpy(feats), folder / "pt_files" / f"slide-{i}.pt")


def _ours(model: Any, paths: list[Path]) -> None:
    from wsi_sampler.slide_models import read_bag

    for path in paths:
        model.predict(read_bag(path).features)


class _PtBags(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """CLAM's Generic_MIL_Dataset in evaluation: one .pt bag per slide, and its label."""

    def __init__(self, folder: Path) -> None:
        self.paths = sorted((folder / "pt_files").iterdir())

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.load(self.paths[i], weights_only=True), torch.tensor(0)


def _collate_mil(batch: list[tuple[torch.Tensor, torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.cat([item[0] for item in batch], dim=0),
            torch.stack([item[1] for item in batch]))


def _clam_eval(module: torch.nn.Module, loader: Any) -> None:
    """CLAM's ``summary()``: per slide, the model under no_grad, Y_prob to numpy."""
    all_probs = np.zeros((len(loader), 3))
    for i, (data, _label) in enumerate(loader):
        with torch.no_grad():
            y_prob = torch.softmax(module(data).logits[None], dim=1)
        probs = y_prob.cpu().numpy()
        all_probs[i, :probs.shape[1]] = probs[0]


def c_from_bags(folder: str, arch: str, repeats: int) -> dict[str, Any]:
    """Both contestants alternated in one process on the same module (the machine's drift
    hits both alike); medians."""
    from wsi_sampler.slide_models import load_slide_model

    torch.manual_seed(0)
    model = load_slide_model(_card(arch), allow_random_weights=True)
    paths = sorted((Path(folder) / "h5").iterdir())
    loader = torch.utils.data.DataLoader(_PtBags(Path(folder)), batch_size=1,
                                         collate_fn=_collate_mil)
    ours, theirs = [], []
    for i in range(repeats + 1):  # the first round warms up
        t = time.perf_counter()
        _ours(model, paths)
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        _clam_eval(model.module, loader)
        if i:
            ours.append(t_ours)
            theirs.append(time.perf_counter() - t)
    return {"bags": len(paths), "wsi-sampler": float(np.median(ours)),
            "CLAM eval-style": float(np.median(theirs))}


def c_end_to_end(slide: str, patches: int, repeats: int) -> dict[str, Any]:
    """Encoding alone and slide -> answer, alternated in one process on the same encoder
    (the machine's drift hits both alike); medians."""
    from wsi_sampler import PlanParams, open_slide
    from wsi_sampler.scoring import score_slide
    from wsi_sampler.slide_models import SlideModelCard, load_slide_model, predict_slide
    from wsi_sampler.worker import open_worker

    torch.manual_seed(0)
    encoder = open_worker("vit-s16", device="cpu", allow_random_weights=True)
    params = PlanParams(strategy="random", n_patches=patches, seed=0)
    card = SlideModelCard(name="bench-head", architecture="clam_sb", class_names=("a", "b"),
                          patch_encoder="vit-s16")
    head = load_slide_model(card, allow_random_weights=True)
    alone, full, n = [], [], 0
    with tempfile.TemporaryDirectory() as out:
        for i in range(repeats + 1):  # the first round warms up
            t = time.perf_counter()
            with open_slide(slide) as s:
                n = len(score_slide(s, params, encoder).plan)
            t_alone = time.perf_counter() - t
            t = time.perf_counter()
            predict_slide(slide, [head], Path(out), encoder=encoder, params=params)
            if i:
                alone.append(t_alone)
                full.append(time.perf_counter() - t)
    return {"patches": n, "alone": float(np.median(alone)), "full": float(np.median(full))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bags", type=int, default=4)
    parser.add_argument("--patches", type=int, default=20_000, help="patches per bag")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--architectures", default=",".join(ARCHITECTURES))
    parser.add_argument("--e2e-patches", type=int, default=128,
                        help="patches of the end-to-end run (0: skip it)")
    args = parser.parse_args(argv)
    threads = len(os.sched_getaffinity(0))
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# {stamp}; {machine()}; `python -m benchmarks.slide_models --bags {args.bags} "
          f"--patches {args.patches}`; torch {torch_version()}, {threads} threads\n\n"
          f"From bags ({args.bags} bags of {args.patches:,} x {DIM} float32, median of "
          f"{args.repeats}, alternated in one process):\n\n| architecture | contestant | "
          "bags/s | ms per bag | "
          "speed vs CLAM's loop |\n|---|---|---:|---:|---:|", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        write_bags(Path(folder), args.bags, args.patches)
        for arch in args.architectures.split(","):
            res = run_isolated(c_from_bags, folder, arch, args.repeats)
            if "error" in res:
                print(f"| {arch} | failed: {res['error']} ||||")
                continue
            for name in ("wsi-sampler", "CLAM eval-style"):
                rate = res["bags"] / res[name]
                speed = res["CLAM eval-style"] / res[name]  # > 1: faster than CLAM's loop
                print(f"| {arch} | {name} | {rate:.2f} | {1000 / rate:.0f} | {speed:.2f} |",
                      flush=True)
    if args.e2e_patches:
        slide = str(ensure_slide("A", SPECS["A"]))
        res = run_isolated(c_end_to_end, slide, args.e2e_patches, args.repeats)
        print(f"\nEnd to end (slide A, ViT-S/16 random weights, {args.e2e_patches} random "
              f"patches, alternated in one process, median of {args.repeats}):\n\n"
              "| run | patches | s | ÷ encoding alone |\n|---|---:|---:|---:|")
        if "error" in res:
            print(f"| failed: {res['error']} ||||")
        else:
            for name, key in (("encoding alone (score_slide)", "alone"),
                              ("slide -> answer + files (predict_slide)", "full")):
                print(f"| {name} | {res['patches']} | {res[key]:.1f} | "
                      f"{res[key] / res['alone']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
