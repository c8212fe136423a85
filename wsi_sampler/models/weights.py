"""Read weights files and load them strictly, with errors that name the first mismatch.

Formats: ``.safetensors``, and PyTorch ``.bin`` / ``.pth`` / ``.pt`` / ``.ckpt`` read with
``torch.load(weights_only=True)`` (no pickled code runs). A checkpoint wrapping its weights
in ``{"state_dict": …}`` or ``{"model": …}`` is unwrapped; an optional key prefix is stripped.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import ModelLoadError

__all__ = ["load_strict", "read_state_dict"]

StateDict = dict[str, torch.Tensor]


def _torch_load(path: Path) -> object:
    # mmap keeps a multi-GB checkpoint out of RAM until copied into the model; files in the
    # legacy (pre-zip) format cannot be mapped and are read whole.
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(str(path), map_location="cpu", weights_only=True)


def _read_raw(path: Path) -> object:
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if suffix in (".bin", ".pth", ".pt", ".ckpt"):
            return _torch_load(path)
    except Exception as exc:  # any parser error on the file's bytes is a bad weights file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Weights only load failed" in first:  # pickled objects besides tensors
            first = ("it holds pickled Python objects besides tensors, which are not run; "
                     "from a file you trust, save the weights alone: m = torch.load(FILE, "
                     "weights_only=False); torch.save(m.state_dict() if hasattr(m, "
                     "'state_dict') else m['state_dict'], 'weights.pt')")
        raise ModelLoadError(f"{path}: not a readable {suffix} weights file ({first[:200]})"
                             ) from exc
    raise ModelLoadError(f"{path}: unknown weights format {suffix!r} "
                         "(.safetensors, .bin, .pth, .pt, .ckpt)")


def read_state_dict(path: Path, *, prefix: str | None = None) -> StateDict:
    """The tensors of a weights file, unwrapped, with ``prefix`` stripped from the keys."""
    raw = _read_raw(path)
    if isinstance(raw, Mapping) and not any(isinstance(v, torch.Tensor) for v in raw.values()):
        for wrapper in ("state_dict", "model"):
            if isinstance(raw.get(wrapper), Mapping):
                raw = raw[wrapper]
                break
    if not isinstance(raw, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in raw.items()):
        raise ModelLoadError(f"{path}: not a state dict (name -> tensor)")
    if prefix:
        raw = {k.removeprefix(prefix): v for k, v in raw.items()}
    return dict(raw)


def _first_mismatch(module: torch.nn.Module, state: StateDict) -> str | None:
    expected = module.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            return f"key {key!r} is missing from the file"
        if tuple(state[key].shape) != tuple(tensor.shape):
            return (f"key {key!r} has shape {tuple(state[key].shape)} in the file, "
                    f"{tuple(tensor.shape)} in the model")
    for key in state:
        if key not in expected:
            return f"key {key!r} in the file is not in the model"
    return None


def _prefix_hint(expected: StateDict, state: StateDict) -> str:
    """Name the key prefix that would make the file fit, if there is one."""
    first = next(iter(state), "")
    if "." not in first:
        return "wrong model, or set weights_key_prefix"
    prefix = first.split(".", 1)[0] + "."
    if all(k.startswith(prefix) for k in state) and all(
            k.removeprefix(prefix) in expected for k in state):
        return f"the file's keys start with {prefix!r}: set weights_key_prefix to {prefix!r}"
    return "wrong model, or set weights_key_prefix"


def load_strict(module: torch.nn.Module, state: StateDict, *, source: str, what: str) -> None:
    """Load ``state`` into ``module``: every key present, none extra, every shape equal.

    A mismatch is a ModelLoadError naming the first mismatching key and the counts."""
    target = module
    problem = _first_mismatch(target, state)
    if problem is not None:
        expected = target.state_dict()
        missing = sum(k not in state for k in expected)
        extra = sum(k not in expected for k in state)
        shaped = sum(k in state and tuple(state[k].shape) != tuple(v.shape)
                     for k, v in expected.items())
        raise ModelLoadError(
            f"{source}: weights do not fit {what}: {problem} ({missing} missing, {extra} "
            f"unexpected, {shaped} of another shape; {_prefix_hint(expected, state)})")
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # dtype that cannot be copied, …
        raise ModelLoadError(f"{source}: weights do not fit {what}: "
                             f"{str(exc).splitlines()[0]}") from exc
