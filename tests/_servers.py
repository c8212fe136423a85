"""Run an ASGI app under a real uvicorn on 127.0.0.1 (an ephemeral port) for a test, and
small helpers for servers started as processes."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn


def slide_ids(url: str, api_key: str | None = None) -> dict[str, str]:
    """Path in its root -> id, of every slide the service at ``url`` lists."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    items = httpx.get(f"{url}/v1/slides", params={"limit": 1000},
                      headers=headers).json()["items"]
    return {i["path"]: i["id"] for i in items}


def wait_for_job(url: str, job_id: str, headers: dict[str, str] | None = None,
                 timeout_s: float = 120.0) -> dict[str, Any]:
    """Poll a job of the service at ``url`` until it is neither queued nor running."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while (status := httpx.get(f"{url}/v1/jobs/{job_id}", headers=headers or {}).json())[
            "state"] in ("queued", "running"):
        assert time.monotonic() < deadline, f"job {job_id} still {status['state']}"
        time.sleep(0.1)
    return dict(status)


def folder_settings(tmp_path: Path, slides: dict[str, Path], **settings: Any) -> Any:
    """Service settings over ``tmp_path/slides`` holding a copy of each ``slides`` file (name
    -> source), data in ``tmp_path/data``, no demo slide, on the CPU; ``settings`` added."""
    import shutil

    from api.config import Settings

    root = tmp_path / "slides"
    root.mkdir(exist_ok=True)
    for name, source in slides.items():
        shutil.copy(source, root / name)
    values: dict[str, Any] = {"slide_roots": [root], "data_dir": tmp_path / "data",
                              "demo_slide": False, "device": "cpu"}
    return Settings(**(values | settings))


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now (for servers we start as processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it does not stop within 20 s."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextmanager
def serve(app: Any, *, ready_path: str | None = None, timeout_s: float = 60.0,
          tls: tuple[Path, Path] | None = None) -> Iterator[str]:
    """Yield the base URL of ``app`` served by uvicorn (HTTPS with ``tls`` = (certificate,
    key)); stop it on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    ssl_files = {"ssl_certfile": str(tls[0]), "ssl_keyfile": str(tls[1])} if tls else {}
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                           **ssl_files))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        if ready_path is not None:
            import httpx

            verify = ssl.create_default_context(cafile=str(tls[0])) if tls else True
            while httpx.get(url + ready_path, verify=verify).status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{ready_path} never became ready")
                time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
