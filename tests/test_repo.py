"""The promises of the repository layout: two commands, CI, configs, Dockerfile."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import tomllib

from wsi_sampler import PlanParams, TissueParams

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    assert readme.index("make run") < readme.index("## ")  # quick start comes first
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_default_config_mirrors_library_defaults() -> None:
    cfg = tomllib.loads((ROOT / "configs" / "default.toml").read_text())
    plan, tissue = PlanParams(), TissueParams()
    for key, value in cfg["plan"].items():
        assert getattr(plan, key) == value, key
    # every default but None (TOML has no null; such keys are shown commented out)
    assert set(cfg["tissue"]) == {f.name for f in fields(TissueParams)
                                  if getattr(tissue, f.name) is not None}
    for key, value in cfg["tissue"].items():
        default = getattr(tissue, key)
        assert (list(default) if isinstance(default, tuple) else default) == value, key



def test_the_readme_python_section_runs_as_written(demo_slide: Path, tmp_path: Path) -> None:
    import re
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python"):]
    (block,) = re.findall(r"```python\n(.*?)```", section[: section.index("\n## ", 5)],
                          flags=re.S)
    code = block.replace('"slide.svs"', repr(str(demo_slide)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


_CURL_STATUS = ("curl() { command curl --write-out "
                "'%{stderr}HTTP %{http_code} %{method} %{url_effective}\\n' \"$@\"; }\n")


def test_the_readme_curl_examples_work_against_make_run(tmp_path: Path) -> None:
    """The REST API block, run by bash as written, against `make run`'s command (checked
    in the Makefile) in an empty folder (its demo slide, in-process tissue-qc), with a
    local OpenAI-compatible stand-in as its vision-language model (the block's report needs
    one): every request a 2xx."""
    import re
    import shutil
    import subprocess
    import sys
    import tarfile
    import time

    import httpx
    from _openai_server import OpenAIStub, create_openai_stub
    from _servers import free_port, serve, stop_process
    from conftest import shared_slide

    makefile = (ROOT / "Makefile").read_text()
    assert "\nrun: $(STAMP) viewer-assets\n\t$(VENV)/bin/wsi-sampler serve\n" in makefile
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## REST API"):]
    block = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]
    port = free_port()
    assert "API=http://127.0.0.1:8000\n" in block
    block = block.replace("API=http://127.0.0.1:8000", f"API=http://127.0.0.1:{port}")
    shutil.copy(shared_slide("CMU-1-Small-Region.svs"), tmp_path / "scan.svs")
    stub = OpenAIStub()
    with serve(create_openai_stub(stub)) as vlm, (tmp_path / "serve.log").open("wb") as log:
        server = subprocess.Popen(
            [Path(sys.executable).with_name("wsi-sampler"), "serve", "--port", str(port)],
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "WSI_VLM_URL": f"{vlm}/v1"})
        try:
            deadline = time.monotonic() + 180
            while True:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "make run's service never became ready"
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", _CURL_STATUS + block],
                                  cwd=tmp_path, capture_output=True, text=True, timeout=300)
        finally:
            stop_process(server)
    assert done.returncode == 0, done.stderr[-2000:]
    requests = [line.split() for line in done.stderr.splitlines() if line.startswith("HTTP ")]
    commands = sum(line.split("#")[0].count("curl -") for line in block.splitlines())
    assert len(requests) >= commands >= 25
    assert all(status.startswith("2") for _, status, *_ in requests), requests
    seen = {(method, re.sub(r"/[0-9a-f]{24,32}", "/{id}", url.split(str(port))[1]), status)
            for _, status, method, url in requests}
    assert {("DELETE", "/v1/slides/{id}", "204"), ("POST", "/v1/slides/{id}/reports", "200"),
            ("GET", "/v1/jobs/{id}/results/{id}.predictions.csv", "200"),
            ("DELETE", "/v1/jobs/{id}", "200")} <= seen, seen
    assert len(stub.received) == 1 and stub.received[0].images  # the report's bag
    with tarfile.open(tmp_path / "patches.tar") as tar:
        assert sum(n.endswith(".png") for n in tar.getnames()) == 64
    for name in ("thumb.png", "qc.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    assert '"FeatureCollection"' in (tmp_path / "tissue.geojson").read_text().replace(" ", "")
