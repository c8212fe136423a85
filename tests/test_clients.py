"""A client generated from our OpenAPI schema by openapi-python-client (in its own virtual
environment, see ``_tools``) drives a real server: list, info, plan, thumbnail and a job."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from _servers import serve
from _tools import tool_bin

from api.app import create_app
from api.config import Settings

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = '''
import io, json, sys, time
from wsi_sampler_client import Client
from wsi_sampler_client.api.slides import (list_slides_v1_slides_get as list_slides,
    slide_info_v1_slides_slide_id_get as slide_info,
    thumbnail_v1_slides_slide_id_thumbnail_get as thumbnail)
from wsi_sampler_client.api.sampling import plan_v1_slides_slide_id_plan_post as plan
from wsi_sampler_client.api.jobs import (create_job_v1_jobs_post as create_job,
    job_status_v1_jobs_job_id_get as job_status,
    job_result_v1_jobs_job_id_results_name_get as job_result)
from wsi_sampler_client.models import JobRequest, SamplingRequest, SlideList

client = Client(base_url=sys.argv[1], raise_on_unexpected_status=True, timeout=120)
listed = list_slides.sync(client=client)
assert isinstance(listed, SlideList), listed
sid = listed.items[0].id
info = slide_info.sync(sid, client=client)
sampling = SamplingRequest.from_dict({"strategy": "random", "n_patches": 5, "seed": 2})
planned = plan.sync(sid, client=client, body=sampling)
png = thumbnail.sync(sid, client=client, max_size=256).payload.read()
job = create_job.sync(client=client, body=JobRequest.from_dict(
    {"slides": [sid], "sampling": sampling.to_dict()}))
deadline = time.monotonic() + 120
while (status := job_status.sync(job.id, client=client)).state.value in ("queued", "running"):
    assert time.monotonic() < deadline
    time.sleep(0.2)
csv_name = next(r.name for r in status.results if r.name.endswith("predictions.csv"))
csv_text = job_result.sync(job.id, csv_name, client=client).payload.read().decode()
print(json.dumps({"n_slides": len(listed.items), "width": info.width,
                  "n_planned": len(planned.patches), "png": png[:8].hex(),
                  "job_state": status.state.value, "csv_rows": len(csv_text.splitlines())}))
'''


def test_generated_openapi_client_drives_a_real_server(demo_slide: Path, tmp_path: Path) -> None:
    generator = tool_bin("openapi", "openapi-python-client")
    root = tmp_path / "slides"
    root.mkdir()
    shutil.copy(demo_slide, root / "demo.svs")
    settings = Settings(slide_roots=[root], data_dir=tmp_path / "data", demo_slide=False,
                        device="cpu")
    with serve(create_app(settings), ready_path="/readyz") as url:
        gen = subprocess.run(
            [str(generator), "generate", "--url", f"{url}/openapi.json", "--meta", "none",
             "--output-path", str(tmp_path / "wsi_sampler_client"),
             "--config", str(ROOT / "clients" / "openapi-python-client.yaml")],
            capture_output=True, text=True, timeout=300)
        assert gen.returncode == 0, gen.stdout + gen.stderr
        assert "warning" not in (gen.stdout + gen.stderr).lower(), gen.stdout + gen.stderr
        run = subprocess.run([str(generator.parent / "python"), "-c", SCRIPT, url],
                             capture_output=True, text=True, timeout=300,
                             env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["n_slides"] == 1 and out["width"] > 0 and out["n_planned"] == 5
    assert out["png"] == b"\x89PNG\r\n\x1a\n".hex()
    assert out["job_state"] == "succeeded" and out["csv_rows"] == 6


def test_the_client_config_names_every_binary_media_type_of_the_schema(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    overrides = yaml.safe_load((ROOT / "clients" / "openapi-python-client.yaml").read_text())[
        "content_type_overrides"]
    schema = create_app(Settings(demo_slide=False, data_dir=tmp_path)).openapi()
    binary = {media for path in schema["paths"].values() for op in path.values()
              for resp in op.get("responses", {}).values()
              for media, body in resp.get("content", {}).items()
              if body.get("schema", {}).get("format") == "binary"}
    generic = {"application/octet-stream", "application/json", "text/csv"}
    assert binary - generic <= set(overrides), binary - generic - set(overrides)
