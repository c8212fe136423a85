"""Property-based run over the OpenAPI schema (schemathesis): no request a client can send
produces a 5xx. Bounded: a fixed number of examples per operation, ~250 cases in all."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from _servers import serve
from hypothesis import HealthCheck, settings

from api.app import create_app
from api.config import Settings

EXAMPLES_PER_OPERATION = 18  # 14 operations -> at most ~250 cases


def _settings(root: Path, data: Path) -> Settings:
    return Settings(slide_roots=[root], data_dir=data, demo_slide=False, device="cpu",
                    max_patches_per_request=300, max_upload_mb=2)


SCHEMA = schemathesis.openapi.from_dict(
    create_app(_settings(Path("unused-root"), Path("unused-data"))).openapi()
)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, demo_slide: Path) -> Iterator[str]:
    base = tmp_path_factory.mktemp("schema")
    (base / "slides").mkdir()
    shutil.copy(demo_slide, base / "slides" / "demo.svs")
    app = create_app(_settings(base / "slides", base / "data"))
    with serve(app, ready_path="/readyz") as url:
        yield url


@SCHEMA.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_request_causes_a_server_error(case: schemathesis.Case, live: str) -> None:
    response = case.call(base_url=live, timeout=120)
    assert response.status_code < 500, (case.method, case.formatted_path,
                                        response.text[:500])
