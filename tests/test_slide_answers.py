"""Slide-level answers end to end: the API stream and jobs of a real uvicorn, batch scoring
and predict-slide from the command line, all over a real slide and a real (random-weight)
ViT-S/16 encoder, with a CLAM checkpoint in the layout CLAM writes."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import h5py
import httpx
import numpy as np
import pytest
from _cli import run_cli
from _servers import folder_settings, serve, slide_ids, wait_for_job
from _slide_tasks import write_clam_task

from api.app import create_app
from wsi_sampler.models import load_model
from wsi_sampler.slide_models import load_slide_model, read_bag
from wsi_sampler.worker import InProcessWorker

pytest.importorskip("timm", reason="timm is installed by make test (extra 'timm')")

FEW = {"strategy": "random", "n_patches": 16}  # a few patches: ViT-S/16 takes ~0.2 s each
SLIDE = Path(__file__).resolve().parents[2] / "shared" / "slides" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_clam_task(tmp_path_factory.mktemp("task"))


@pytest.fixture(scope="module")
def vits() -> InProcessWorker:
    return InProcessWorker(load_model("vit-s16", device="cpu", allow_random_weights=True))


def _records(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def test_api_stream_and_job_give_the_same_answer(tmp_path: Path, task: tuple[Path, Path],
                                                vits: InProcessWorker) -> None:
    card, ckpt = task
    settings = folder_settings(tmp_path, {"case.svs": SLIDE},
                               slide_models=[{"card": card, "weights": ckpt}])
    with serve(create_app(settings, worker_factory=lambda: vits), ready_path="/readyz") as url:
        listed = httpx.get(f"{url}/v1/slide-models").json()["slide_models"]
        assert [(m["name"], m["patch_encoder"], m["attention"]) for m in listed] == [
            ("tumour-vs-normal", "vit-s16", True)]
        sid = slide_ids(url)["case.svs"]
        streamed = httpx.post(f"{url}/v1/slides/{sid}/slide-predictions",
                              json={"include_attention": True, **FEW}, timeout=120)
        assert streamed.status_code == 200
        records = _records(streamed.content)
        kinds = [r["type"] for r in records]
        assert kinds[0] == "progress" and kinds[-2:] == ["result", "summary"]
        result = records[-2]
        assert result["n_patches"] == records[0]["patches_total"] == records[-3]["patches_done"]
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert len(result["patch_attention"]["scores"]) == result["n_patches"]

        job = httpx.post(f"{url}/v1/jobs", json={"slides": [sid], "sampling": FEW,
                                                 "slide_models": ["tumour-vs-normal"]}).json()
        status = wait_for_job(url, job["id"], timeout_s=180)
        assert status["state"] == "succeeded", status
        names = {r["name"] for r in status["results"]}
        prefix = f"{sid}.tumour-vs-normal"
        for suffix in (".slide.json", ".attention.h5", ".heatmap.png", ".attention.geojson",
                       ".patches.tar"):
            assert prefix + suffix in names
        files = {}
        for name in (f"{prefix}.slide.json", f"{prefix}.attention.h5", f"{sid}.features.h5",
                     f"{prefix}.patches.tar"):
            got = httpx.get(f"{url}/v1/jobs/{job['id']}/results/{name}")
            assert got.status_code == 200, name
            (tmp_path / name).write_bytes(got.content)
            files[name] = tmp_path / name
        answer = json.loads(files[f"{prefix}.slide.json"].read_text())
        assert answer["probabilities"] == pytest.approx(result["probabilities"], abs=1e-5)
        # the job's attention is the slide model applied to the job's own feature bag
        model = load_slide_model(card, weights=ckpt)
        again = model.predict(read_bag(files[f"{sid}.features.h5"]).features)
        with h5py.File(files[f"{prefix}.attention.h5"]) as f:
            np.testing.assert_allclose(f["attention"][:], again.attention, atol=1e-5)
            np.testing.assert_allclose(f["attention"][:], result["patch_attention"]["scores"],
                                       atol=1e-4)
        with tarfile.open(files[f"{prefix}.patches.tar"]) as tar:
            members = tar.getnames()
        assert "index.csv" in members and sum(m.startswith("top_") for m in members) == 15


def test_api_refuses_what_it_cannot_answer(tmp_path: Path, task: tuple[Path, Path],
                                           vits: InProcessWorker) -> None:
    card, ckpt = task
    settings = folder_settings(tmp_path, {"case.svs": SLIDE},
                               slide_models=[{"card": card, "weights": ckpt}])
    with serve(create_app(settings, worker_factory=lambda: vits), ready_path="/readyz") as url:
        sid = slide_ids(url)["case.svs"]
        unknown = httpx.post(f"{url}/v1/slides/{sid}/slide-predictions",
                             json={"slide_models": ["nope"]})
        assert unknown.status_code == 422 and "no slide model 'nope'" in unknown.json()["error"]
        job = httpx.post(f"{url}/v1/jobs", json={"slides": [sid], "slide_models": ["nope"]})
        assert job.status_code == 422
    (tmp_path / "bare").mkdir()
    bare = folder_settings(tmp_path / "bare", {"case.svs": SLIDE})
    with serve(create_app(bare, worker_factory=lambda: vits), ready_path="/readyz") as url:
        sid = slide_ids(url)["case.svs"]
        none = httpx.post(f"{url}/v1/slides/{sid}/slide-predictions", json={})
        assert none.status_code == 422 and "no slide models" in none.json()["error"]


def _run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=cwd)  # in this process: torch and timm are imported already


def test_score_writes_answers_beside_the_bags_and_resumes(tmp_path: Path,
                                                          task: tuple[Path, Path]) -> None:
    card, ckpt = task
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "case.svs").symlink_to(SLIDE)
    args = ["score", "slides", "-o", "out", "--model", "vit-s16", "--random-weights",
            "--strategy", "random", "-n", "16",
            "--slide-model", card, "--slide-weights", ckpt, "-q"]
    first = _run(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    (folder,) = (tmp_path / "out" / "slides").iterdir()
    for name in ("features.h5", "tumour-vs-normal.slide.json", "tumour-vs-normal.attention.h5",
                 "tumour-vs-normal.heatmap.png", "tumour-vs-normal.patches.tar"):
        assert (folder / name).is_file(), name
    answer = json.loads((folder / "tumour-vs-normal.slide.json").read_text())
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["slide_models"]["tumour-vs-normal"]["predicted_class"] == answer[
        "predicted_class"]
    header = (tmp_path / "out" / "summary.csv").read_text().splitlines()[0]
    assert "tumour-vs-normal_predicted" in header and "tumour-vs-normal_p_tumour" in header
    # the answer is the slide model over the bag written beside it
    again = load_slide_model(card, weights=ckpt).predict(read_bag(folder / "features.h5")
                                                         .features)
    assert answer["probabilities"]["tumour"] == pytest.approx(float(again.probabilities[1]),
                                                              abs=1e-5)
    resumed = _run(*args[:-1], cwd=tmp_path)
    assert resumed.returncode == 0 and "0 scored, 1 already done" in resumed.stderr
    other = tmp_path / "other.json"
    other.write_text(card.read_text().replace('"tumour-vs-normal"', '"other-head"'))
    mixed = _run(*args[:-5], "--slide-model", other, "--slide-weights", ckpt, cwd=tmp_path)
    assert mixed.returncode == 2 and "other parameters" in mixed.stderr


def test_predict_slide_from_slides_and_bags(tmp_path: Path, task: tuple[Path, Path]) -> None:
    card, ckpt = task
    done = _run("predict-slide", SLIDE, "--slide-model", card, "--slide-weights", ckpt,
                "--model", "vit-s16", "--random-weights", "-o", "answers", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "CMU-1-Small-Region: tumour-vs-normal:" in done.stderr
    out = tmp_path / "answers"
    bag = out / "CMU-1-Small-Region.features.h5"
    slide_answer = json.loads((out / "CMU-1-Small-Region.slide.json").read_text())
    assert slide_answer["input"]["kind"] == "slide" and slide_answer["n_patches"] > 0
    # the kept bag, given back, gives the same answer (the encoder is not needed for it)
    again = _run("predict-slide", bag, "--slide-model", card, "--slide-weights", ckpt,
                 "-o", "from-bag", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    bag_answer = json.loads((tmp_path / "from-bag" / "CMU-1-Small-Region.slide.json"
                             ).read_text())
    assert bag_answer["probabilities"] == pytest.approx(slide_answer["probabilities"],
                                                        abs=1e-6)
    assert bag_answer["input"]["kind"] == "bag"
    assert "no patch images" in " ".join(bag_answer["notes"])


def test_predict_slide_errors_are_one_line(tmp_path: Path, task: tuple[Path, Path]) -> None:
    card, ckpt = task
    twice = _run("predict-slide", SLIDE, "--slide-model", card, "--slide-weights", ckpt,
                 "--slide-weights", ckpt, cwd=tmp_path)
    assert twice.returncode == 2
    assert twice.stderr.strip().splitlines() == [
        "error: 1 --slide-model but 2 --slide-weights: give one checkpoint per slide model, in "
        "the same order (or none, to use each card's file)"]
    wrong = tmp_path / "uni.h5"
    with h5py.File(wrong, "w") as f:
        f["features"] = np.zeros((4, 1024), np.float32)
    failed = _run("predict-slide", wrong, "--slide-model", card, "--slide-weights", ckpt,
                  cwd=tmp_path)
    assert failed.returncode == 3
    assert "the bag's features are 1024-d but slide model 'tumour-vs-normal' reads 384-d" in (
        failed.stderr)
    assert "Traceback" not in failed.stderr
