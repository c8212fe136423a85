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


def test_gpu_scripts_are_valid_bash() -> None:
    for script in ("gpu.sh", "gpu_wheels.sh"):
        done = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
