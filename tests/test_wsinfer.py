"""Our WSInfer-layout patch files, read and run by WSInfer itself (v0.6.1, in its own venv:
``tests/_tools.py``): its ``_read_patch_coords`` and its ``run_inference`` step, with a tiny
TorchScript model, on a 0.25 µm/px slide patched at 0.5 µm/px."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from _tools import tool_bin

from wsi_sampler import Extractor, PlanParams, make_plan, open_slide

CLI = [sys.executable, "-c", "from wsi_sampler.cli import main; main()"]

# WSInfer's side: read our file, then infer over the slide folder (it writes
# results/model-outputs-csv/<stem>.csv; failures are returned, not raised).
WSINFER_RUN = """
import json, sys
from pathlib import Path
from wsinfer.modellib.data import _read_patch_coords
from wsinfer.modellib.models import LocalModelTorchScript
from wsinfer.modellib.run_inference import run_inference
from wsinfer_zoo.client import ModelConfiguration
wsi_dir, results, model_path, config = sys.argv[1:5]
coords = _read_patch_coords(Path(results) / "patches" / "demo.h5")
info = LocalModelTorchScript(config=ModelConfiguration.from_dict(json.loads(config)),
                             model_path=model_path)
failed = run_inference(wsi_dir, results, info, batch_size=8)
print(json.dumps({"coords": coords.tolist(), "failed": failed}))
"""


class MeanColour(torch.nn.Module):
    """Two logits: the mean red and the mean blue of the (0..1) patch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))[:, [0, 2]] * 10


def test_wsinfer_reads_and_runs_our_patch_file(demo_slide: Path, tmp_path: Path) -> None:
    python = tool_bin("wsinfer", "python")
    slides, results = tmp_path / "slides", tmp_path / "results"
    (results / "patches").mkdir(parents=True)
    slides.mkdir()
    shutil.copy(demo_slide, slides / "demo.svs")
    patch_file = results / "patches" / "demo.h5"
    done = subprocess.run([*CLI, "plan", str(slides / "demo.svs"), "--out", str(patch_file),
                           "--h5-format", "wsinfer", "--mpp", "0.5", "--size", "224",
                           "--strategy", "random", "-n", "16", "--seed", "3"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    model = tmp_path / "model.pt"
    with warnings.catch_warnings():  # torch >= 2.14 deprecates TorchScript; WSInfer loads it
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(MeanColour()).save(str(model))  # type: ignore[no-untyped-call]
    config = {"spec_version": "1.0", "architecture": "mean-colour", "num_classes": 2,
              "class_names": ["red", "blue"], "patch_size_pixels": 224, "spacing_um_px": 0.5,
              "transform": [{"name": "Resize", "arguments": {"size": 224}},
                            {"name": "ToTensor"}]}
    run = subprocess.run([str(python), "-c", WSINFER_RUN, str(slides), str(results), str(model),
                          json.dumps(config)], capture_output=True, text=True, timeout=300,
                         env=os.environ | {"WSINFER_FORCE_CPU": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    answer = json.loads(run.stdout.strip().splitlines()[-1])
    assert answer["failed"] == [[], []]

    with open_slide(slides / "demo.svs") as slide:
        plan = make_plan(slide, PlanParams(strategy="random", n_patches=16, seed=3,
                                           patch_size_px=224, target_mpp=0.5))
        patches = np.concatenate([b.images for b in Extractor(slide, plan).iter_batches()])
    assert plan.width0 == 448  # 224 px at 0.5 µm/px = 448 level-0 px of a 0.25 µm/px scan
    expected_boxes = [[int(x), int(y), 448, 448] for x, y in plan.coords]
    assert answer["coords"] == expected_boxes  # WSInfer's reader: (minx, miny, w, h)
    rows = list(csv.DictReader((results / "model-outputs-csv" / "demo.csv").read_text(
    ).splitlines()))
    assert [[int(float(r[k])) for k in ("minx", "miny", "width", "height")]
            for r in rows] == expected_boxes
    # WSInfer read 448 level-0 px and resized them to 224: the same pixels our extractor
    # gives at 0.5 µm/px, up to the resampling filter, so the same probabilities.
    logits = patches.astype(np.float64).mean(axis=(1, 2))[:, [0, 2]] / 255 * 10
    ours = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    theirs = np.array([[float(r["prob_red"]), float(r["prob_blue"])] for r in rows])
    np.testing.assert_allclose(theirs, ours, atol=0.01)
