"""Smoke-test the built image with a real container engine (podman): ``make docker-test``.

Run by ``docker/test/run.sh`` after the build, with the engine set up by ``engine.sh``. Every
check prints one ``ok:`` line (or stops the run with ``FAILED:`` and the reason); the
measurements (image size, start to ready, idle RSS) are printed as ``measured:`` lines for
the README. Containers publish on 127.0.0.1 only and are removed at the end, pass or fail.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx

IMAGE = os.environ.get("WSI_IMAGE", "wsi-sampler:latest")
ROOT = Path(__file__).resolve().parents[2]
PREFIX = "wsi-smoke"
PLAN = {"strategy": "random", "n_patches": 8, "seed": 1}


class Failed(Exception):
    pass


def check(ok: object, what: str) -> None:
    if not ok:
        raise Failed(what)
    print(f"ok: {what}", flush=True)


def podman(*args: str, timeout: float = 300, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if ok and done.returncode != 0:
        raise Failed(f"podman {' '.join(args[:3])} ... exited {done.returncode}: "
                     f"{done.stderr.strip()[-800:]}")
    return done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, name: str, timeout: float = 180) -> float:
    """Seconds until ``url``/readyz answers 200 (the container must keep running)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        with suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - start
        state = podman("inspect", "-f", "{{.State.Status}}", name, ok=False).stdout.strip()
        if state in ("exited", "stopped"):
            logs = podman("logs", name, ok=False)
            raise Failed(f"{name} exited before ready: {(logs.stdout + logs.stderr)[-1500:]}")
        time.sleep(0.3)
    raise Failed(f"{name} not ready within {timeout:.0f} s")


@contextmanager
def container(name: str, *args: str, port: int, inner_port: int = 8000) -> Iterator[str]:
    """A detached container of the image publishing ``inner_port`` on 127.0.0.1:``port``."""
    podman("rm", "-f", name, ok=False)
    podman("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:{inner_port}", *args)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        podman("rm", "-f", "-t", "2", name, ok=False)


def slides_folder(tmp: Path) -> Path:
    """A world-readable folder with a generated demo slide, mounted read-only."""
    from wsi_sampler.demo import DemoSlideSpec, write_demo_slide

    folder = tmp / "slides"
    folder.mkdir()
    write_demo_slide(folder / "demo.svs", DemoSlideSpec(width=6144, height=4608, mpp=0.25,
                                                        seed=3))
    folder.chmod(0o755)
    (folder / "demo.svs").chmod(0o644)
    tmp.chmod(0o755)
    return folder


def tar_members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()  # type: ignore[union-attr]
                if m.isfile()}


def check_routes(url: str, slides: Path) -> None:
    """Every kind of route a lab uses, against the running container."""
    check(httpx.get(f"{url}/healthz").status_code == 200, "/healthz 200")
    items = httpx.get(f"{url}/v1/slides").json()["items"]
    check([i["name"] for i in items] == ["demo.svs"], "slide listing shows the mounted slide")
    sid = items[0]["id"]
    info = httpx.get(f"{url}/v1/slides/{sid}").json()
    check(info["width"] == 6144 and info["mpp_x"] == 0.25, "slide info")
    page = httpx.get(f"{url}/viewer")
    osd = httpx.get(f"{url}/viewer/osd/openseadragon.min.js")
    check(page.status_code == 200 and "openseadragon.min.js" in page.text
          and osd.status_code == 200 and len(osd.content) > 100_000,
          "the viewer page and its OpenSeadragon (from the npm package) are in the image")
    dzi = httpx.get(f"{url}/v1/slides/{sid}/deepzoom.dzi")
    top = len(bin(max(6144, 4608) - 1)) - 2  # DeepZoom levels: 1 px up to full size
    tile = httpx.get(f"{url}/v1/slides/{sid}/deepzoom_files/{top}/0_0.jpeg")
    check(dzi.status_code == 200 and 'Width="6144"' in dzi.text and tile.status_code == 200
          and tile.content[:2] == b"\xff\xd8", "DeepZoom description and a tile")
    plan = httpx.post(f"{url}/v1/slides/{sid}/plan", json=PLAN).json()
    check(plan["n_patches"] == 8, "a plan")
    tar = httpx.post(f"{url}/v1/slides/{sid}/patches", json=PLAN, timeout=120)
    members = tar_members(tar.content)
    pngs = [m for m in members if m.endswith(".png")]
    check(tar.status_code == 200 and len(pngs) == 8, "a patch tar with 8 PNG patches")
    with httpx.stream("POST", f"{url}/v1/slides/{sid}/predictions", json=PLAN,
                      timeout=120) as resp:
        records = [json.loads(line) for line in resp.iter_lines() if line]
    check(resp.status_code == 200 and records[-1]["type"] == "summary"
          and len(records) == 9, "predictions stream (8 patches + summary)")
    upload = httpx.post(f"{url}/v1/slides", timeout=120, files={
        "file": ("upload.svs", (slides / "demo.svs").read_bytes())})
    check(upload.status_code == 201, "an upload (into /data)")
    job = httpx.post(f"{url}/v1/jobs", json={"slides": [sid, upload.json()["id"]],
                                             "sampling": PLAN}).json()["id"]
    deadline = time.monotonic() + 180
    while (status := httpx.get(f"{url}/v1/jobs/{job}").json())["state"] in ("queued",
                                                                            "running"):
        if time.monotonic() > deadline:
            raise Failed("job did not finish in 180 s")
        time.sleep(0.3)
    names = [r["name"] for r in status["results"]]
    check(status["state"] == "succeeded" and f"{sid}.predictions.csv" in names,
          f"a job finished: {status['state']} {status.get('errors') or ''}")
    csv = httpx.get(f"{url}/v1/jobs/{job}/results/{sid}.predictions.csv")
    check(csv.status_code == 200 and len(csv.text.splitlines()) == 9, "a job's result file")


