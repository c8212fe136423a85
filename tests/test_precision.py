"""Model precision: ``auto`` decided from the device and the CPU's own flags, a lower
precision kept only when its numerics check against fp32 passes (else fp32, with a
warning), the outcome cached per machine and reported in run metadata and /readyz."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from test_models import PATCHES, save_torchscript, write_card
from torch import nn

from wsi_sampler.errors import InvalidRequestError
from wsi_sampler.models import load_model
from wsi_sampler.models import precision as precision_mod
from wsi_sampler.models.precision import choose_precision, cpu_bf16_support


class Pooled(nn.Module):
    """Channel means through one linear layer: well conditioned, bf16 keeps its outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class Cancelling(nn.Module):
    """Outputs that are small differences of large products: bf16's 8-bit mantissa loses
    them (the kind of layer that makes a lower precision unsafe for a model)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        with torch.no_grad():
            self.fc.weight.copy_(1000 + torch.arange(12.0).view(4, 3) * 1e-3)
            self.fc.bias.fill_(0.0)
        self.offset = nn.Linear(3, 4, bias=False)
        with torch.no_grad():
            self.offset.weight.fill_(1000.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = x.mean(dim=(2, 3))
        return self.fc(f) - self.offset(f)


def card_for(tmp_path: Path, module: nn.Module, name: str) -> Path:
    save_torchscript(module.eval(), tmp_path / f"{name}.pt")
    return write_card(tmp_path / f"{name}.json", name=name, file=f"{name}.pt",
                      outputs=[{"name": "logits", "class_names": ["a", "b", "c", "d"],
                                "activation": "softmax"}])


def test_auto_follows_the_device_and_the_cpus_own_flags() -> None:
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("flags")).split()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert cpu_bf16_support()[0] is native
    cpu = choose_precision("auto", torch.device("cpu"))
    assert cpu.precision == ("bf16" if native else "fp32") and cpu.reason.startswith("auto:")
    assert choose_precision("auto", torch.device("cuda")).precision == "bf16"
    assert choose_precision("fp16", torch.device("cpu")).precision == "fp16"
    with pytest.raises(InvalidRequestError, match="unknown precision 'fp8'"):
        choose_precision("fp8", torch.device("cpu"))


def test_bf16_is_kept_when_its_outputs_match_fp32(tmp_path: Path) -> None:
    torch.manual_seed(0)
    card = card_for(tmp_path, Pooled(), "pooled")
    fp32 = load_model(card, device="cpu", precision="fp32")
    bf16 = load_model(card, device="cpu", precision="bf16")
    assert fp32.precision == "fp32" and "check" not in fp32.precision_info
    assert bf16.precision == "bf16"
    info = bf16.precision_info
    assert info["chosen"] == "bf16" and info["check"]["passed"]
    assert info["check"]["min_cosine"] >= 0.999 and info["check"]["top1_agreement"] == 1.0
    a, b = fp32.predict(PATCHES)["logits"], bf16.predict(PATCHES)["logits"]
    assert not np.array_equal(a, b)  # it really ran in bf16 ...
    np.testing.assert_allclose(a, b, atol=0.02)  # ... and stayed close


def test_a_model_that_bf16_changes_runs_in_fp32_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    card = card_for(tmp_path, Cancelling(), "cancelling")
    with caplog.at_level(logging.WARNING, logger="wsi_sampler.models"):
        model = load_model(card, device="cpu", precision="bf16")
    assert model.precision == "fp32"
    info = model.precision_info
    assert info["requested"] == "bf16" and info["chosen"] == "fp32"
    # the classes change (the raw logits even keep a cosine near 1: only top-1 tells)
    assert not info["check"]["passed"] and info["check"]["top1_agreement"] < 1
    assert "bf16 failed the numerics check" in info["reason"]
    assert "running in fp32" in caplog.text
    reference = load_model(card, device="cpu", precision="fp32").predict(PATCHES)["logits"]
    np.testing.assert_array_equal(model.predict(PATCHES)["logits"], reference)


def test_the_check_runs_once_per_model_file_and_machine(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSI_CACHE_DIR", str(tmp_path / "cache"))
    card = card_for(tmp_path, Pooled(), "cached")
    load_model(card, device="cpu", precision="bf16")
    entries = json.loads((tmp_path / "cache" / "precision-checks.json").read_text())
    assert [e["passed"] for e in entries.values()] == [True]

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached check should have been used")

    monkeypatch.setattr(precision_mod, "numerics_check", must_not_run)
    monkeypatch.setattr("wsi_sampler.models.runtime.numerics_check", must_not_run)
    assert load_model(card, device="cpu", precision="bf16").precision_info["check"]["passed"]


def test_precision_is_recorded_in_run_metadata_and_readyz(
        tmp_path: Path, demo_slide: Path) -> None:
    import httpx
    from _servers import serve

    from api.app import create_app
    from api.config import Settings
    from wsi_sampler import PlanParams, open_slide
    from wsi_sampler.scoring import score_slide
    from wsi_sampler.worker import InProcessWorker

    card = card_for(tmp_path, Pooled(), "recorded")
    worker = InProcessWorker(load_model(card, device="cpu", precision="bf16"))
    with open_slide(demo_slide) as slide:
        score_slide(slide, PlanParams(strategy="random", n_patches=4, seed=1), worker,
                    tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "run_metadata.json").read_text())
    assert meta["precision"]["chosen"] == "bf16" and meta["precision"]["check"]["passed"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["precision"] == meta["precision"]
    settings = Settings(slide_roots=[demo_slide.parent], data_dir=tmp_path / "data",
                        demo_slide=False, device="cpu", model=str(card), precision="auto")
    with serve(create_app(settings), ready_path="/readyz") as url:
        ready = httpx.get(f"{url}/readyz").json()
    assert ready["precision"]["requested"] == "auto"
    assert ready["precision"]["chosen"] == choose_precision("auto", torch.device("cpu")).precision


def test_tissue_qc_says_it_computes_in_fp32_whatever_was_asked() -> None:
    info = load_model("tissue-qc", device="cpu", precision="bf16").precision_info
    assert info["requested"] == "bf16" and info["chosen"] == "fp32"
    assert info["reason"] == "tissue-qc computes in fp32 (pixel measures)"
