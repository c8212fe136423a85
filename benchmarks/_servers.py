"""Start wsi-sampler servers as child processes on 127.0.0.1 for benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def cli_server(args: list[str], ready_path: str, *, env: dict[str, str] | None = None,
               timeout_s: float = 180.0) -> Iterator[str]:
    """Run ``wsi-sampler <args> --port P`` and yield its URL once ``ready_path`` is 200."""
    with cli_server_process(args, ready_path, env=env, timeout_s=timeout_s) as (url, _):
        yield url


@contextmanager
def cli_server_process(
    args: list[str], ready_path: str, *, env: dict[str, str] | None = None,
    timeout_s: float = 180.0,
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Like :func:`cli_server`, yielding (URL, the server process)."""
    port = free_port()
    cmd = [sys.executable, "-c", "from wsi_sampler.cli import main; main()", *args,
           "--port", str(port), "--host", "127.0.0.1"]
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
            try:
                if httpx.get(url + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become ready")
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
