"""Real counterparts whose dependencies clash with ours live in their own virtual
environments, made by ``make tools`` (``make test`` runs it) under ``WSI_TOOLS_DIR``
(default ``~/.cache/wsi-sampler/tools``, kept between runs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def tools_dir() -> Path:
    return Path(os.environ.get("WSI_TOOLS_DIR", Path.home() / ".cache/wsi-sampler/tools"))


def tool_bin(env: str, program: str) -> Path:
    """``<tools>/<env>/bin/<program>``, or skip with how to make it."""
    path = tools_dir() / env / "bin" / program
    if not path.exists():
        pytest.skip(f"{path} is missing: `make tools` installs it (make test runs it)")
    return path
