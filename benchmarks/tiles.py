"""DeepZoom tiles for viewers: the service over HTTP vs openslide's DeepZoomGenerator.

Run ``python -m benchmarks.tiles``. On the 40,000 x 30,000 benchmark slide (0.25 µm/px,
JPEG tiles), a viewer's pattern: open at a level where the slide fits a 1200 x 800 window,
zoom in level by level on a point in the tissue, pan one window right and down at the two
finest levels; every tile a 1200 x 800 window shows at each step (254 px tiles, overlap 1,
JPEG q90, as OpenSeadragon asks for them). Contestants, on the same tiles:

- **wsi-sampler**: the service in its own process, each viewer a client with 4 keep-alive
  connections (a browser's per-host parallelism, below the service's per-client cap) and
  its own API key; cold = a fresh server (no open slide, no cached tile), warm = the same pattern
  again; 1 and 8 viewers (8: each on its own part of the slide, so the cache does not help);
- **DeepZoomGenerator**: openslide-python's, in-process, ``get_tile`` + Pillow JPEG q90 (what
  its example server does per request), on 1 thread and on every core (a fresh
  ``OpenSlide`` for the cold run);
- **wsi-sampler in-process**: the same tiles through what the service runs per tile
  (``DeepZoom.tile`` with ``dct_scaling`` + JPEG q90, a fresh slide and decoded-tile cache),
  on 1 thread and on every core: the like-for-like comparison, without HTTP.

Reported: tiles/s, p50 / p99 latency per tile, the server's CPU time per tile (its share
of the 2 cores the clients also use), server RSS before and after. Goals (issue
"See it"): cold tiles/s >= 2x DeepZoomGenerator; p99 < 100 ms for 8 viewers on 2 cores.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from ._harness import ensure_slide, machine, warm_page_cache
from ._servers import cli_server_process
from .extract import SPECS

WINDOW = (1200, 800)
TILE, OVERLAP = 254, 1
Tile = tuple[int, int, int]


def viewer_pattern(width: int, height: int, focus: tuple[float, float]) -> list[Tile]:
    """The tiles a window shows while zooming in on ``focus`` (fractions of the slide) and
    panning at the two finest levels, in the order a viewer asks for them."""
    levels, size = [(width, height)], (width, height)
    while size != (1, 1):
        size = (max(1, -(-size[0] // 2)), max(1, -(-size[1] // 2)))
        levels.append(size)
    levels.reverse()  # DeepZoom level 0 = 1 x 1
    first = next(i for i, (w, h) in enumerate(levels) if w > WINDOW[0] or h > WINDOW[1]) - 1
    tiles: list[Tile] = []
    for level in range(max(first, 0), len(levels)):
        w, h = levels[level]
        cx, cy = focus[0] * w, focus[1] * h
        views = [(cx, cy)]
        if level >= len(levels) - 2:
            views += [(cx + WINDOW[0], cy), (cx + WINDOW[0], cy + WINDOW[1])]
        for vx, vy in views:
            x0, y0 = max(0, vx - WINDOW[0] / 2), max(0, vy - WINDOW[1] / 2)
            x1, y1 = min(w, x0 + WINDOW[0]), min(h, y0 + WINDOW[1])
            tiles += [(level, c, r) for r in range(int(y0 // TILE), int((y1 - 1) // TILE) + 1)
                      for c in range(int(x0 // TILE), int((x1 - 1) // TILE) + 1)
                      if (level, c, r) not in tiles]
    return tiles


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


def run_viewers(url: str, sid: str, patterns: list[list[Tile]], keys: list[str]
                ) -> tuple[float, list[float], int]:
    """(seconds, per-tile latencies, tiles) for every viewer's pattern at once. Each viewer
    has 4 keep-alive connections (http.client: a browser's work is not on the server's
    machine, and httpx's own CPU took half of these 2 cores)."""
    latencies: list[float] = []
    host, port = urlsplit(url).hostname or "127.0.0.1", urlsplit(url).port

    def one_viewer(pattern: list[Tile], key: str) -> None:
        todo = iter(pattern)
        lock = threading.Lock()

        def connection_loop() -> None:
            conn = http.client.HTTPConnection(host, port, timeout=120)
            headers = {"Authorization": f"Bearer {key}"}
            try:
                while True:
                    with lock:
                        tile = next(todo, None)
                    if tile is None:
                        return
                    level, col, row = tile
                    t = time.perf_counter()
                    conn.request("GET", f"/v1/slides/{sid}/deepzoom_files/{level}/"
                                        f"{col}_{row}.jpeg", headers=headers)
                    answer = conn.getresponse()
                    body = answer.read()
                    if answer.status != 200 or not body:
                        raise RuntimeError(f"tile {tile}: HTTP {answer.status}")
                    latencies.append(time.perf_counter() - t)
            finally:
                conn.close()

        with ThreadPoolExecutor(4) as pool:
            for done in [pool.submit(connection_loop) for _ in range(4)]:
                done.result()

    start = time.perf_counter()
    with ThreadPoolExecutor(len(patterns)) as pool:
        list(pool.map(one_viewer, patterns, keys))
    return time.perf_counter() - start, latencies, sum(len(p) for p in patterns)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dzg_rate(path: Path, tiles: list[Tile], threads: int) -> tuple[float, list[float]]:
    """DeepZoomGenerator: get_tile + Pillow JPEG q90 per tile, on ``threads`` threads."""
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    dz = DeepZoomGenerator(openslide.OpenSlide(str(path)), tile_size=TILE, overlap=OVERLAP)
    latencies: list[float] = []

    def one(tile: Tile) -> None:
        t = time.perf_counter()
        buf = io.BytesIO()
        dz.get_tile(tile[0], (tile[1], tile[2])).save(buf, "JPEG", quality=90)
        latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, tiles))
    return len(tiles) / (time.perf_counter() - start), latencies


