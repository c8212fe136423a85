"""Docker and compose files, checked without a Docker engine: hadolint, and every file,
command, route and config they name exists and works."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from wsi_sampler.cli import main; main()"]


def dockerfile() -> list[str]:
    """Logical lines (continuations joined)."""
    lines, cur = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        if raw.lstrip().startswith("#"):
            continue
        cur += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            if cur.strip():
                lines.append(cur.strip())
            cur = ""
    return lines


def instruction(name: str) -> list[str]:
    return [line[len(name) + 1 :] for line in dockerfile() if line.startswith(name + " ")]


def test_hadolint_passes() -> None:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    r = subprocess.run([exe, "--failure-threshold", "warning", str(ROOT / "Dockerfile")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_build_context_is_what_the_dockerfile_copies() -> None:
    """.dockerignore excludes everything, then lets in exactly the COPY sources."""
    patterns = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"
    let_in = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for args in instruction("COPY"):
        *sources, _ = args.split()
        for src in sources:
            assert (ROOT / src).exists(), src
            copied.add(src.rstrip("/"))
    assert let_in == copied


def test_the_image_and_the_tests_run_the_same_torch() -> None:
    import torch

    (pin,) = [a.split("=", 1)[1] for a in instruction("ARG") if a.startswith("TORCH_VERSION=")]
    assert torch.__version__.split("+")[0] == pin
    makefile = (ROOT / "Makefile").read_text()
    assert "sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile" in makefile


def test_image_shape() -> None:
    base = instruction("FROM")[0]
    assert "slim" in base
    assert instruction("USER") == ["1000"]  # the non-root user created in the image
    assert json.loads(instruction("ENTRYPOINT")[0]) == ["wsi-sampler"]
    assert any("TORCH_INDEX" in a for a in instruction("ARG"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "wsi-sampler" in scripts


def test_default_command_and_healthcheck_work() -> None:
    cmd = json.loads(instruction("CMD")[0])
    assert cmd == ["serve"]  # host and port from WSI_HOST / WSI_PORT, as the HEALTHCHECK
    r = subprocess.run([*CLI, *cmd, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    health = instruction("HEALTHCHECK")[0]
    assert "/readyz" in health and "WSI_PORT" in health
    from api.app import create_app

    paths = {getattr(r, "path", None) for r in create_app().routes}
    assert "/readyz" in paths


def test_compose_services_use_real_commands_and_configs() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"api", "worker", "dask-scheduler", "dask-worker"} <= set(services)
    builders = [name for name, svc in services.items() if "build" in svc]
    assert builders == ["worker"]  # one build; the others run its image, never pulled
    assert all(svc.get("pull_policy") == "never" for name, svc in services.items()
               if name not in builders)
    for svc in services.values():  # state in named volumes; ports on loopback by default
        for volume in svc.get("volumes", []):
            source, target = volume.split(":")[:2]
            assert target != "/data" or source in compose["volumes"], volume
        assert all(p.startswith("${WSI_BIND:-127.0.0.1}:") for p in svc.get("ports", []))
    for name in ("api", "worker"):
        command = services[name]["command"]
        r = subprocess.run([*CLI, command[0], "--help"], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, (name, r.stderr)
    config = services["api"]["environment"]["WSI_CONFIG"]
    assert (ROOT / config.removeprefix("/app/")).is_file()
    for name in ("dask-scheduler", "dask-worker"):
        assert services[name]["profiles"] == ["dask"]
        assert services[name]["entrypoint"][0] == "dask"
    assert shutil.which("dask") or (Path(sys.executable).parent / "dask").exists()


@pytest.mark.parametrize("name", ["default", "cpu", "gpu", "remote-worker", "remote-slides"])
def test_example_configs_are_valid_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from api.config import load_settings

    monkeypatch.setenv("WSI_CONFIG", str(ROOT / "configs" / f"{name}.toml"))
    monkeypatch.delenv("WSI_PRECISION", raising=False)  # conftest's fp32 for the suite
    settings = load_settings()
    table = tomllib.loads((ROOT / "configs" / f"{name}.toml").read_text())["service"]
    for key, value in table.items():
        got = getattr(settings, key)
        if key == "slide_roots":
            got = [str(p) for p in got]
        elif key == "data_dir":
            got = str(got)
        elif key == "api_keys":
            got = [k.get_secret_value() for k in got]
        assert got == value, key


def test_service_defaults_equal_the_default_config() -> None:
    from api.config import Settings

    table = tomllib.loads((ROOT / "configs" / "default.toml").read_text())["service"]
    fields = Settings.model_fields
    assert set(table) <= set(fields)
    assert all(fields[k].default is None for k in set(fields) - set(table))  # optional ones
    for key, value in table.items():
        default = fields[key].get_default(call_default_factory=True)
        if key in ("slide_roots",):
            default = [str(p) for p in default]
        elif key == "data_dir":
            default = str(default)
        assert default == value, key


def test_shell_snippets_in_dockerfile_are_parseable() -> None:
    runs = instruction("RUN")
    assert runs
    for args in runs:  # shlex raises on an unbalanced quote; each step runs a real program
        tokens = shlex.split(args)
        assert tokens and shutil.which(tokens[0]) or tokens[0] in ("pip", "python"), tokens
