"""A slide's quality-control summary: what HistoQC users look at, in one JSON and one image.

Areas come from the low-resolution masks (``tissue_mpp`` µm/px): the tissue, the tissue the
pen-ink and near-black (dark artefact) exclusion removed, and the ink and dark areas
anywhere on the slide. Patch measures come from the built-in ``tissue-qc`` model on a seeded
random sample of tissue patches (224 px at 0.5 µm/px): blur (variance of the Laplacian),
pen, dark, haematoxylin and eosin optical density, and the share of each QC label. The
stain vectors are Macenko's (:mod:`wsi_sampler.stain`) over the same sample. Units: mm²,
µm/px; the slide is named by its fingerprint only (file names can carry patient data).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import cv2
import numpy as np

from .plan import PlanParams, TissueMask, make_plan
from .slide import Slide
from .stain import macenko_stains
from .tissue import TissueParams, dark_artefact_mask, detect_tissue, pen_ink_mask
from .types import BoolMask, RGBImage

__all__ = ["EXCLUSION_WARN_SHARE", "QcMasks", "SlideQC", "draw_qc_overlay", "qc_masks",
           "qc_row", "slide_qc"]

EXCLUSION_WARN_SHARE = 0.5
"""The share of the tissue whose removal by pen/dark exclusion is worth a loud warning."""
SAMPLE_PATCHES = 64


@dataclass(frozen=True)
class QcMasks:
    """The masks behind a summary, at ``mpp`` µm/px (for the overlay)."""

    tissue: BoolMask
    before_exclusion: BoolMask
    pen: BoolMask
    dark: BoolMask
    mpp: float


@dataclass(frozen=True)
class SlideQC:
    fingerprint: str
    mask_mpp: float
    slide_area_mm2: float
    tissue_area_mm2: float
    tissue_area_before_exclusion_mm2: float
    excluded_mm2: dict[str, float]
    """Tissue removed by each exclusion (``pen``, ``dark``); a pixel both counts in both."""
    excluded_share: float
    """Of the tissue before exclusion, the share removed."""
    pen_area_mm2: float
    dark_area_mm2: float
    sampled_patches: int
    patch_measures: dict[str, float] = field(default_factory=dict)
    """Medians over the sampled patches of the tissue-qc measurements."""
    qc_labels: dict[str, float] = field(default_factory=dict)
    """Share of the sampled patches per tissue-qc label."""
    stain_vectors: dict[str, list[float]] | None = None
    """Macenko's haematoxylin and eosin optical-density vectors (RGB), None without stain."""
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mm2(mask: BoolMask, mpp: float) -> float:
    return round(float(mask.sum()) * mpp * mpp / 1e6, 4)


def qc_masks(thumb: RGBImage, mpp: float, params: TissueParams) -> QcMasks:
    """The tissue with and without the pen/dark exclusion, and where ink and dark are."""
    tissue = detect_tissue(thumb, mpp, params)
    before = detect_tissue(thumb, mpp, replace(params, exclude_pen=False, exclude_dark=False))
    return QcMasks(tissue=tissue, before_exclusion=before | tissue, pen=pen_ink_mask(thumb),
                   dark=dark_artefact_mask(thumb, dark_value=params.dark_value), mpp=mpp)


def _sample(slide: Slide, masks: QcMasks, seed: int) -> np.ndarray:
    """Up to SAMPLE_PATCHES random tissue patches, 224 px at 0.5 µm/px (or the slide's)."""
    from .extract import Extractor

    w, h = slide.dimensions
    tm = TissueMask(masks.tissue, masks.mpp, (w / masks.tissue.shape[1],
                                              h / masks.tissue.shape[0]))
    mx = slide.require_mpp()[0]
    params = PlanParams(strategy="random", n_patches=SAMPLE_PATCHES, seed=seed,
                        patch_size_px=224, target_mpp=max(0.5, mx))
    plan = make_plan(slide, params, tissue=tm)
    if not len(plan):
        return np.zeros((0, 224, 224, 3), np.uint8)
    return np.concatenate([b.images for b in Extractor(slide, plan).iter_batches()])


