"""Service settings: ``WSI_*`` environment variables over the ``[service]`` table of a TOML
file (``configs/default.toml``, or the file named by ``WSI_CONFIG``) over built-in defaults.
Invalid values fail at startup with the offending key named."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from wsi_sampler.redact import url_credentials

__all__ = ["Settings", "SlideModelSetting", "load_settings"]

DEFAULT_CONFIG = Path("configs/default.toml")


class SlideModelSetting(BaseModel):
    """One slide model the service answers with: its card and its checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    card: Path = Field(description="Slide model card (.json, \"kind\": \"slide\")")
    weights: Path | None = Field(None, description="Its checkpoint (else the card's file)")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WSI_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    slide_roots: list[Path] = Field(default_factory=lambda: [Path("data/slides")], min_length=1)
    remote_slide_roots: list[str] = Field(
        default_factory=list,
        description="Slide roots on servers: s3://bucket/prefix/ (AWS_* environment, "
                    "AWS_ENDPOINT_URL_S3 for MinIO/Ceph) and DICOMweb servers "
                    "(dicomweb://host/dicom-web, dicomweb+http:// without TLS; "
                    "WSI_DICOMWEB_* environment for credentials)")
    dicomweb_token: SecretStr | None = Field(None, description="Bearer token for the "
                                             "DICOMweb roots (WSI_DICOMWEB_TOKEN)")
    dicomweb_username: str | None = None
    dicomweb_password: SecretStr | None = None
    dicomweb_ca_bundle: str | None = Field(None, description="CA bundle to verify the "
                                           "DICOMweb servers' TLS certificates with")
    deidentify: bool = Field(False, description="Name slides by pseudonym (pseudonym_map, "
                             "else one derived from the id) in every answer and result "
                             "file; never show their paths or DICOM descriptions; store "
                             "uploads without label, macro and identifying text")
    pseudonym_map: Path | None = Field(None, description="CSV path,pseudonym for "
                                       "de-identified mode")
    data_dir: Path = Path("data")
    demo_slide: bool = True
    model: str = "tissue-qc"
    model_weights: str = Field("", description="Weights file of the model (a built-in "
                               "encoder's pytorch_model.bin); empty = the card's own")
    slide_models: list[SlideModelSetting] = Field(
        default_factory=list, description="Slide-level models over the encoder's features "
        "(the service's model must be their patch encoder), e.g. "
        "[{\"card\": \"/models/task.json\", \"weights\": \"/models/s_0_checkpoint.pt\"}]")
    tissue_method: Literal["auto", "brightfield", "fluorescence", "hest", "hest-fast",
                           "grandqc"] = Field(
        "auto", description="Tissue detection of plans, streams, jobs, reports and QC: "
        "classical, or a deep segmenter with segmenter_weights")
    segmenter_weights: str = Field("", description="The deep segmenter's weights "
                                   "(deeplabv3_seg_v4.ckpt, Tissue_Detection_MPP10.pth)")
    artifact_weights: str = Field(
        "", description="GrandQC's artefact model weights (GrandQC_MPP1_state_dict.pth): "
        "plans, streams, jobs and QC may then exclude fold, dark_spot, pen, air_bubble and "
        "out_of_focus; empty = the classical pen / dark exclusion only")
    artifact_model: str = Field("grandqc-artifacts", description="The artefact model's card "
                                "(grandqc-artifacts, -mpp15, -mpp2 or a card .json)")
    exclude_artifacts: list[str] = Field(
        default_factory=list, description="Classes excluded when a request names none "
        "(empty: all the artefact model's classes, or the classical pen and dark)")
    max_excluded_share: float = Field(0.5, ge=0, le=1, description="Default of the "
                                      "requests' max_excluded_share")
    worker_url: str = ""
    worker_target_mpp: float | None = Field(None, gt=0, le=100)
    worker_patch_size: int | None = Field(None, ge=8, le=8192)
    worker_protocol: Literal["auto", "binary", "json"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Model arithmetic: auto = bf16 on a GPU or a CPU with native "
        "bf16, else fp32; kept only if its numerics check against fp32 passes.")
    api_keys: list[SecretStr] = Field(default_factory=list)
    cors_origins: list[str] = Field(default_factory=list)
    max_upload_mb: float = Field(4096, gt=0)
    max_body_kb: float = Field(1024, gt=0, description="Largest JSON request body, KiB")
    max_concurrent_streams: int = Field(4, ge=1)
    max_patches_per_request: int = Field(20_000, ge=1)
    max_plan_patches: int = Field(200_000, ge=1)
    tile_cache_mb: float = Field(
        64, ge=0, le=65536, description="Encoded DeepZoom tiles kept in memory (LRU), MiB")
    tile_decode_cache_mb: float = Field(
        64, ge=0, le=65536, description="Decoded stored tiles kept for neighbouring DeepZoom "
                                        "tiles (LRU), MiB")
    max_concurrent_slide_work: int = Field(
        2, ge=1, le=256, description="Tissue masks, thumbnails and plans computed at once")
    batch_size: int = Field(32, ge=1, le=4096)
    job_workers: int = Field(1, ge=1, le=64)
    max_queued_jobs: int = Field(100, ge=1, description="Jobs queued at once (all keys)")
    max_jobs_per_key: int = Field(20, ge=1, description="Jobs one API key may have queued "
                                  "or running")
    job_retention_hours: float = Field(168.0, gt=0, description="Finished jobs and their "
                                       "files are removed this long after they finished")
    min_free_disk_mb: float = Field(256.0, ge=0, description="Jobs (and each of their "
                                    "slides) start only with this much free disk for results")
    slide_index_refresh_s: float = Field(30.0, ge=0.5, le=86_400)
    vlm_url: str = ""
    vlm_model: str = "google/medgemma-1.5-4b-it"
    vlm_api_key_env: str = "WSI_VLM_API_KEY"
    vlm_timeout_s: float = Field(600.0, gt=0)
    vlm_max_images: int = Field(126, ge=1)
    vlm_context_tokens: int = Field(131_072, ge=1)
    vlm_max_tokens: int = Field(1024, ge=1)
    malloc_arena_max: int = Field(4, ge=0, le=64, description="0 = glibc's default")

    @field_validator("remote_slide_roots")
    @classmethod
    def _remote_roots(cls, roots: list[str]) -> list[str]:
        from wsi_sampler.sources.location import parse_location

        for root in roots:
            where = parse_location(root)  # an unknown scheme or credentials: refused here
            if not (where.kind == "s3" or (where.kind == "dicomweb" and not where.study)):
                raise ValueError(
                    f"{root}: a remote slide root is s3://bucket/prefix/ or a DICOMweb "
                    "server URL (dicomweb://host/prefix, dicomweb+http://host/prefix)")
        return roots

    @field_validator("worker_url", "vlm_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        carried = url_credentials(v)
        if carried:
            raise ValueError(f"must not carry credentials ({carried}); the VLM's API key "
                             "goes in the environment variable named by vlm_api_key_env")
        return v

    def secrets(self) -> list[str]:
        """Every secret value of the configuration (masked wherever we answer or log)."""
        values = [k.get_secret_value() for k in self.api_keys]
        values += [s.get_secret_value() for s in (self.dicomweb_token,
                                                  self.dicomweb_password) if s is not None]
        values += [os.environ.get(name, "") for name in (
            self.vlm_api_key_env, "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")]
        return [v for v in values if v]

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = InitSettingsSource(settings_cls, init_kwargs=_toml_service_table())
        return (init_settings, env_settings, toml)


def _toml_service_table() -> dict[str, Any]:
    path = Path(os.environ.get("WSI_CONFIG", DEFAULT_CONFIG))
    if not path.is_file():
        if "WSI_CONFIG" in os.environ:
            raise ValueError(f"WSI_CONFIG={path} does not exist")
        return {}
    with path.open("rb") as fh:
        table = tomllib.load(fh).get("service", {})
    if not isinstance(table, dict):
        raise ValueError(f"{path}: [service] must be a table")
    return table


_SETTING_FIELD = re.compile(r'error parsing value for field "(\w+)"')


def load_settings(**overrides: Any) -> Settings:
    """Settings from defaults, the TOML file, the environment, then ``overrides``. A list or
    table given in the environment that is not JSON is a ValueError naming the variable,
    the shape expected and an example."""
    try:
        return Settings(**overrides)
    except SettingsError as exc:
        found = _SETTING_FIELD.search(str(exc))
        if found is None:
            raise ValueError(str(exc)) from None
        name = found.group(1)
        example = _EXAMPLES.get(name, '["…"]')
        raise ValueError(f"WSI_{name.upper()} must be JSON ({_shape(name)}), e.g. "
                         f"WSI_{name.upper()}='{example}'") from None


_EXAMPLES = {"slide_roots": '["/data/slides"]', "remote_slide_roots": '["s3://bucket/prefix/"]',
             "api_keys": '["a-long-random-key"]', "cors_origins": '["https://lis.example.org"]',
             "slide_models": '[{"card": "/models/task.json", "weights": "/models/ckpt.pt"}]'}


def _shape(name: str) -> str:
    annotation = str(Settings.model_fields[name].annotation)
    return "a list" if annotation.startswith("list") else "an object"
