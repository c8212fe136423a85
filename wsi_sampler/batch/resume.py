"""Which slides of an output folder are done, for *this* run: a slide's results count
only if they were made from the same file (its fingerprint) with the same plan, model and
output options (the run's signature, kept in each slide's ``summary.json``). Results made
with other parameters are never mixed in: the run refuses them, or redoes them with
``overwrite``."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError
from ..sources.origin import FINGERPRINT_BYTES, fingerprint_of
from .discover import SlideTask

__all__ = ["ResumeState", "result_config", "run_signature", "sort_out"]

# Settings that change no result: where and how fast it runs.
_NOT_RESULTS = ("device", "batch_size", "pseudonyms", "signature")


def result_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a batch configuration that shapes its results."""
    out = {k: v for k, v in config.items() if k not in _NOT_RESULTS}
    weights = out.get("weights")
    if weights:
        out["weights"] = _file_identity(weights)
    if out.get("slide_models"):
        out["slide_models"] = [[_file_identity(card, content=True),
                                _file_identity(ckpt) if ckpt else None]
                               for card, ckpt in out["slide_models"]]
    return out


def _file_identity(path: str, *, content: bool = False) -> str:
    """The file, not the place it is kept: name and size (a card: a hash of its text)."""
    p = Path(path)
    if not p.is_file():
        return path
    if content:
        return f"{p.name}:{hashlib.sha256(p.read_bytes()).hexdigest()[:16]}"
    return f"{p.name}:{p.stat().st_size}"


def run_signature(config: dict[str, Any]) -> str:
    text = json.dumps(result_config(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _local_fingerprint(task: SlideTask) -> str | None:
    """A local file's fingerprint (as its Slide computes it); None for others."""
    path = Path(task.location)
    if "://" in task.location or not path.is_file():
        return None
    with path.open("rb") as fh:
        return fingerprint_of(path.stat().st_size, fh.read(FINGERPRINT_BYTES))


@dataclass
class ResumeState:
    done: list[SlideTask] = field(default_factory=list)
    """Scored before with this signature, from the same file."""
    other_params: list[SlideTask] = field(default_factory=list)
    """Scored before with other parameters."""
    changed: list[SlideTask] = field(default_factory=list)
    """Scored before from a file that has changed since (redone)."""


def sort_out(out: Path, tasks: list[SlideTask], signature: str) -> ResumeState:
    state = ResumeState()
    for task in tasks:
        summary_path = out / "slides" / task.key / "summary.json"
        if not summary_path.is_file():
            continue
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, ValueError):
            continue  # unreadable: redone
        if summary.get("run_signature") != signature:
            state.other_params.append(task)
            continue
        fingerprint = _local_fingerprint(task)
        if fingerprint is not None and summary.get("fingerprint") != fingerprint:
            state.changed.append(task)
        else:
            state.done.append(task)
    return state


def refuse_other_params(out: Path, state: ResumeState, config: dict[str, Any]) -> None:
    """The error for results made with other parameters, saying which differ."""
    differs = ""
    try:
        before = json.loads((out / "run_metadata.json").read_text())["config"]["batch"]
        keys = _differences(result_config(before), result_config(config))
        differs = f" ({'; '.join(keys[:4])})" if keys else ""
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise InvalidRequestError(
        f"--out {out} holds results of {len(state.other_params)} slide(s) made with other "
        f"parameters{differs}: use another folder, or --overwrite to redo them")


def _differences(before: Any, now: Any, prefix: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(now, dict):
        found = []
        for key in sorted(set(before) | set(now)):
            found += _differences(before.get(key), now.get(key), f"{prefix}{key}.")
        return found
    return [] if before == now else [f"{prefix.rstrip('.')}: {before!r} -> {now!r}"]
