"""Property-based run over the OpenAPI schema (schemathesis, every check): no request a
client can send produces a 5xx, and every answer keeps the schema (documented statuses,
content types, headers and bodies; invalid data rejected; valid data never rejected by
validation). Bounded: a fixed number of examples per operation."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from _openai_server import OpenAIStub, create_openai_stub
from _servers import serve
from hypothesis import HealthCheck, settings

from api.app import create_app
from api.config import Settings

EXAMPLES_PER_OPERATION = 40  # 14 operations -> at most ~560 cases
MAX_RESPONSE_S = 5.0


def _settings(root: Path, data: Path, vlm_url: str = "") -> Settings:
    return Settings(slide_roots=[root], data_dir=data, demo_slide=False, device="cpu",
                    max_patches_per_request=300, max_upload_mb=2, vlm_url=vlm_url,
                    vlm_model="echo", vlm_timeout_s=30)


SCHEMA = schemathesis.openapi.from_dict(
    create_app(_settings(Path("unused-root"), Path("unused-data"))).openapi()
)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, demo_slide: Path) -> Iterator[str]:
    base = tmp_path_factory.mktemp("schema")
    (base / "slides").mkdir()
    shutil.copy(demo_slide, base / "slides" / "demo.svs")
    # reports go to the local OpenAI-compatible server (tests/_openai_server.py)
    with serve(create_openai_stub(OpenAIStub())) as vlm:
        app = create_app(_settings(base / "slides", base / "data", f"{vlm}/v1"))
        with serve(app, ready_path="/readyz") as url:
            yield url


def valid_data_passes_validation(ctx: object, response: schemathesis.Response,
                                 case: schemathesis.Case) -> None:
    """schemathesis' positive_data_acceptance, made precise for this API: schema-valid data
    must never be rejected by request validation (400, or a 422 from the validation
    handler, whose message starts "invalid request:"). A 422 about the slide itself (corrupt,
    no MPP, a plan that cannot be made) is a documented answer to valid data."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return
    rejected = response.status_code == 400 or (
        response.status_code == 422
        and str(response.json().get("error", "")).startswith("invalid request:"))
    assert not rejected, f"schema-valid data rejected: {response.status_code} {response.text}"


def responds_within_seconds(ctx: object, response: schemathesis.Response,
                            case: schemathesis.Case) -> None:
    """Whatever the input, an answer (or a stream's first bytes) within a few seconds."""
    assert response.elapsed < MAX_RESPONSE_S, f"{response.elapsed:.1f} s"


@SCHEMA.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_every_response_keeps_the_schema(case: schemathesis.Case, live: str) -> None:
    case.call_and_validate(
        base_url=live, timeout=120,
        additional_checks=[valid_data_passes_validation, responds_within_seconds],
        excluded_checks=[schemathesis.checks.positive_data_acceptance])
