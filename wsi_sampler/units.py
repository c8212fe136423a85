"""Physical units: microns per pixel (MPP) and objective magnification.

The field's convention, used throughout: 10x ≈ 1.0 µm/px, 20x ≈ 0.5, 40x ≈ 0.25,
i.e. ``mpp = 10 / magnification``.
"""

from __future__ import annotations

import math

from .errors import InvalidRequestError

__all__ = ["magnification_to_mpp", "mpp_to_magnification", "resolve_target_mpp"]

_MPP_AT_1X = 10.0


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
        return magnification_to_mpp(magnification)
    if target_mpp is not None and (not math.isfinite(target_mpp) or target_mpp <= 0):
        raise InvalidRequestError(f"target_mpp must be > 0 µm/px, got {target_mpp}")
    return target_mpp