def check_process(name: str) -> None:
    check(podman("exec", name, "id", "-u").stdout.strip() == "1000", "runs as uid 1000")
    touch = podman("exec", name, "sh", "-c", "touch /slides/x", ok=False)
    check(touch.returncode != 0, "the slide mount is read-only")
    health = podman("healthcheck", "run", name, ok=False)
    check(health.returncode == 0, "the image's HEALTHCHECK reports healthy")


_SEGMENTERS = """
import torch
from wsi_sampler.segmenters import build_segmenter, load_segmenter_card, segmenter_catalogue_names
for name in segmenter_catalogue_names():
    card = load_segmenter_card(name)
    with torch.device("meta"):
        count = sum(p.numel() for p in build_segmenter(card).parameters())
    assert abs(count - card.provenance.parameters) <= card.provenance.parameters_tolerance * count
    print(name)
"""


def check_segmenters() -> None:
    """The deep tissue and artefact segmenters' cards and libraries are in the image."""
    done = podman("run", "--rm", "--no-healthcheck", "--entrypoint", "python", IMAGE, "-c",
                  _SEGMENTERS, ok=False)
    names = done.stdout.split()
    check(done.returncode == 0 and {"hest", "grandqc", "grandqc-artifacts"} <= set(names),
          "the segmenters (HEST, GrandQC tissue and artefacts) build at their published size")


