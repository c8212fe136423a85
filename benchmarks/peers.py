"""Peers side by side in our harness: slide file to uint8 patch arrays.

Run ``python -m benchmarks.peers``. The same generated 40,000 x 30,000 slide at 0.25 µm/px
(workload A's), two workloads: B = 224 px at 0.5 µm/px, A = 256 px at level 0. Contestants:
wsi-sampler; TIAToolbox's sliding-window patch extractor and its WSI patch dataset in a
DataLoader with 2 workers; LazySlide (find_tissues + tile_tissues + reading every tile); a
CLAM-style openslide ``read_region`` loop and the same in a DataLoader with 2 workers (over
the coordinates wsi-sampler planned). Each tool finds its own tissue and patches (their
counts are reported) and runs in its own process, from its own virtual environment under
``~/.cache/wsi-sampler/peers`` (made by this script on first use, ~5 GB: both peers pull
torch); timings exclude interpreter start-up and imports. Peak RSS is the whole process
tree's (DataLoader workers included), sampled every 20 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

from wsi_sampler import PlanParams, make_plan, open_slide

from ._harness import ensure_slide, machine, warm_page_cache
from .extract import SPECS

PEERS_DIR = Path(os.environ.get("WSI_PEERS_DIR", Path.home() / ".cache/wsi-sampler/peers"))
DRIVER = Path(__file__).resolve().parent / "peer_driver.py"
# torch from this machine's local wheels (pip takes them from disk); TIAToolbox 2.1.3 pins
# torch < 2.13, which only a multi-GB CUDA download satisfies here, so it gets 2.14.1 beside
# every other requirement exactly as it pins them (its own code runs unchanged).
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
PEERS = {"tiatoolbox": "tiatoolbox==2.1.3", "lazyslide": "lazyslide==0.13.0"}
OURS = "wsi-sampler"
CONTESTANTS = [(OURS, None), ("tiatoolbox-extractor", "tiatoolbox"),
               ("tiatoolbox-dataset", "tiatoolbox"), ("lazyslide", "lazyslide"),
               ("clam-loop", None), ("clam-dataloader", None)]
# What each contestant starts from and how much of the worker budget it can use.
START = {OURS: "slide file: own tissue + patches", "tiatoolbox-extractor": "slide file: own "
         "Otsu mask + patches", "tiatoolbox-dataset": "slide file: own mask + patches",
         "lazyslide": "slide file: own tissue + tiles",
         "clam-loop": "wsi-sampler's coordinates", "clam-dataloader": "wsi-sampler's coordinates"}
PARALLEL = {OURS: "{n} threads", "tiatoolbox-extractor": "1 (no worker option)",
            "tiatoolbox-dataset": "{n} DataLoader workers", "lazyslide": "1 (no worker option)",
            "clam-loop": "1 (CLAM's loop)", "clam-dataloader": "{n} DataLoader workers"}
WORKLOADS = {"B": PlanParams(patch_size_px=224, target_mpp=0.5),
             "A": PlanParams(patch_size_px=256)}


def _pip(venv: Path, *args: str) -> None:
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet",
                    "--disable-pip-version-check", *args], check=True)


def peer_python(name: str) -> Path:
    """The Python of the peer's virtual environment, made on first use."""
    venv = PEERS_DIR / name
    stamp = venv / f".installed-{PEERS[name]}"
    if stamp.exists():
        return venv / "bin" / "python"
    print(f"installing {PEERS[name]} into {venv} (one-time) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    _pip(venv, *TORCH)
    if name == "tiatoolbox":
        _pip(venv, *_requirements_without_torch(venv, PEERS[name]))
        _pip(venv, "--no-deps", PEERS[name])
    else:
        _pip(venv, PEERS[name])
    stamp.touch()
    return venv / "bin" / "python"


def _requirements_without_torch(venv: Path, spec: str) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([str(venv / "bin" / "pip"), "download", "--quiet", "--no-deps",
                        "--disable-pip-version-check", spec, "-d", tmp], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            lines = zf.read(meta).decode().splitlines()
    reqs = [line.split(": ", 1)[1] for line in lines if line.startswith("Requires-Dist: ")]
    return [r for r in reqs if "extra ==" not in r
            and not r.replace(" ", "").startswith(("torch<", "torch>", "torch=",
                                                   "torchvision"))]


def _tree_rss_mib(pid: int) -> float:
    """RSS of ``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total / 2**20


def run_once(python: Path, contestant: str, slide: Path, workload: str, coords: Path,
             workers: int) -> dict[str, float]:
    proc = subprocess.Popen([str(python), str(DRIVER), contestant, str(slide), workload,
                             str(coords)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONWARNINGS": "ignore",
                                            "WSI_BENCH_WORKERS": str(workers)})
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], _tree_rss_mib(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate(timeout=1800)
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{contestant} failed: {err.strip().splitlines()[-1:]}")
    result = json.loads(out.strip().splitlines()[-1])
    return {"patches": result["patches"], "seconds": result["seconds"], "rss": peak[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated contestants")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                    help="threads / DataLoader workers every contestant may use (all cores)")
    args = ap.parse_args()
    only = {c for c in args.only.split(",") if c}
    slide = ensure_slide("A", SPECS["A"])
    warm_page_cache(slide)
    pythons = {None: Path(sys.executable)}
    with tempfile.TemporaryDirectory() as tmp:
        for workload, params in WORKLOADS.items():
            with open_slide(slide) as s:
                plan = make_plan(s, params)
            coords = Path(tmp) / f"{workload}.npy"
            np.save(coords, np.stack([plan.x0, plan.y0], axis=1).astype(np.int64))
            print(f"\nworkload {workload}: {params.patch_size_px} px at "
                  f"{params.target_mpp or 0.25} µm/px; wsi-sampler plans {len(plan)} patches")
            print(f"worker budget: {args.workers} per contestant\n")
            print("| contestant | starts from | parallelism | patches | patches/s | ours ÷ this "
                  "| peak RSS MiB |\n|---|---|---|---:|---:|---:|---:|")
            ours_rate = None
            for contestant, env in CONTESTANTS:
                if only and contestant not in only:
                    continue
                try:
                    python = pythons.get(env) or pythons.setdefault(env, peer_python(env))
                    runs = [run_once(python, contestant, slide, workload, coords, args.workers)
                            for _ in range(args.repeats)]
                except (RuntimeError, subprocess.SubprocessError) as exc:
                    print(f"| {contestant} | failed: {exc} ||||||")
                    continue
                rate = runs[0]["patches"] / statistics.median(r["seconds"] for r in runs)
                if contestant == OURS:
                    ours_rate = rate
                # a ratio only against our own row of this run (never a peer's stand-in)
                ratio = f"{ours_rate / rate:.2f}" if ours_rate else "n/a (no wsi-sampler row)"
                print(f"| {contestant} | {START[contestant]} | "
                      f"{PARALLEL[contestant].format(n=args.workers)} | "
                      f"{int(runs[0]['patches']):,} | {rate:,.0f} | {ratio} | "
                      f"{max(r['rss'] for r in runs):,.0f} |", flush=True)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()}; medians of "
          f"{args.repeats}; `python -m benchmarks.peers --repeats {args.repeats} --workers "
          f"{args.workers}`")


if __name__ == "__main__":
    main()
