"""Artefact exclusion: the tissue a plan drops as pen, fold, out of focus…, per class.

Two detectors. Without an artefact model, the classical one (:mod:`wsi_sampler.tissue`):
blue / green ``pen`` ink and near-black ``dark`` pixels, removed inside tissue detection.
With GrandQC's artefact model (``artifact_weights``, :mod:`wsi_sampler.segmenters`): its
``fold``, ``dark_spot``, ``pen``, ``air_bubble`` and ``out_of_focus`` classes, found over
the detected tissue and removed from it.

Frame: every mask is in the tissue mask's pixel grid, ``mpp`` µm/px; areas are mm².
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .errors import InvalidRequestError
from .slide import Slide
from .tissue import TissueParams, classical_artifact_masks, clean_mask, detect_tissue
from .types import BoolMask, RGBImage

__all__ = ["Exclusion", "classical_exclusion", "deep_exclusion", "mm2"]


def mm2(mask: BoolMask, mpp: float) -> float:
    """A mask's area in mm², to 4 decimals."""
    return round(float(np.count_nonzero(mask)) * mpp * mpp / 1e6, 4)


@dataclass(frozen=True)
class Exclusion:
    """What exclusion found and removed, beside the tissue it left (``after``)."""

    detector: str
    """``classical``, or the artefact model's card name (``grandqc-artifacts``)."""
    before: BoolMask
    """The tissue before exclusion."""
    after: BoolMask
    found: dict[str, BoolMask]
    """Per class, where the detector found it on the tissue (a pixel may be in two)."""
    excluded: tuple[str, ...]
    """The classes removed."""

    @property
    def share(self) -> float:
        """Of the tissue before exclusion, the share removed."""
        before = np.count_nonzero(self.before)
        return round(1 - float(np.count_nonzero(self.after)) / before, 4) if before else 0.0

    def report(self, mpp: float) -> dict[str, Any]:
        """Areas before and after, and per class (removed, and found anywhere on tissue)."""
        removed = self.before & ~self.after
        return {
            "detector": self.detector, "classes": list(self.excluded),
            "tissue_mm2_before": mm2(self.before, mpp), "tissue_mm2_after": mm2(self.after, mpp),
            "excluded_share": self.share,
            "excluded_mm2": {c: mm2(removed & self.found[c], mpp) for c in self.excluded
                             if c in self.found},
            "found_mm2": {c: mm2(m, mpp) for c, m in self.found.items()},
        }


def classical_exclusion(rgb: RGBImage, mpp: float, params: TissueParams, after: BoolMask
                        ) -> Exclusion:
    """The classical pen / dark exclusion that left ``after`` on ``rgb`` (a thumbnail at
    ``mpp``): the tissue detected without it, and what each class removed."""
    pen, dark = params.classical_exclusion()
    plain = replace(params, exclude_pen=False, exclude_dark=False, exclude_artifacts=())
    before = detect_tissue(rgb, mpp, plain) | after
    removed = before & ~after
    found = {c: removed & m for c, m in classical_artifact_masks(rgb, params).items()}
    excluded = tuple(c for c, on in (("pen", pen), ("dark", dark)) if on)
    return Exclusion("classical", before, after, found, excluded)


def deep_exclusion(slide: Slide, tissue: BoolMask, mpp: float, params: TissueParams, *,
                   progress: Callable[[int, int], None] | None = None) -> Exclusion:
    """GrandQC's artefact model over ``tissue`` (the slide's mask at ``mpp``), and the tissue
    left once ``params.deep_exclusion()``'s classes are removed (small pieces dropped)."""
    from .segmenters import cached_segmenter, segment_artifacts

    segmenter = cached_segmenter(params.artifact_model, params.artifact_weights)
    classes = segment_artifacts(slide, segmenter, tissue, progress=progress)
    card = segmenter.card
    found = {name: tissue & (classes == index) for name, index in card.artifact_classes.items()}
    excluded = params.deep_exclusion()
    unknown = [name for name in excluded if name not in found]
    if unknown:
        raise InvalidRequestError(f"artefact model {card.name} has no class {unknown[0]!r} "
                                  f"({', '.join(found)})")
    removed = np.zeros_like(tissue)
    for name in excluded:
        removed |= found[name]
    after = clean_mask(tissue & ~removed, mpp, params) if removed.any() else tissue
    return Exclusion(card.name, tissue, after, found, excluded)
