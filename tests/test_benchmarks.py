"""Benchmark scripts that must keep working between the days they are run: the GPU run's
dry run goes through every step on the CPU."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_dry_run_goes_through_every_step(tmp_path: Path) -> None:
    pytest.importorskip("timm", reason="timm is installed by make test (extra 'timm')")
    from benchmarks.gpu import main

    assert main(["--dry-run", "--json", str(tmp_path / "gpu.json")]) == 0
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert results["dry_run"] and results["device"] == "cpu"
    assert results["decode"]["cpu_opencv_images_per_s"] > 0
    assert results["decode"]["decode_jpeg_cpu_images_per_s"] > 0
    runs = {r["model"]: r for r in results["embed"]}
    assert runs["resnet50"]["embedding_dim"] == 2048 and runs["vit-s16"]["embedding_dim"] == 384
    assert all(r["patches"] > 0 and 0 < r["model_fraction"] <= 1 for r in runs.values())
    assert all(r["precision"]["requested"] == "auto" for r in runs.values())


def test_gpu_scripts_are_valid_bash() -> None:
    for script in ("gpu.sh", "gpu_wheels.sh"):
        done = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_peer_driver_runs_our_contestants_on_the_same_patches(demo_slide: Path,
                                                              tmp_path: Path) -> None:
    """The peers benchmark's driver (TIAToolbox and LazySlide need their own venvs, made by
    the benchmark; ours and the CLAM-style reads run here on the same coordinates)."""
    import sys

    import numpy as np

    from wsi_sampler import PlanParams, make_plan, open_slide

    with open_slide(demo_slide) as s:
        plan = make_plan(s, PlanParams(patch_size_px=224, target_mpp=0.5))
    coords = tmp_path / "coords.npy"
    np.save(coords, np.stack([plan.x0, plan.y0], axis=1))
    for contestant in ("wsi-sampler", "clam-loop", "clam-dataloader"):
        done = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "peer_driver.py"), contestant,
             str(demo_slide), "B", str(coords)],
            capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-500:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["patches"] == len(plan) > 0 and result["seconds"] > 0


def test_extraction_benchmark_contestants_read_the_same_plan(demo_slide: Path) -> None:
    """The extraction benchmark's rows that compare like with like: the floors (full and
    1/2 decode), openslide and tiffslide threaded as ours is, and the pixel difference
    between our two paths (the DCT-scaled path is not exact, but close)."""
    from benchmarks.extract import CONTESTANTS, c_fidelity, plan_job
    from wsi_sampler import PlanParams

    job = plan_job(demo_slide, PlanParams(patch_size_px=224, target_mpp=0.5))
    assert job["n"] > 0 and job["region"][0] == 448  # the demo slide is at 0.25 µm/px
    for name in ("decode floor", "decode floor 1/2", "openslide", "tiffslide"):
        for threads in (1, 2):
            result = CONTESTANTS[name](demo_slide, job, threads, 1)
            assert result["patches"] == job["n"] and result["seconds"] > 0, name
    assert "2 threads" in CONTESTANTS["openslide"](demo_slide, job, 2, 1)["note"]
    fidelity = c_fidelity(demo_slide, job, 2, 1)
    assert 0 < fidelity["mean"] < 2 and fidelity["p999"] <= fidelity["max"] < 255
