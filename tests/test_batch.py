"""Batch scoring of a folder: local and Dask executors, failures, resume after SIGKILL."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _cli import run_cli
from _servers import free_port

from wsi_sampler.batch import EXIT_FAILURES, BatchConfig, discover, run_batch
from wsi_sampler.demo import DemoSlideSpec, write_demo_slide
from wsi_sampler.scoring import RESULT_FILES

CLI = [sys.executable, "-c", "from wsi_sampler.cli import main; main()"]
SMALL = DemoSlideSpec(width=6144, height=4608, mpp=0.25, seed=21)
CFG = BatchConfig(device="cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, demo_slide: Path, cmu_svs: Path,
           kidney_tif: Path) -> Path:
    root = tmp_path_factory.mktemp("batch") / "slides"
    (root / "cases" / "b").mkdir(parents=True)
    shutil.copy(demo_slide, root / "cases" / "a.svs")
    write_demo_slide(root / "cases" / "b" / "small.svs", SMALL)
    shutil.copy(cmu_svs, root / "cmu.svs")
    shutil.copy(kidney_tif, root / "no-mpp.tif")
    (root / "zero.svs").write_bytes(b"")
    data = demo_slide.read_bytes()
    (root / "truncated.svs").write_bytes(data[: len(data) // 4])
    (root / "notes.txt").write_text("case notes")
    return root


def rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "summary.csv").open() as fh:
        return {r["slide"]: r for r in csv.DictReader(fh)}


def test_discovery(folder: Path) -> None:
    found = discover(folder)
    assert [t.rel for t in found.slides] == ["cases/a.svs", "cases/b/small.svs", "cmu.svs",
                                             "no-mpp.tif", "truncated.svs", "zero.svs"]
    assert found.skipped == [("notes.txt", "a sidecar/metadata file (extension .txt)")]


@pytest.fixture(scope="module")
def local_out(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local")
    report = run_batch(folder, out, CFG, executor="local", workers=2)
    assert report.exit_code == EXIT_FAILURES
    return out


def test_failures_are_isolated_and_recorded(local_out: Path) -> None:
    r = rows(local_out)
    assert {k: v["status"] for k, v in r.items()} == {
        "cases/a.svs": "done", "cases/b/small.svs": "done", "cmu.svs": "done",
        "no-mpp.tif": "failed", "truncated.svs": "failed", "zero.svs": "failed",
        "notes.txt": "skipped",
    }
    lines = (local_out / "failures.jsonl").read_text().splitlines()
    failures = {f["slide"]: f for f in map(json.loads, lines)}
    assert failures["no-mpp.tif"]["error"] == "MissingMppError"
    assert "mpp_override" in failures["no-mpp.tif"]["message"]
    assert failures["zero.svs"]["error"] == "CorruptSlideError"
    assert failures["truncated.svs"]["error"] in ("CorruptSlideError", "UnsupportedFormatError")
    meta = json.loads((local_out / "run_metadata.json").read_text())
    assert meta["scored"] == 3 and meta["failed"] == 3 and meta["skipped"] == 1
    assert meta["versions"]["wsi-sampler"] and meta["host"]


def test_each_done_slide_has_complete_results(local_out: Path) -> None:
    for rel, row in rows(local_out).items():
        if row["status"] != "done":
            continue
        folder = local_out / row["result_dir"]
        assert sorted(p.name for p in folder.iterdir()) == sorted(RESULT_FILES), rel
        summary = json.loads((folder / "summary.json").read_text())
        lines = (folder / "predictions.csv").read_text().splitlines()
        assert len(lines) == summary["patches"] + 1 > 1
    assert not list((local_out / "slides").glob(".staging-*"))


def test_dask_executor_gives_the_same_results(folder: Path, local_out: Path,
                                              tmp_path: Path) -> None:
    report = run_batch(folder, tmp_path, CFG, executor="dask", workers=2, retries=1)
    assert report.exit_code == EXIT_FAILURES
    local_rows, dask_rows = rows(local_out), rows(tmp_path)
    assert {k: v["status"] for k, v in dask_rows.items()} == \
        {k: v["status"] for k, v in local_rows.items()}
    for rel, row in local_rows.items():
        if row["status"] == "done":
            for name in ("predictions.csv", "predictions.geojson"):
                a = (local_out / row["result_dir"] / name).read_bytes()
                b = (tmp_path / dask_rows[rel]["result_dir"] / name).read_bytes()
                assert a == b, (rel, name)


def _finished(out: Path) -> dict[str, int]:
    """Result folders in place (not ``.staging-*``, whose summary.json is written before the
    folder is moved into place) and their summary's mtime."""
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("slides/*/summary.json")
            if not p.parent.name.startswith(".staging-")}


