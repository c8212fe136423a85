"""Load the checkpoint a slide model's training code writes, strictly.

The layouts met in the wild, each recognised by itself:

- CLAM ``s_{fold}_checkpoint.pt``: a bare state dict; training with the smooth-top-1 SVM
  loss leaves ``instance_loss_fn.*`` buffers, and a model trained on several GPUs has
  ``.module`` in its keys (``attention_net.module.0.weight``: CLAM's eval drops the first
  and removes the second, and so does this loader);
- MIL-Lab / TRIDENT state dicts and ``.safetensors`` (Hugging Face models: ``model.`` on
  every key); ``torch.compile`` adds ``_orig_mod.``, DataParallel ``module.``;
- Lightning ``.ckpt``: ``{"state_dict": …}`` with the LightningModule's attribute as prefix
  (``model.``, ``net.``…).

Every key of the model must be in the file and every key of the file in the model, shapes
equal; otherwise a ModelLoadError names the first mismatching key.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..models.weights import StateDict, load_strict, read_state_dict

__all__ = ["load_slide_weights"]

_TRAINING_ONLY = ("instance_loss_fn.",)
_WRAPPER_PREFIXES = ("model.", "module.", "net.", "_orig_mod.", "mil.", "classifier_model.")


def _without_training_buffers(state: StateDict) -> StateDict:
    return {k: v for k, v in state.items()
            if not any(k.startswith(p) or f".{p}" in k for p in _TRAINING_ONLY)}


def _strip_data_parallel(state: StateDict, expected: set[str]) -> StateDict:
    """Remove ``.module`` segments (DataParallel wrappers) from keys the model lacks."""
    out: StateDict = {}
    for key, value in state.items():
        fixed = key
        while fixed not in expected and ".module." in fixed:
            fixed = fixed.replace(".module.", ".", 1)
        out[fixed if fixed in expected else key] = value
    return out


def _candidates(state: StateDict, expected: set[str], prefix: str | None
                ) -> list[StateDict]:
    """The file's keys as they are, then with each wrapper prefix removed (repeatedly:
    ``model.module.``), each with DataParallel segments removed."""
    base = _without_training_buffers(state)
    if prefix:
        base = {k.removeprefix(prefix): v for k, v in base.items()}
    found = [base]
    frontier = [base]
    while frontier:
        current = frontier.pop()
        for p in _WRAPPER_PREFIXES:
            if current and all(k.startswith(p) for k in current):
                stripped = {k.removeprefix(p): v for k, v in current.items()}
                found.append(stripped)
                frontier.append(stripped)
    return [_strip_data_parallel(c, expected) for c in found]


def load_slide_weights(module: nn.Module, path: Path, *, prefix: str | None, what: str
                       ) -> None:
    """Load ``path`` into ``module`` (see the module docstring for the layouts)."""
    state = read_state_dict(path)
    expected = set(module.state_dict())
    candidates = _candidates(state, expected, prefix)
    for candidate in candidates:
        if set(candidate) == expected and all(
                tuple(candidate[k].shape) == tuple(v.shape)
                for k, v in module.state_dict().items()):
            load_strict(module, _as_float(candidate), source=str(path), what=what)
            return
    # none fits: the error of the least-unwrapped candidate whose keys overlap the most
    best = max(candidates, key=lambda c: len(set(c) & expected))
    load_strict(module, best, source=str(path), what=what)


def _as_float(state: StateDict) -> StateDict:
    """Half-precision checkpoints load into the float32 model."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