def idle_rss_mib(name: str) -> float:
    status = podman("exec", name, "cat", "/proc/1/status").stdout
    line = next(x for x in status.splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def check_sigterm(slides: Path, volume: str) -> None:
    """SIGTERM while a job runs: the container stops within the grace period and the job is
    left ``interrupted`` (never ``running``) in the database on the volume."""
    name = f"{PREFIX}-term"
    with container(name, "-v", f"{slides}:/slides:ro", "-v", f"{volume}:/data", IMAGE,
                   port=free_port()) as url:
        wait_ready(url, name)
        sid = httpx.get(f"{url}/v1/slides").json()["items"][0]["id"]
        body = {"slides": [sid] * 40, "sampling": {"strategy": "grid", "patch_size_px": 224}}
        job = httpx.post(f"{url}/v1/jobs", json=body).json()["id"]
        while httpx.get(f"{url}/v1/jobs/{job}").json()["state"] != "running":
            time.sleep(0.1)
        start = time.monotonic()
        podman("stop", "-t", "10", name)
        stopped = time.monotonic() - start
        code = podman("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip()
    check(stopped < 9 and code in ("0", "143"),
          f"SIGTERM stops the container in {stopped:.1f} s (grace 10 s), exit {code}")
    mount = podman("volume", "inspect", "-f", "{{.Mountpoint}}", volume).stdout.strip()
    db = sqlite3.connect(Path(mount) / "jobs.sqlite3")
    (state,) = db.execute("SELECT state FROM jobs WHERE id=?", (job,)).fetchone()
    db.close()
    check(state == "interrupted", f"the running job is left {state!r} after SIGTERM")


def check_port_setting(slides: Path) -> None:
    name = f"{PREFIX}-port"
    with container(name, "-e", "WSI_PORT=9000", "-v", f"{slides}:/slides:ro", IMAGE,
                   port=free_port(), inner_port=9000) as url:
        wait_ready(url, name)
        check(httpx.get(f"{url}/healthz").status_code == 200, "WSI_PORT=9000 is honoured")
        health = podman("healthcheck", "run", name, ok=False)
        check(health.returncode == 0, "the HEALTHCHECK follows WSI_PORT")


def check_bind_mount_error(tmp: Path, slides: Path) -> None:
    """A bind mount of a folder the engine (root) owns: one clear line, no traceback."""
    state = tmp / "state"
    state.mkdir(mode=0o755)
    done = podman("run", "--rm", "--no-healthcheck", "-v", f"{slides}:/slides:ro",
                  "-v", f"{state}:/data",
                  IMAGE, ok=False, timeout=120)
    err = done.stderr.strip()
    check(done.returncode != 0 and "Traceback" not in err and len(err.splitlines()) <= 3
          and "/data is not writable" in err and "chown 1000:1000" in err,
          f"an unwritable bind mount is one clear error: {err.splitlines()[-1:]}")
    state.chmod(0o777)  # what the README says works: a folder uid 1000 may write
    os.chown(state, 1000, 1000)
    done = podman("run", "--rm", "--no-healthcheck", "-v", f"{slides}:/slides:ro",
                  "-v", f"{state}:/data",
                  IMAGE, "score", "/slides", "--out", "/data/out", ok=False, timeout=300)
    check(done.returncode == 0 and any(state.joinpath("out").rglob("predictions.csv")),
          f"`score` of the mounted folder writes into a bind-mounted /data "
          f"(rc {done.returncode}: {done.stderr.strip().splitlines()[-1:]})")


def main() -> int:
    try:
        with tempfile.TemporaryDirectory(prefix="wsi-docker-") as tmp_name:
            run_checks(Path(tmp_name))
    except (Failed, subprocess.TimeoutExpired, httpx.HTTPError, AssertionError) as exc:
        print(f"FAILED: {exc}", flush=True)
        return 1
    finally:
        for volume in (f"{PREFIX}-data", f"{PREFIX}-term"):
            podman("volume", "rm", "-f", volume, ok=False)
    return 0


def run_checks(tmp: Path) -> None:
    size = podman("image", "inspect", "-f", "{{.Size}}", IMAGE).stdout.strip()
    print(f"measured: image size {int(size) / 1e9:.2f} GB", flush=True)
    slides = slides_folder(tmp)
    name = f"{PREFIX}-api"
    with container(name, "-v", f"{slides}:/slides:ro", "-v", f"{PREFIX}-data:/data", IMAGE,
                   port=free_port()) as url:
        ready = wait_ready(url, name)
        print(f"measured: container start to ready {ready:.1f} s", flush=True)
        time.sleep(3)
        print(f"measured: idle RSS {idle_rss_mib(name):.0f} MiB", flush=True)
        check(True, "/readyz 200 with a named volume at /data")
        check_routes(url, slides)
        check_process(name)
    check_segmenters()
    check_port_setting(slides)
    check_bind_mount_error(tmp, slides)
    check_sigterm(slides, f"{PREFIX}-term")
    check_compose(tmp, slides)


def check_compose(tmp: Path, slides: Path) -> None:
    """The compose file as shipped, in a project folder of its own (``./data/slides`` there):
    API + OIP worker, a prediction going through the worker, then down with its volumes."""
    project = tmp / "compose"
    (project / "data").mkdir(parents=True)
    shutil.copy(ROOT / "docker-compose.yml", project)
    shutil.copytree(slides, project / "data" / "slides")
    api_port, worker_port = free_port(), free_port()
    env = {**os.environ, "WSI_API_PORT": str(api_port), "WSI_WORKER_PORT": str(worker_port)}
    compose = ["podman-compose", "-p", f"{PREFIX}-compose"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*compose, *args], cwd=project, env=env, capture_output=True,
                              text=True, timeout=300)

    # a network left by an earlier run may predate the DNS plugin: start from a fresh one
    podman("network", "rm", "-f", f"{PREFIX}-compose_default", ok=False)
    try:
        up = run("up", "-d", "api", "worker")
        if up.returncode != 0:
            raise Failed(f"compose up: {(up.stdout + up.stderr)[-1500:]}")
        url, worker = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{worker_port}"
        wait_ready(url, f"{PREFIX}-compose_api_1")
        check(True, "compose: the API is ready once the worker is healthy")
        before = _worker_patches(worker)
        sid = httpx.get(f"{url}/v1/slides").json()["items"][0]["id"]
        with httpx.stream("POST", f"{url}/v1/slides/{sid}/predictions", json=PLAN,
                          timeout=120) as resp:
            records = [json.loads(line) for line in resp.iter_lines() if line]
        check(resp.status_code == 200 and len(records) == 9
              and _worker_patches(worker) - before == 8,
              "compose: predictions go through the OIP worker (its stats count the 8 patches)")
    finally:
        run("down", "-v")


def _worker_patches(worker: str) -> int:
    stats = httpx.get(f"{worker}/v2/models/stats").json()["model_stats"]
    return sum(int(m["inference_count"]) for m in stats)


if __name__ == "__main__":
    sys.exit(main())