def test_resume_after_sigkill_scores_each_slide_once(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    for seed in range(4):
        write_demo_slide(slides / f"s{seed}.svs", DemoSlideSpec(width=6144, height=4608,
                                                                seed=seed, mpp=0.25))
    out = tmp_path / "out"
    cmd = [*CLI, "score", str(slides), "--out", str(out), "--workers", "1", "--device", "cpu",
           "--quiet"]
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        deadline = time.monotonic() + 300
        while not _finished(out):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    first_done = _finished(out)
    assert 1 <= len(first_done) < 4
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "run_metadata.json").read_text())
    assert meta["resumed"] == len(first_done) and meta["scored"] == 4 - len(first_done)
    done = _finished(out)
    assert len(done) == 4
    assert all(done[k] == v for k, v in first_done.items())  # not scored a second time
    assert not list(out.glob("slides/.staging-*"))
    for folder in (out / "slides").iterdir():
        assert sorted(p.name for p in folder.iterdir()) == sorted(RESULT_FILES)
    assert all(row["status"] == "done" for row in rows(out).values())


def test_cli_exit_codes(folder: Path, tmp_path: Path) -> None:
    r = run_cli("score", str(tmp_path / "missing"), "--out", str(tmp_path))
    assert r.returncode == 2 and r.stderr.startswith("error: ")
    r = run_cli("score", str(folder), "--out", str(tmp_path / "o"), "--model",
                str(tmp_path / "none.json"))
    assert r.returncode == 2 and "none.json" in r.stderr


