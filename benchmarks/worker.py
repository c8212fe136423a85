"""Model worker throughput: in-process vs over HTTP (binary and JSON tensors).

Run ``python -m benchmarks.worker``. The worker runs as its own process
(``wsi-sampler worker``), the client here; patches are 224 px uint8 in batches of the
model's max batch. Models: the built-in tissue-qc and a ResNet-18-size timm model with
random weights (``--random-weights``, benchmark only). Goal: HTTP binary >= 0.8 x in-process
for the ResNet-size model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from wsi_sampler.models import load_model
from wsi_sampler.worker import InProcessWorker, RemoteWorker, Worker

from ._servers import cli_server

RESNET_CARD = {
    "name": "resnet18-random", "architecture": "timm:resnet18", "patch_size_px": 224,
    "target_mpp": 0.5, "max_batch": 32,
    "outputs": [{"name": "logits", "class_names": ["a", "b"], "activation": "softmax"}],
}


def rate(worker: Worker, patches: np.ndarray, repeats: int) -> float:
    worker.infer(patches[: worker.card.max_batch])  # warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        worker.infer(patches)
        times.append(time.perf_counter() - t)
    return len(patches) / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (args.patches, 224, 224, 3), dtype=np.uint8)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        card = Path(tmp) / "resnet18-random.json"
        card.write_text(json.dumps(RESNET_CARD))
        for label, spec, extra in (("tissue-qc", "tissue-qc", []),
                                   ("resnet18 (timm, random)", str(card), ["--random-weights"])):
            local = InProcessWorker(load_model(spec, device="cpu", allow_random_weights=True))
            base = rate(local, patches, args.repeats)
            with cli_server(["worker", "--model", spec, "--device", "cpu", *extra],
                            "/v2/health/ready") as url:
                name = local.card.name
                binary = rate(RemoteWorker(url, name, binary=True), patches, args.repeats)
                as_json = rate(RemoteWorker(url, name, binary=False), patches, args.repeats)
            rows.append((label, base, binary, as_json))
            print(f"{label}: in-process {base:,.0f}/s, HTTP binary {binary:,.0f}/s, "
                  f"HTTP JSON {as_json:,.0f}/s", flush=True)
    print("\n| model | in-process patches/s | HTTP binary | binary ÷ in-process | HTTP JSON "
          "| JSON ÷ in-process |\n|---|---:|---:|---:|---:|---:|")
    for label, base, binary, as_json in rows:
        print(f"| {label} | {base:,.0f} | {binary:,.0f} | {binary / base:.2f} | "
              f"{as_json:,.0f} | {as_json / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
