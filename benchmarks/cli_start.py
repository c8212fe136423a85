"""How long the CLI takes to answer: the median wall time of commands that run no model
(``--help``, ``info``, ``plan``, ``tissue``, ``models list``) and of ``import torch`` beside
them, in one run. ``python -m benchmarks.cli_start [--repeat N]``; for a per-module
breakdown: ``python -X importtime -c 'import wsi_sampler.cli'``."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SLIDE = Path(__file__).resolve().parents[2] / "shared" / "slides" / "CMU-1-Small-Region.svs"


def _time(argv: list[str], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    repeat = parser.parse_args().repeat
    cli = [str(Path(sys.executable).with_name("wsi-sampler"))]
    with tempfile.TemporaryDirectory() as tmp:
        cases = {"--help": ["--help"], "models list": ["models", "list"],
                 "info": ["info", str(SLIDE)], "plan": ["plan", str(SLIDE), "--out",
                                                         f"{tmp}/p.json"],
                 "tissue": ["tissue", str(SLIDE), "--out", f"{tmp}/m.png"]}
        print(f"| command | median wall s ({repeat} runs) |\n|---|---:|")
        for name, args in cases.items():
            print(f"| wsi-sampler {name} | {_time([*cli, *args], repeat):.2f} |")
        torch_s = _time([sys.executable, "-c", "import torch"], repeat)
        print(f"| python -c 'import torch' | {torch_s:.2f} |")


if __name__ == "__main__":
    main()
