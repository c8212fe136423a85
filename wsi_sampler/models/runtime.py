"""Run a torch module on uint8 patch batches, as its card says.

Input: (N, H, W, 3) uint8 RGB, H = W = the card's ``patch_size_px``. Output: one float32
(N, k) array per card output. The device is chosen once (cuda, then cpu); on a GPU batches
go through pinned memory, are copied on a side CUDA stream (the copy of one batch overlaps
the model on the previous one) with channels-last inputs. The precision (``auto``: bf16 on
a GPU or a CPU with native bf16, else fp32) is kept only after a numerics check against
fp32 (:mod:`.precision`). A batch that does not fit in GPU memory is split: the largest
size that fits is kept.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from ..errors import InvalidRequestError, ModelLoadError
from ..stain import StainNormalizer, load_stain_reference
from ..stain_torch import TorchStainNormalizer
from .card import ModelCard
from .precision import (
    cache_key,
    cached_check,
    choose_precision,
    numerics_check,
    precision_context,
    remember_check,
)

__all__ = ["DeviceChoice", "Model", "Predictions", "select_device"]

log = logging.getLogger("wsi_sampler.models")
DeviceChoice = Literal["auto", "cpu", "cuda"]
Predictions = dict[str, npt.NDArray[np.float32]]


def select_device(choice: str = "auto") -> torch.device:
    """``auto`` = cuda when available, else cpu; asking for a missing cuda is an error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was requested but torch sees no CUDA device")
    try:
        return torch.device(choice)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {choice!r} (auto, cpu, cuda)") from exc


