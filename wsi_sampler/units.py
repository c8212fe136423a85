"""Physical units: microns per pixel (MPP) and objective magnification.

The field's convention, used throughout: 10x ≈ 1.0 µm/px, 20x ≈ 0.5, 40x ≈ 0.25,
i.e. ``mpp = 10 / magnification``.
"""

from __future__ import annotations

import math

from .errors import InvalidRequestError

__all__ = [
    "PATCH_MPP_RANGE",
    "SLIDE_MPP_RANGE",
    "TISSUE_MPP_RANGE",
    "check_mpp",
    "magnification_to_mpp",
    "mpp_to_magnification",
    "resolve_target_mpp",
]

_MPP_AT_1X = 10.0

# Physical sense, in µm/px (inclusive). No light microscope resolves below ~0.1 µm/px, so a
# slide's own MPP is at least 0.05; a tissue mask finer than 0.25 µm/px (40x) tells nothing
# more and would cost minutes; patches may be as coarse as 1 mm/px (whole-slide overviews).
SLIDE_MPP_RANGE = (0.05, 100.0)
PATCH_MPP_RANGE = (0.05, 1000.0)
TISSUE_MPP_RANGE = (0.25, 1000.0)


def check_mpp(name: str, value: float, allowed: tuple[float, float]) -> float:
    """Return ``value`` if it is a µm/px within ``allowed``, else raise InvalidRequestError."""
    lo, hi = allowed
    if not (math.isfinite(value) and lo <= value <= hi):
        raise InvalidRequestError(f"{name} must be within {lo:g}..{hi:g} µm/px, got {value:g}")
    return value


def magnification_to_mpp(magnification: float) -> float:
    """Return the µm/px conventionally meant by an objective magnification."""
    if not math.isfinite(magnification) or magnification <= 0:
        raise InvalidRequestError(f"magnification must be > 0, got {magnification}")
    return _MPP_AT_1X / magnification


def mpp_to_magnification(mpp: float) -> float:
    """Return the objective magnification conventionally meant by ``mpp`` µm/px."""
    if not math.isfinite(mpp) or mpp <= 0:
        raise InvalidRequestError(f"mpp must be > 0, got {mpp}")
    return _MPP_AT_1X / mpp


def resolve_target_mpp(*, target_mpp: float | None, magnification: float | None) -> float | None:
    """Combine the two ways of naming a resolution; at most one may be given."""
    if target_mpp is not None and magnification is not None:
        raise InvalidRequestError("give target_mpp or magnification, not both")
    if magnification is not None:
        return check_mpp(f"magnification {magnification:g}x as µm/px",
                         magnification_to_mpp(magnification), PATCH_MPP_RANGE)
    if target_mpp is not None:
        check_mpp("target_mpp", target_mpp, PATCH_MPP_RANGE)
    return target_mpp