def _dask(*args: str) -> subprocess.Popen[bytes]:
    dask = str(Path(sys.executable).parent / "dask")
    return subprocess.Popen([dask, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_real_dask_scheduler_and_workers_survive_a_killed_worker(
        folder: Path, local_out: Path, tmp_path: Path) -> None:
    pytest.importorskip("distributed", reason="the dask extra is installed by make test")
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [_dask("scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard")]
    try:
        procs += [_dask("worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                        "--no-nanny", "--no-dashboard") for _ in range(2)]
        deadline = time.monotonic() + 60
        with Client(address, timeout=60) as client:
            while len(client.scheduler_info()["workers"]) < 2:
                assert time.monotonic() < deadline, "dask workers did not start"
                time.sleep(0.2)
        killed: list[int] = []

        def kill_one(rec: dict[str, object], i: int, n: int) -> None:
            if not killed:  # the first result: other slides are still running or queued
                procs[1].send_signal(signal.SIGKILL)
                killed.append(i)

        report = run_batch(folder, tmp_path, CFG, executor="dask", address=address,
                           retries=2, on_result=kill_one)
        assert killed and procs[1].wait(timeout=10) == -signal.SIGKILL
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)
    assert report.exit_code == EXIT_FAILURES  # the damaged slides, as in the local run
    local_rows, dask_rows = rows(local_out), rows(tmp_path)
    assert {k: v["status"] for k, v in dask_rows.items()} == \
        {k: v["status"] for k, v in local_rows.items()}
    for rel, row in local_rows.items():
        if row["status"] == "done":
            for name in ("predictions.csv", "predictions.geojson", "coords.h5"):
                a = (local_out / row["result_dir"] / name).read_bytes()
                b = (tmp_path / dask_rows[rel]["result_dir"] / name).read_bytes()
                assert a == b, (rel, name)


def test_a_run_with_other_parameters_never_mixes_its_results_in(
        demo_slide: Path, cmu_svs: Path, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(demo_slide, slides / "a.svs")
    shutil.copy(cmu_svs, slides / "b.svs")
    out = tmp_path / "out"
    base = ["score", str(slides), "--out", str(out), "-q"]
    first = run_cli(*base, "--strategy", "random", "-n", "8")
    assert first.returncode == 0, first.stderr
    meta_before = (out / "run_metadata.json").read_text()
    other = run_cli(*base, "--strategy", "random", "-n", "5")
    assert other.returncode == 2 and "made with other parameters" in other.stderr
    assert "n_patches: 8 -> 5" in other.stderr and "--overwrite" in other.stderr
    assert (out / "run_metadata.json").read_text() == meta_before  # nothing rewritten
    same = run_cli(*base, "--strategy", "random", "-n", "8")
    assert same.returncode == 0 and json.loads(
        (out / "run_metadata.json").read_text())["resumed"] == 2
    shutil.copy(demo_slide, slides / "b.svs")  # the file changed: b is scored again
    redone = run_cli(*base, "--strategy", "random", "-n", "8")
    meta = json.loads((out / "run_metadata.json").read_text())
    assert redone.returncode == 0 and (meta["resumed"], meta["scored"]) == (1, 1)
    overwritten = run_cli(*base, "--strategy", "random", "-n", "5", "--overwrite")
    assert overwritten.returncode == 0, overwritten.stderr
    for summary in out.glob("slides/*/summary.json"):
        assert json.loads(summary.read_text())["patches"] == 5


def _slides_of(demo_slide: Path, folder: Path, n: int) -> Path:
    folder.mkdir()
    for i in range(n):
        shutil.copy(demo_slide, folder / f"s{i}.svs")
    return folder


def test_ctrl_c_finishes_the_slides_in_flight_and_writes_the_summary(
        demo_slide: Path, tmp_path: Path) -> None:
    slides = _slides_of(demo_slide, tmp_path / "slides", 4)
    out = tmp_path / "out"
    args = [*CLI, "score", str(slides), "--out", str(out), "--workers", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not _finished(out):  # the first slide is done
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "stopping after the slides in flight (Ctrl-C again to stop now)" in stderr
    assert "Traceback" not in stderr
    rows = list(csv.DictReader((out / "summary.csv").read_text().splitlines()))
    statuses = [r["status"] for r in rows]
    assert statuses.count("done") in (1, 2) and "pending" in statuses  # in flight, then stop
    assert json.loads((out / "run_metadata.json").read_text())["stopped"] is True
    assert (out / "failures.jsonl").exists()
    again = subprocess.run([*args[:-2], "-q"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr  # the rerun resumes and finishes
    assert json.loads((out / "run_metadata.json").read_text())["resumed"] == \
        statuses.count("done")


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(medgemma_slide: Path,
                                                            tmp_path: Path) -> None:
    slides = _slides_of(medgemma_slide, tmp_path / "slides", 3)  # seconds per slide
    out = tmp_path / "out"
    proc = subprocess.Popen([*CLI, "score", str(slides), "--out", str(out), "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "slides").is_dir() or not list((out / "slides").glob(".staging-*")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.monotonic() - t0 < 10
    assert "Traceback" not in stderr and "stopped now" in stderr
    for folder in (out / "slides").iterdir():  # whatever is in place is whole
        assert folder.name.startswith(".staging-") or (folder / "summary.json").exists()


def test_score_reads_a_coarse_scan_at_the_resolution_asked(dicom_dir: Path, tmp_path: Path
                                                           ) -> None:
    slides = tmp_path / "slides"
    shutil.copytree(dicom_dir, slides / "bone")  # 16.8 µm/px: tissue-qc's 0.5 is too fine
    args = ["score", str(slides), "--out", str(tmp_path / "out"), "-q"]
    refused = run_cli(*args)
    assert refused.returncode == EXIT_FAILURES
    failure = json.loads((tmp_path / "out" / "failures.jsonl").read_text().splitlines()[0])
    assert "--mpp or --magnification" in failure["message"]
    done = run_cli(*args, "--mpp", "16.8")
    assert done.returncode == 0, done.stderr
    (meta,) = (tmp_path / "out" / "slides").glob("*/run_metadata.json")
    assert json.loads(meta.read_text())["read"]["target_mpp"] == 16.8


def test_bright_field_qc_on_a_fluorescence_slide_is_flagged(dapi_ndpi: Path, cmu_svs: Path,
                                                            tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(dapi_ndpi, slides / "dapi.ndpi")
    shutil.copy(cmu_svs, slides / "he.svs")
    done = run_cli("score", str(slides), "--out", str(tmp_path / "out"),
                   "--strategy", "random", "-n", "5")
    assert done.returncode == 0, done.stderr
    assert "warning: dapi.ndpi: a fluorescence slide: the built-in tissue-qc" in done.stderr
    assert "he.svs: a fluorescence" not in done.stderr
    summaries = {json.loads(p.read_text())["slide"]: json.loads(p.read_text())
                 for p in (tmp_path / "out").glob("slides/*/summary.json")}
    assert "fluorescence" in summaries["dapi.ndpi"]["warnings"][0]
    assert "warnings" not in summaries["he.svs"]


def test_the_progress_bar_shows_done_of_total_and_one_eta(demo_slide: Path,
                                                          tmp_path: Path) -> None:
    import re

    script = shutil.which("script")
    if script is None:
        pytest.skip("util-linux's script (a terminal for the bar) is not installed")
    slides = _slides_of(demo_slide, tmp_path / "slides", 2)
    command = " ".join([*CLI[:2], '"from wsi_sampler.cli import main; main()"', "score",
                        str(slides), "--out", str(tmp_path / "out"), "--strategy", "random",
                        "-n", "5"])
    done = subprocess.run([script, "-qc", command, "/dev/null"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "COLUMNS": "120"})
    screen = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", done.stdout).replace("\r", "\n")
    bars = [line for line in screen.splitlines() if "scoring slides" in line]
    assert bars and "0/2" in bars[0] and not any("?" in b for b in bars), screen[-2000:]
    assert all(len(re.findall(r"\d:\d\d:\d\d|-:--:--", b)) == 1 for b in bars)
    assert "2/2" in bars[-1] and "last: s" in bars[-1]


def test_qc_writes_each_slides_summary_and_the_cohorts_qc_csv(demo_slide: Path, cmu_svs: Path,
                                                             tmp_path: Path) -> None:
    from dataclasses import replace

    from wsi_sampler import open_slide
    from wsi_sampler.qc import qc_row, slide_qc

    root = tmp_path / "slides"
    root.mkdir()
    shutil.copy(demo_slide, root / "demo.svs")
    shutil.copy(cmu_svs, root / "cmu.svs")
    (root / "zero.svs").write_bytes(b"")
    out = tmp_path / "out"
    report = run_batch(root, out, replace(CFG, qc=True), executor="local", workers=1)
    assert len(report.done) == 2 and len(report.failures) == 1
    with (out / "qc.csv").open() as fh:
        qc_rows = {r["slide"]: r for r in csv.DictReader(fh)}
    assert set(qc_rows) == {"demo.svs", "cmu.svs"}  # the failed slide has no QC row
    with open_slide(demo_slide) as slide:
        expected = qc_row(slide_qc(slide)[0])
    assert {k: str(v) for k, v in expected.items()} == {
        k: v for k, v in qc_rows["demo.svs"].items() if k != "slide"}
    result = out / rows(out)["demo.svs"]["result_dir"]
    assert json.loads((result / "qc.json").read_text())["tissue_area_mm2"] > 0
    assert (result / "qc.png").read_bytes()[:4] == b"\x89PNG"
    annotations = json.loads((result / "qc.geojson").read_text())["features"]
    assert annotations[0]["properties"]["classification"]["name"] == "Tissue"
    assert json.loads((result / "summary.json").read_text())["qc"] == expected
