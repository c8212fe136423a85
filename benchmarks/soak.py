"""Soak: many clients against one real server, for minutes, mixing every slide route.

Run ``python -m benchmarks.soak`` (``make soak``). The service runs as its own process
(``wsi-sampler serve``) over a slide root with the demo slide, a damaged copy of it and
``--extra-files`` non-slide files (so index cost shows). ``--clients`` threads loop over a
weighted mix of requests (patch streams as tar and NDJSON, predictions, plans, thumbnails,
tissue masks, slide info, unknown ids) for ``--seconds``; a separate prober times
``/healthz`` all along. Reported: requests/s, p50/p99 time to first byte per kind, 429s,
5xx (must be 0), aborted streams, ``/healthz`` p50/p99, and the server's RSS before, at
its peak and ``--settle`` seconds after the load stopped.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from wsi_sampler.demo import write_demo_slide

from ._servers import cli_server_process

MIX: list[tuple[str, int]] = [
    ("patches-tar", 3), ("patches-ndjson", 2), ("predictions", 2), ("plan", 2),
    ("thumbnail", 2), ("tissue", 1), ("info", 2), ("unknown-id", 1), ("damaged", 1),
]
SAMPLE = {"strategy": "random", "n_patches": 48, "patch_size_px": 224, "target_mpp": 0.5}


@dataclass
class Tally:
    first_byte_s: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: Counter[int] = field(default_factory=Counter)
    aborted: int = 0
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, status: int, first_s: float, aborted: bool) -> None:
        with self.lock:
            self.requests += 1
            self.statuses[status] += 1
            self.first_byte_s[kind].append(first_s)
            self.aborted += aborted


def one_request(client: httpx.Client, kind: str, ids: dict[str, str]) -> tuple[int, float, bool]:
    sid = ids["damaged.svs" if kind == "damaged" else "demo.svs"]
    base = f"/v1/slides/{sid}"
    method, path, params, body = {
        "patches-tar": ("POST", f"{base}/patches", None, SAMPLE),
        "patches-ndjson": ("POST", f"{base}/patches", {"format": "ndjson"}, SAMPLE),
        "predictions": ("POST", f"{base}/predictions", None,
                        {"strategy": "random", "n_patches": 48}),
        "plan": ("POST", f"{base}/plan", None, {"strategy": "medgemma", "seed": 3}),
        "thumbnail": ("GET", f"{base}/thumbnail", {"max_size": 1024}, None),
        "tissue": ("GET", f"{base}/tissue", {"format": "geojson"}, None),
        "info": ("GET", base, None, None),
        "unknown-id": ("GET", f"/v1/slides/{random.getrandbits(96):024x}", None, None),
        "damaged": ("POST", f"{base}/patches", None, SAMPLE),
    }[kind]
    t = time.perf_counter()
    first = None
    with client.stream(method, path, params=params, json=body) as resp:
        try:
            for _ in resp.iter_raw():
                first = first or time.perf_counter() - t
        except httpx.RemoteProtocolError:
            return resp.status_code, first or time.perf_counter() - t, True
    return resp.status_code, first or time.perf_counter() - t, False


def client_loop(url: str, ids: dict[str, str], stop: threading.Event, tally: Tally,
                seed: int) -> None:
    rng = random.Random(seed)
    kinds, weights = zip(*MIX, strict=True)
    with httpx.Client(base_url=url, timeout=120) as client:
        while not stop.is_set():
            kind = rng.choices(kinds, weights)[0]
            status, first, aborted = one_request(client, kind, ids)
            tally.add(kind, status, first, aborted)
            if status == 429:
                time.sleep(0.05)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def make_root(root: Path, extra_files: int) -> None:
    demo = write_demo_slide(root / "demo.svs")
    data = bytearray(demo.read_bytes())
    data[len(data) // 2 :] = b"\x5a" * (len(data) - len(data) // 2)  # lower tiles damaged
    (root / "damaged.svs").write_bytes(bytes(data))
    notes = root / "notes"
    notes.mkdir()
    for i in range(extra_files):
        (notes / f"{i:06d}.txt").write_text("not a slide")


def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "slides"
        root.mkdir()
        make_root(root, args.extra_files)
        env = {"WSI_SLIDE_ROOTS": f'["{root}"]', "WSI_DATA_DIR": str(Path(tmp) / "data"),
               "WSI_DEMO_SLIDE": "false", "WSI_DEVICE": "cpu",
               "WSI_MAX_CONCURRENT_STREAMS": str(args.streams),
               "WSI_MALLOC_ARENA_MAX": str(args.arena_max)}
        with cli_server_process(["serve"], "/readyz", env=env) as (url, proc):
            ids = {i["name"]: i["id"] for i in httpx.get(f"{url}/v1/slides").json()["items"]}
            before = rss_mib(proc.pid)
            tally, stop, peak, health = Tally(), threading.Event(), [before], []
            threads = [threading.Thread(target=client_loop, args=(url, ids, stop, tally, i))
                       for i in range(args.clients)]
            for t in threads:
                t.start()
            t0 = time.monotonic()
            while time.monotonic() - t0 < args.seconds:
                h = time.perf_counter()
                httpx.get(f"{url}/healthz", timeout=60)
                health.append(time.perf_counter() - h)
                peak[0] = max(peak[0], rss_mib(proc.pid))
                time.sleep(0.25)
            stop.set()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - t0
            time.sleep(args.settle)
            after = rss_mib(proc.pid)
    report(args, tally, elapsed, health, (before, peak[0], after))


def report(args: argparse.Namespace, tally: Tally, elapsed: float, health: list[float],
           rss: tuple[float, float, float]) -> None:
    server_errors = sum(n for s, n in tally.statuses.items() if s >= 500)
    print(f"\n{args.clients} clients, {elapsed:.0f} s, {args.streams} stream slots, "
          f"{args.extra_files:,} extra files in the root, malloc_arena_max={args.arena_max}\n")
    print(f"requests: {tally.requests} ({tally.requests / elapsed:.1f}/s); statuses: "
          f"{dict(sorted(tally.statuses.items()))}; 429: {tally.statuses[429]}; "
          f"5xx: {server_errors}; aborted streams: {tally.aborted}")
    print("\n| request | n | first byte p50 ms | p99 ms |\n|---|---:|---:|---:|")
    for kind, values in sorted(tally.first_byte_s.items()):
        print(f"| {kind} | {len(values)} | {pct(values, 0.5):.0f} | {pct(values, 0.99):.0f} |")
    print(f"| /healthz (prober) | {len(health)} | {pct(health, 0.5):.0f} | "
          f"{pct(health, 0.99):.0f} |")
    before, peak, after = rss
    print(f"\nserver RSS: before {before:.0f} MiB, peak {peak:.0f} MiB, "
          f"{args.settle:.0f} s after {after:.0f} MiB")
    if server_errors:
        print("FAIL: the server answered 5xx")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--streams", type=int, default=4, help="max_concurrent_streams")
    parser.add_argument("--extra-files", type=int, default=20_000)
    parser.add_argument("--settle", type=float, default=30)
    parser.add_argument("--arena-max", type=int, default=4,
                        help="the service's malloc_arena_max (0 = glibc's default)")
    args = parser.parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