def ours_rate(path: Path, tiles: list[Tile], threads: int) -> tuple[float, list[float]]:
    """wsi-sampler's DeepZoom in-process: the service's per-tile work, on ``threads``."""
    from wsi_sampler import open_slide
    from wsi_sampler.deepzoom import DecodedTiles, DeepZoom
    from wsi_sampler.encoding import encode_jpeg

    latencies: list[float] = []
    with open_slide(path) as slide:
        dz = DeepZoom(slide, tile_size=TILE, overlap=OVERLAP, decoded=DecodedTiles(64))

        def one(tile: Tile) -> None:
            t = time.perf_counter()
            encode_jpeg(dz.tile(*tile, dct_scaling=True), 90)
            latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, tiles))
        return len(tiles) / (time.perf_counter() - start), latencies


def row(name: str, tiles: int, seconds: float, lat: list[float], extra: str = "") -> str:
    return (f"| {name} | {tiles} | {tiles / seconds:,.0f} | {pct(lat, 0.5):.0f} | "
            f"{pct(lat, 0.99):.0f} | {extra} |")


def service_rows(path: Path, single: list[Tile], many: list[list[Tile]]) -> list[str]:
    keys = [f"viewer-key-{i}" for i in range(len(many))]
    with tempfile.TemporaryDirectory() as tmp:
        slides = Path(tmp) / "slides"
        slides.mkdir()
        shutil.copy(path, slides / "big.svs")  # the service serves no symlinks out of a root
        env = {"WSI_SLIDE_ROOTS": f'["{slides}"]', "WSI_DATA_DIR": str(Path(tmp) / "data"),
               "WSI_DEMO_SLIDE": "false", "WSI_DEVICE": "cpu", "WSI_API_KEYS": json.dumps(keys)}
        out = []
        for label, patterns in (("1 viewer", [single]), (f"{len(many)} viewers", many)):
            with cli_server_process(["serve"], "/readyz", env=env) as (url, proc):
                items = httpx.get(f"{url}/v1/slides", headers={
                    "Authorization": f"Bearer {keys[0]}"}).json()["items"]
                sid = items[0]["id"]
                before = rss_mib(proc.pid)
                for phase in ("cold", "warm"):
                    cpu = cpu_seconds(proc.pid)
                    sec, lat, n = run_viewers(url, sid, patterns, keys[:len(patterns)])
                    cpu_ms = (cpu_seconds(proc.pid) - cpu) / n * 1000
                    out.append(row(f"wsi-sampler, {label}, {phase}", n, sec, lat,
                                   f"server CPU {cpu_ms:.1f} ms/tile; server RSS "
                                   f"{before:,.0f} -> {rss_mib(proc.pid):,.0f} MiB"))
                    print(out[-1], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--viewers", type=int, default=8)
    args = parser.parse_args(argv)
    path = ensure_slide("A", SPECS["A"])
    warm_page_cache(path)
    import openslide

    w, h = openslide.OpenSlide(str(path)).dimensions
    focus = [(0.5, 0.5), (0.3, 0.4), (0.7, 0.6), (0.4, 0.7), (0.6, 0.3), (0.25, 0.6),
             (0.75, 0.4), (0.5, 0.25)]
    single = viewer_pattern(w, h, focus[0])
    many = [viewer_pattern(w, h, focus[i % len(focus)]) for i in range(args.viewers)]
    cores = len(os.sched_getaffinity(0))
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine()}; "
          f"`python -m benchmarks.tiles --viewers {args.viewers}`; a viewer's pattern: "
          f"{len(single)} tiles\n")
    print("| contestant | tiles | tiles/s | p50 ms | p99 ms | note |\n"
          "|---|---:|---:|---:|---:|---|")
    reference: dict[int, float] = {}
    in_process: dict[int, float] = {}
    for threads in (1, cores):
        rate, lat = dzg_rate(path, single, threads)
        reference[threads] = rate
        print(row(f"DeepZoomGenerator in-process, {threads} thread(s), cold", len(single),
                  len(single) / rate, lat, "get_tile + Pillow JPEG q90"), flush=True)
        rate, lat = ours_rate(path, single, threads)
        in_process[threads] = rate
        print(row(f"wsi-sampler DeepZoom in-process, {threads} thread(s), cold", len(single),
                  len(single) / rate, lat, "tile(dct_scaling) + JPEG q90"), flush=True)
    rows = service_rows(path, single, many)
    cold_1 = float(rows[0].split("|")[3].replace(",", ""))
    print("\nin-process, cold: wsi-sampler ÷ DeepZoomGenerator = "
          + ", ".join(f"{in_process[t] / reference[t]:.2f} on {t} thread(s)"
                      for t in sorted(reference)) + " (goal >= 2)")
    print(f"over HTTP, 1 viewer, cold ÷ DeepZoomGenerator in-process on {cores} threads: "
          f"{cold_1 / reference[cores]:.2f}; ÷ 1 thread: {cold_1 / reference[1]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
