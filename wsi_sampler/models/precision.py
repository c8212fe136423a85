"""The arithmetic a model runs in: ``auto``, ``fp32``, ``bf16`` or ``fp16``, checked.

``auto`` picks bf16 on a GPU (as before) and on a CPU that does bf16 in hardware
(AVX512-BF16 or AMX-BF16, read from the CPU's flags), fp32 elsewhere: emulated bf16 on an
older CPU is slower than fp32. A lower precision is used only after a numerics check the
first time a (model, precision, machine) runs: a few fixed patches go through the model in
fp32 and in the chosen precision; every output must keep a per-patch cosine >= 0.999 with
fp32, and softmax/sigmoid outputs the same top-1 class on every patch. A model that fails
runs in fp32, with a warning. The outcome is cached per machine (``~/.cache/wsi-sampler``,
``WSI_CACHE_DIR``) and reported by :attr:`Model.precision_info` (run metadata, ``/readyz``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from ..errors import InvalidRequestError

__all__ = ["MIN_COSINE", "NumericsCheck", "Precision", "PrecisionChoice", "choose_precision",
           "cpu_bf16_support", "numerics_check", "precision_context"]

log = logging.getLogger("wsi_sampler.models")
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
MIN_COSINE = 0.999
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_CHECK_PATCHES = 8


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str
    """``fp32``, ``bf16`` or ``fp16``."""
    reason: str


@dataclass(frozen=True)
class NumericsCheck:
    precision: str
    min_cosine: float
    top1_agreement: float | None
    """Share of check patches whose top-1 class agrees (None: no class outputs)."""
    passed: bool


@functools.cache
def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line of Linux ``/proc/cpuinfo`` (None elsewhere or if absent)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines
                 if line.split(":", 1)[0].strip() == field), None)


@functools.cache
def cpu_bf16_support() -> tuple[bool, str]:
    """(native bf16, what says so): the CPU's flags (Linux ``/proc/cpuinfo``)."""
    text = _cpuinfo("flags")
    if text is None:
        return False, f"CPU flags unknown on {platform.system()}"
    flags = text.split()
    native = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    if native:
        return True, f"CPU has {' and '.join(native)}"
    return False, "CPU has no AVX512-BF16/AMX-BF16 (bf16 would be emulated, slower than fp32)"


def choose_precision(requested: str, device: torch.device) -> PrecisionChoice:
    """What ``requested`` means on ``device`` (``auto`` decided here, others as asked)."""
    if requested not in PRECISIONS:
        raise InvalidRequestError(
            f"unknown precision {requested!r}: use one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return PrecisionChoice(requested, "asked for")
    if device.type == "cuda":
        return PrecisionChoice("bf16", "auto: GPU")
    native, why = cpu_bf16_support()
    return PrecisionChoice("bf16" if native else "fp32", f"auto: {why}")


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """Autocast to ``precision`` on ``device`` (fp32: nothing)."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device.type, dtype=_DTYPES[precision]):
        yield


def check_patches(size: int) -> npt.NDArray[np.uint8]:
    """Fixed patches with tissue-like structure: smooth pink/purple fields, noise, edges."""
    rng = np.random.default_rng(20261202)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((_CHECK_PATCHES, size, size, 3), np.uint8)
    for i in range(_CHECK_PATCHES):
        phase = rng.uniform(0, 6.3, 3)
        freq = rng.uniform(2, 12, 3)
        waves = [np.sin(freq[c] * (xx + yy * (c + 1)) * np.pi + phase[c]) for c in range(3)]
        base = np.stack([200 + 40 * waves[0], 120 + 60 * waves[1], 180 + 50 * waves[2]], -1)
        base += rng.normal(0, 12, base.shape)
        out[i] = np.clip(base, 0, 255).astype(np.uint8)
    return out


def numerics_check(
    predict: Callable[[npt.NDArray[np.uint8], str], dict[str, npt.NDArray[np.float32]]],
    size: int, precision: str, class_outputs: set[str],
) -> NumericsCheck:
    """Compare ``predict(patches, precision)`` with ``predict(patches, "fp32")``."""
    patches = check_patches(size)
    ref, low = predict(patches, "fp32"), predict(patches, precision)
    cosines, agreements = [], []
    for name, want in ref.items():
        got = low[name].astype(np.float64)
        w = want.astype(np.float64)
        norms = np.linalg.norm(w, axis=1) * np.linalg.norm(got, axis=1)
        same = np.all(np.isclose(w, got, atol=1e-6), axis=1)
        cos = np.where(norms > 0, (w * got).sum(1) / np.maximum(norms, 1e-30), 1.0)
        cosines.append(float(np.where(same, 1.0, cos).min()))
        if name in class_outputs and w.shape[1] > 1:
            agreements.append(float((w.argmax(1) == got.argmax(1)).mean()))
    min_cos = min(cosines) if cosines else 1.0
    top1 = min(agreements) if agreements else None
    passed = bool(np.isfinite(min_cos) and min_cos >= MIN_COSINE and (top1 is None or top1 == 1))
    return NumericsCheck(precision, round(min_cos, 6), top1, passed)


def _cache_file() -> Path:
    base = os.environ.get("WSI_CACHE_DIR") or Path.home() / ".cache" / "wsi-sampler"
    return Path(base) / "precision-checks.json"


def cache_key(model_key: str, precision: str, device: torch.device) -> str:
    """The model (name, version, weights digest), precision, device and machine."""
    cpu = _cpuinfo("model name") or platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    raw = f"{model_key}|{precision}|{device.type}|{cpu}|{gpu}|torch {torch.__version__}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def cached_check(key: str) -> NumericsCheck | None:
    try:
        entry = json.loads(_cache_file().read_text()).get(key)
        return NumericsCheck(**entry) if isinstance(entry, dict) else None
    except (OSError, ValueError, TypeError):
        return None


def remember_check(key: str, check: NumericsCheck) -> None:
    """Add ``check`` to the per-machine cache (best effort: a read-only home is fine)."""
    from .._io import atomic_write_text

    path = _cache_file()
    try:
        entries: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        entries = {}
    entries[key] = asdict(check)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(entries, indent=1) + "\n")