def _patch_summary(patches: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
    from .models import load_model
    from .models.tissue_qc_card import MEASUREMENTS, QC_CLASSES

    if not len(patches):
        return {}, {}
    out = load_model("tissue-qc", device="cpu").predict(patches)
    measures = {n: round(float(np.median(out["measurements"][:, i])), 4)
                for i, n in enumerate(MEASUREMENTS)}
    labels = out["qc"].argmax(axis=1)
    shares = {n.removeprefix("qc_"): round(float((labels == i).mean()), 4)
              for i, n in enumerate(QC_CLASSES)}
    return measures, shares


def _stains(patches: np.ndarray) -> dict[str, list[float]] | None:
    if not len(patches):
        return None
    found = macenko_stains(patches.reshape(-1, patches.shape[2], 3))
    if found is None:
        return None
    matrix = found[0][0]
    return {"haematoxylin": [round(float(v), 4) for v in matrix[:, 0]],
            "eosin": [round(float(v), 4) for v in matrix[:, 1]]}


def slide_qc(slide: Slide, *, tissue_mpp: float = 8.0, params: TissueParams | None = None,
             seed: int = 0) -> tuple[SlideQC, QcMasks]:
    """The slide's QC summary and the masks it was measured on (classical tissue methods)."""
    p = params or TissueParams()
    mx, my = slide.require_mpp()
    mpp = max(tissue_mpp, mx, my)
    masks = qc_masks(slide.thumbnail(mpp=mpp), mpp, p)
    removed = masks.before_exclusion & ~masks.tissue
    before_mm2 = _mm2(masks.before_exclusion, mpp)
    share = round(_mm2(removed, mpp) / before_mm2, 4) if before_mm2 else 0.0
    patches = _sample(slide, masks, seed)
    measures, labels = _patch_summary(patches)
    warnings = []
    if share > EXCLUSION_WARN_SHARE:
        warnings.append(f"pen/dark exclusion removed {share:.0%} of the tissue: check the "
                        "overlay (dark-stained tissue can read as a dark artefact)")
    if not masks.tissue.any():
        warnings.append("no tissue found")
    qc = SlideQC(
        fingerprint=slide.fingerprint, mask_mpp=mpp,
        slide_area_mm2=round(masks.tissue.size * mpp * mpp / 1e6, 4),
        tissue_area_mm2=_mm2(masks.tissue, mpp), tissue_area_before_exclusion_mm2=before_mm2,
        excluded_mm2={"pen": _mm2(removed & _grown(masks.pen), mpp),
                      "dark": _mm2(removed & _grown(masks.dark), mpp)},
        excluded_share=share, pen_area_mm2=_mm2(masks.pen, mpp),
        dark_area_mm2=_mm2(masks.dark, mpp), sampled_patches=len(patches),
        patch_measures=measures, qc_labels=labels, stain_vectors=_stains(patches),
        warnings=warnings)
    return qc, masks


def qc_row(qc: SlideQC) -> dict[str, Any]:
    """The summary flat, for a cohort's ``qc.csv``: areas, shares, medians, label shares,
    the stain vectors' components and the warnings."""
    row: dict[str, Any] = {
        "tissue_area_mm2": qc.tissue_area_mm2,
        "tissue_area_before_exclusion_mm2": qc.tissue_area_before_exclusion_mm2,
        "excluded_share": qc.excluded_share,
        **{f"excluded_{k}_mm2": v for k, v in qc.excluded_mm2.items()},
        "pen_area_mm2": qc.pen_area_mm2, "dark_area_mm2": qc.dark_area_mm2,
        "sampled_patches": qc.sampled_patches,
        **{f"median_{k}": v for k, v in qc.patch_measures.items()},
        **{f"share_{k}": v for k, v in qc.qc_labels.items()},
    }
    for stain, vector in (qc.stain_vectors or {}).items():
        row |= {f"{stain}_od_{c}": v for c, v in zip("rgb", vector, strict=True)}
    row["warnings"] = "; ".join(qc.warnings)
    return row


def _grown(mask: BoolMask) -> BoolMask:
    """The exclusion as the detector applies it (grown by a pixel, and closed over)."""
    grown: BoolMask = cv2.dilate(mask.view(np.uint8), np.ones((5, 5), np.uint8)).view(bool)
    return grown


def draw_qc_overlay(thumbnail: RGBImage, masks: QcMasks) -> RGBImage:
    """``thumbnail`` with the tissue tinted green and outlined, what the exclusion removed
    in red, ink in magenta and dark artefacts in blue."""
    th, tw = thumbnail.shape[:2]

    def fit(mask: BoolMask) -> BoolMask:
        resized = cv2.resize(mask.view(np.uint8), (tw, th), interpolation=cv2.INTER_NEAREST)
        fitted: BoolMask = resized.view(bool)
        return fitted

    img = thumbnail.astype(np.float32)
    layers = ((fit(masks.tissue), (40, 170, 60), 0.40),
              (fit(masks.before_exclusion & ~masks.tissue), (220, 30, 30), 0.55),
              (fit(masks.pen), (200, 0, 200), 0.45), (fit(masks.dark), (20, 60, 220), 0.45))
    for where, colour, alpha in layers:
        img[where] = img[where] * (1 - alpha) + np.array(colour, np.float32) * alpha
    out = np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8))
    contours, _ = cv2.findContours(fit(masks.tissue).view(np.uint8), cv2.RETR_LIST,
                                   cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (0, 120, 30), 1)
    return out
