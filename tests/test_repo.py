"""The promises of the repository layout: two commands, CI, configs, Dockerfile."""

from __future__ import annotations

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
