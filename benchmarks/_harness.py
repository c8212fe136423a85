"""Shared benchmark plumbing: generated slides, isolated runs with peak RSS, tables."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_sampler.demo import DemoSlideSpec, write_demo_slide

SLIDE_DIR = Path(__file__).resolve().parent / "_slides"


def ensure_slide(name: str, spec: DemoSlideSpec) -> Path:
    """Generate ``spec`` once into benchmarks/_slides/ (the file name carries a spec hash)."""
    digest = hashlib.sha256(repr(spec).encode()).hexdigest()[:10]
    path = SLIDE_DIR / f"{name}-{spec.width}x{spec.height}-{digest}.svs"
    if not path.exists():
        SLIDE_DIR.mkdir(parents=True, exist_ok=True)
        print(f"generating {path.name} (one-time) ...", flush=True)
        t = time.perf_counter()
        write_demo_slide(path, spec)
        print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)
    return path


def warm_page_cache(path: Path) -> None:
    """Read the file once so every contestant starts with the same (warm) page cache."""
    with path.open("rb") as fh:
        while fh.read(1 << 24):
            pass


def median_seconds(fn: Callable[[], int], repeats: int) -> tuple[int, float]:
    """Run ``fn`` once to warm up, then ``repeats`` timed runs; return (count, median s)."""
    count = fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        count = fn()
        times.append(time.perf_counter() - t)
    return count, statistics.median(times)


def peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec,
    so a child would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(fn: Callable[..., dict[str, Any]], args: tuple[Any, ...], queue: Any) -> None:
    try:
        result = fn(*args)
        result["peak_rss_mib"] = peak_rss_mib()
        queue.put(result)
    except Exception as exc:  # reported in the table, not fatal to the harness
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def run_isolated(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run ``fn(*args)`` in a fresh process so its peak RSS is its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    result: dict[str, Any] = queue.get()
    proc.join()
    return result


@dataclass
class Row:
    workload: str
    contestant: str
    threads: int
    patches: int
    seconds: float
    peak_rss_mib: float
    note: str = ""

    @property
    def rate(self) -> float:
        return self.patches / self.seconds if self.seconds > 0 else float("nan")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores, Python {platform.python_version()}, {platform.system()}"


def table(rows: Sequence[Row], ours: dict[str, float]) -> str:
    """Markdown table; ``ours`` maps workload -> our patches/s for the ratio column."""
    out = [
        "| workload | contestant | threads | patches | patches/s | ours ÷ this "
        "| peak RSS MiB | note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = ours.get(r.workload, float("nan")) / r.rate if r.rate else float("nan")
        out.append(
            f"| {r.workload} | {r.contestant} | {r.threads} | {r.patches} | {r.rate:,.0f} | "
            f"{ratio:.2f} | {r.peak_rss_mib:,.0f} | {r.note} |"
        )
    return "\n".join(out)