class Model:
    """A loaded model: ``predict(uint8 NHWC) -> {output name: (N, k) float32}``.

    ``normalize=False`` for modules that take raw 0..255 values themselves (tissue-qc).
    Thread-safe: one prediction runs at a time (batching happens before, not here).
    """

    def __init__(
        self, module: torch.nn.Module, card: ModelCard, *, device: str = "auto",
        normalize: bool = True, compile_model: bool = False, precision: str = "auto",
        model_key: str | None = None,
    ) -> None:
        self.card = card
        self.device = select_device(device)
        choice = choose_precision(precision, self.device)
        self.precision = choice.precision
        """The arithmetic batches run in (fp32, bf16, fp16), after the numerics check."""
        self.precision_info: dict[str, Any] = {
            "requested": precision, "chosen": choice.precision, "reason": choice.reason}
        with contextlib.suppress(NotImplementedError):  # torch.export modules are eval-only
            module = module.eval()
        self.module = module.to(self.device)
        if self.device.type == "cuda":
            self.module = self.module.to(memory_format=torch.channels_last)
        if compile_model:  # worth it for long GPU runs; the first batches pay the compile time
            self.module = torch.compile(self.module)  # type: ignore[assignment]
        norm = card.normalization
        self._normalize = normalize
        self._mean = torch.tensor(norm.mean, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(norm.std, device=self.device).view(1, 3, 1, 1) * 255
        self._lock = threading.Lock()
        self._copy_stream: torch.cuda.Stream | None = (
            torch.cuda.Stream(self.device) if self.device.type == "cuda" else None  # type: ignore[no-untyped-call]
        )
        self.batch_limit = card.max_batch
        """The largest batch run at once: the card's max_batch, halved on out-of-memory."""
        self.stain = _stain_normalizer(card, self.device)
        """The card's stain normalisation, applied to patches before the model, or None
        (batched on the GPU where the model runs on one)."""
        self.check()
        self._settle_precision(model_key)

    def _settle_precision(self, model_key: str | None) -> None:
        """Keep a lower precision only if its numerics check passes (cached per machine for
        a model file, ``model_key``; checked every time without one)."""
        if self.precision == "fp32":
            return
        key = cache_key(model_key, self.precision, self.device) if model_key else None
        check = cached_check(key) if key else None
        if check is None:
            classes = {o.name for o in self.card.outputs if o.activation in ("softmax",
                                                                             "sigmoid")}
            check = numerics_check(self._predict_in, self.card.patch_size_px, self.precision,
                                   classes)
            if key:
                remember_check(key, check)
        self.precision_info["check"] = {"min_cosine": check.min_cosine,
                                        "top1_agreement": check.top1_agreement,
                                        "passed": check.passed}
        if not check.passed:
            log.warning("model %s: %s changes its outputs (min cosine %.5f vs fp32, top-1 "
                        "agreement %s): running in fp32", self.name, self.precision,
                        check.min_cosine, check.top1_agreement)
            self.precision = "fp32"
            self.precision_info["chosen"] = "fp32"
            self.precision_info["reason"] += f"; {check.precision} failed the numerics check"

    def _predict_in(self, patches: npt.NDArray[np.uint8], precision: str) -> Predictions:
        with self._lock:
            saved, self.precision = self.precision, precision
        try:
            return self._predict_chunk(patches)
        finally:
            with self._lock:
                self.precision = saved

    @property
    def name(self) -> str:
        return self.card.name

    def _to_tensor(self, patches: npt.NDArray[np.uint8]) -> torch.Tensor:
        x = torch.from_numpy(np.require(patches, requirements=["C", "W"]))  # copies read-only
        if self._copy_stream is not None:
            pinned = x.pin_memory()
            with torch.cuda.stream(self._copy_stream):
                x = pinned.to(self.device, non_blocking=True)
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
            x.record_stream(torch.cuda.current_stream(self.device))
        x = x.permute(0, 3, 1, 2).float()  # NCHW view of NHWC memory: channels_last
        if self.card.channel_order == "BGR":
            x = x.flip(1)
        size = self.card.input_size_px
        if size is not None and size != x.shape[-1]:  # the publisher's Resize (bicubic)
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic",
                                                align_corners=False, antialias=True)
            x = x.clamp(0, 255)
        if self._normalize:
            x = (x - self._mean) / self._std
        return x.contiguous(memory_format=torch.channels_last)

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.inference_mode(), precision_context(self.precision, self.device):
            raw: Any = self.module(x)
        if isinstance(raw, torch.Tensor):
            outs = [raw]
        elif isinstance(raw, dict):
            outs = [raw[o.name] for o in self.card.outputs if o.name in raw]
        elif isinstance(raw, (tuple, list)):
            outs = list(raw)
        else:
            raise ModelLoadError(f"model {self.name} returned {type(raw).__name__}, not tensors")
        return outs

    def _activate(self, t: torch.Tensor, activation: str) -> torch.Tensor:
        t = t.float()
        if activation == "softmax":
            return torch.softmax(t, dim=1)
        if activation == "sigmoid":
            return torch.sigmoid(t)
        return t

    def predict(self, patches: npt.NDArray[np.uint8]) -> Predictions:
        """Run the model on (N, H, W, 3) uint8 patches, in chunks of at most ``batch_limit``."""
        self.check_input(patches)
        if self.stain is not None:
            patches = self.stain(patches)
        chunks: list[Predictions] = []
        start = 0
        while start < len(patches):
            chunk = patches[start : start + self.batch_limit]
            try:
                chunks.append(self._predict_chunk(chunk))
            except torch.OutOfMemoryError:
                if len(chunk) == 1:
                    raise ModelLoadError(f"model {self.name} does not fit in {self.device} "
                                         "memory even for one patch") from None
                self._shrink_batch(len(chunk))
                continue
            start += len(chunk)
        if not chunks:
            return {o.name: np.zeros((0, o.width), np.float32) for o in self.card.outputs}
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

    def _shrink_batch(self, failed: int) -> None:
        self.batch_limit = max(1, min(self.batch_limit, failed // 2))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning("model %s: out of %s memory at batch %d; batches of %d from now on",
                    self.name, self.device, failed, self.batch_limit)

    def _predict_chunk(self, patches: npt.NDArray[np.uint8]) -> Predictions:
        with self._lock:
            outs = self._forward(self._to_tensor(patches))
            specs = self.card.outputs
            if len(outs) != len(specs):
                raise ModelLoadError(
                    f"model {self.name} returned {len(outs)} outputs, its card lists {len(specs)}"
                )
            result: Predictions = {}
            for spec, t in zip(specs, outs, strict=True):
                if t.ndim != 2 or t.shape[1] != spec.width or t.shape[0] != len(patches):
                    raise ModelLoadError(
                        f"model {self.name} output {spec.name!r} has shape {tuple(t.shape)}, "
                        f"its card says ({len(patches)}, {spec.width})"
                    )
                act = self._activate(t, spec.activation)
                result[spec.name] = act.cpu().numpy().astype(np.float32, copy=False)
            return result

    def check_input(self, patches: npt.NDArray[Any]) -> None:
        """Raise InvalidRequestError unless ``patches`` is (N, size, size, 3) uint8.

        Messages name both the numpy and the Open Inference Protocol terms: the worker server
        returns them as they are."""
        size = self.card.patch_size_px
        if patches.dtype != np.uint8:
            raise InvalidRequestError(
                f"patches must be uint8 (datatype UINT8), got {patches.dtype}"
            )
        if patches.ndim != 4 or patches.shape[1:] != (size, size, 3):
            raise InvalidRequestError(
                f"model {self.name} takes patches of shape (N, {size}, {size}, 3) "
                f"([-1, {size}, {size}, 3]), got {list(patches.shape)}"
            )

    def check(self) -> None:
        """Run one blank patch; the outputs must match the card, else ModelLoadError."""
        size = self.card.patch_size_px
        try:
            self._predict_chunk(np.full((1, size, size, 3), 240, np.uint8))
        except ModelLoadError:
            raise
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as exc:
            raise ModelLoadError(
                f"model {self.name} failed on a {size}x{size} patch, as its card describes "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from exc


def _stain_normalizer(card: ModelCard, device: torch.device
                      ) -> StainNormalizer | TorchStainNormalizer | None:
    spec = card.stain_normalization
    if spec is None:
        return None
    try:
        reference = load_stain_reference(spec.reference) if spec.reference else None
    except InvalidRequestError as exc:
        raise ModelLoadError(f"model {card.name}: {exc}") from exc
    try:
        normalizer = StainNormalizer(spec.method, reference)
    except InvalidRequestError as exc:
        raise ModelLoadError(f"model {card.name}: {exc}") from exc
    if device.type == "cuda":
        return TorchStainNormalizer(normalizer, device)
    return normalizer
