"""A slide's quality-control summary: what HistoQC users look at, in one JSON and one image.

Areas come from the low-resolution masks (``tissue_mpp`` µm/px): the tissue, the tissue
artefact exclusion removed (:mod:`wsi_sampler.exclusion`: the classical pen-ink and
near-black detector, or GrandQC's artefact model and each of its classes), and the ink and
dark areas anywhere on the slide. Patch measures come from the built-in ``tissue-qc`` model
on a seeded random sample of tissue patches (224 px at 0.5 µm/px): blur (variance of the Laplacian),
pen, dark, haematoxylin and eosin optical density, and the share of each QC label. The
stain vectors are Macenko's (:mod:`wsi_sampler.stain`) over the same sample. Units: mm²,
µm/px; the slide is named by its fingerprint only (file names can carry patient data).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from .exclusion import mm2
from .export import tissue_feature
from .geojson import classification, feature, feature_collection, polygon_geometry
from .plan import PlanParams, TissueMask, compute_tissue_mask, make_plan
from .slide import Slide
from .stain import macenko_stains
from .tissue import TissueParams, dark_artefact_mask, mask_to_polygons, pen_ink_mask
from .types import BoolMask, RGBImage

__all__ = ["ARTIFACT_COLOURS", "CLASSICAL_COLOURS", "EXCLUSION_WARN_SHARE", "REMOVED_COLOUR",
           "QcMasks", "SlideQC", "artifact_map", "draw_qc_overlay", "overlay_classes",
           "overlay_legend", "qc_collection", "qc_layer", "qc_masks", "qc_row", "slide_qc"]

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
    scale: tuple[float, float]
    """Level-0 px per mask px, (x, y)."""
    artifacts: dict[str, BoolMask] = field(default_factory=dict)
    """The artefact model's classes on the tissue (empty without one)."""


@dataclass(frozen=True)
class SlideQC:
    fingerprint: str
    mask_mpp: float
    slide_area_mm2: float
    tissue_area_mm2: float
    tissue_area_before_exclusion_mm2: float
    excluded_mm2: dict[str, float]
    """Tissue removed by each excluded class (``pen``, ``dark``; or the artefact model's);
    a pixel in two counts in both."""
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
    artifact_mm2: dict[str, float] = field(default_factory=dict)
    """The artefact model's classes on the tissue, excluded or not (empty without one)."""
    artifact_detector: str = "classical"
    overlay_legend: dict[str, str] = field(default_factory=dict)
    """What the overlay (``qc.png``) draws in which colour (``#rrggbb``), in drawing order."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def qc_masks(slide: Slide, tm: TissueMask) -> QcMasks:
    """The tissue before and after exclusion, what the artefact model found, and where ink
    and dark pixels are anywhere on the slide (from ``tm``, the slide's tissue mask)."""
    thumb = slide.thumbnail(mpp=tm.mpp)
    ex = tm.exclusion
    deep = ex is not None and ex.detector != "classical"
    return QcMasks(tissue=tm.mask, before_exclusion=ex.before if ex is not None else tm.mask,
                   pen=pen_ink_mask(thumb), dark=dark_artefact_mask(thumb), mpp=tm.mpp,
                   scale=tm.scale,
                   artifacts=ex.found if ex is not None and deep else {})


def _sample(slide: Slide, masks: QcMasks, seed: int) -> np.ndarray:
    """Up to SAMPLE_PATCHES random tissue patches, 224 px at 0.5 µm/px (or the slide's)."""
    from .extract import Extractor

    tm = TissueMask(masks.tissue, masks.mpp, masks.scale)
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
             seed: int = 0, tissue: TissueMask | None = None) -> tuple[SlideQC, QcMasks]:
    """The slide's QC summary and the masks it was measured on (``tissue``: the slide's
    mask when it is at hand, else detected with ``params``)."""
    tm = tissue or compute_tissue_mask(slide, tissue_mpp=tissue_mpp, params=params)
    masks, mpp, ex = qc_masks(slide, tm), tm.mpp, tm.exclusion
    report = ex.report(mpp) if ex is not None else None
    share = tm.excluded_share
    patches = _sample(slide, masks, seed)
    measures, labels = _patch_summary(patches)
    warnings = []
    if share > EXCLUSION_WARN_SHARE:
        what = "pen/dark" if ex is None or ex.detector == "classical" else ex.detector
        warnings.append(f"{what} exclusion removed {share:.0%} of the tissue: check the "
                        "overlay (dark-stained tissue can read as a dark artefact)")
    if not masks.tissue.any():
        warnings.append("no tissue found")
    qc = SlideQC(
        fingerprint=slide.fingerprint, mask_mpp=mpp,
        slide_area_mm2=round(masks.tissue.size * mpp * mpp / 1e6, 4),
        tissue_area_mm2=mm2(masks.tissue, mpp),
        tissue_area_before_exclusion_mm2=mm2(masks.before_exclusion, mpp),
        excluded_mm2=report["excluded_mm2"] if report else {}, excluded_share=share,
        pen_area_mm2=mm2(masks.pen, mpp), dark_area_mm2=mm2(masks.dark, mpp),
        sampled_patches=len(patches), patch_measures=measures, qc_labels=labels,
        stain_vectors=_stains(patches), warnings=warnings,
        artifact_mm2=report["found_mm2"] if report and masks.artifacts else {},
        artifact_detector=ex.detector if ex is not None else "classical",
        overlay_legend=overlay_legend(masks))
    return qc, masks


def qc_row(qc: SlideQC) -> dict[str, Any]:
    """The summary flat, for a cohort's ``qc.csv``: areas, shares, medians, label shares,
    the stain vectors' components and the warnings."""
    row: dict[str, Any] = {
        "tissue_area_mm2": qc.tissue_area_mm2,
        "tissue_area_before_exclusion_mm2": qc.tissue_area_before_exclusion_mm2,
        "excluded_share": qc.excluded_share,
        **{f"excluded_{k}_mm2": v for k, v in qc.excluded_mm2.items()},
        **{f"artifact_{k}_mm2": v for k, v in qc.artifact_mm2.items()},
        "pen_area_mm2": qc.pen_area_mm2, "dark_area_mm2": qc.dark_area_mm2,
        "sampled_patches": qc.sampled_patches,
        **{f"median_{k}": v for k, v in qc.patch_measures.items()},
        **{f"share_{k}": v for k, v in qc.qc_labels.items()},
    }
    for stain, vector in (qc.stain_vectors or {}).items():
        row |= {f"{stain}_od_{c}": v for c, v in zip("rgb", vector, strict=True)}
    row["warnings"] = "; ".join(qc.warnings)
    return row


ARTIFACT_COLOURS: dict[str, tuple[int, int, int]] = {
    "fold": (255, 140, 0), "dark_spot": (20, 60, 220), "pen": (200, 0, 200),
    "air_bubble": (0, 200, 220), "out_of_focus": (240, 220, 0)}
"""The overlay's colour of each artefact-model class (RGB)."""


REMOVED_COLOUR = (220, 30, 30)
"""What the exclusion removed from the tissue (RGB)."""
CLASSICAL_COLOURS: dict[str, tuple[int, int, int]] = {"ink": (200, 0, 200),
                                                       "dark": (20, 60, 220)}
"""The classical detector's ink and dark pixels, anywhere on the slide (RGB)."""


def overlay_classes(masks: QcMasks) -> list[tuple[str, BoolMask, tuple[int, int, int], float]]:
    """What the QC overlay draws over the tissue, in drawing order: (label, where, RGB,
    alpha over the thumbnail). The removed area, then the artefact model's classes, or the
    classical ink and dark pixels."""
    layers = [("removed by exclusion", masks.before_exclusion & ~masks.tissue,
               REMOVED_COLOUR, 0.55)]
    if masks.artifacts:
        return layers + [(name, m, ARTIFACT_COLOURS.get(name, (128, 128, 128)), 0.55)
                         for name, m in masks.artifacts.items()]
    return layers + [("ink", masks.pen, CLASSICAL_COLOURS["ink"], 0.45),
                     ("dark", masks.dark, CLASSICAL_COLOURS["dark"], 0.45)]


def overlay_legend(masks: QcMasks) -> dict[str, str]:
    """Each of :func:`overlay_classes`' labels and its colour (``#rrggbb``)."""
    return {label: "#{:02x}{:02x}{:02x}".format(*colour)
            for label, _, colour, _ in overlay_classes(masks)}


def qc_layer(masks: QcMasks) -> npt.NDArray[np.uint8]:
    """The overlay's classes alone (no thumbnail, no tissue tint) as RGBA at the masks'
    resolution, opaque where a class is and transparent elsewhere: a layer to draw over
    the slide (a viewer sets its opacity)."""
    rgba = np.zeros((*masks.tissue.shape, 4), np.uint8)
    for _, where, colour, _ in overlay_classes(masks):
        rgba[where] = (*colour, 255)
    return rgba


QUPATH_CLASSES = {"removed by exclusion": "Excluded", "ink": "Ink", "dark": "Dark artefact",
                  "fold": "Fold", "dark_spot": "Dark spot", "pen": "Pen",
                  "air_bubble": "Air bubble", "out_of_focus": "Out of focus"}
"""The QuPath classification of each overlay class."""


def qc_collection(masks: QcMasks) -> dict[str, Any]:
    """What QC found as QuPath annotations (level-0 px, :mod:`.geojson`): the tissue after
    exclusion (``Tissue``), then each class the overlay draws (:func:`overlay_classes`),
    classified (``QUPATH_CLASSES``) in the overlay's colour; each with its area in mm² as a
    measurement. Classes found nowhere are left out."""
    features = [tissue_feature(masks.tissue, masks.scale,
                               {"Area mm2": mm2(masks.tissue, masks.mpp)})]
    for label, where, colour, _ in overlay_classes(masks):
        if not where.any():
            continue
        features.append(feature(
            polygon_geometry(mask_to_polygons(where, masks.scale)), object_type="annotation",
            name=label, cls=classification(QUPATH_CLASSES.get(label, label), colour=colour),
            measurements={"Area mm2": mm2(where, masks.mpp)}))
    return feature_collection(features)


def draw_qc_overlay(thumbnail: RGBImage, masks: QcMasks) -> RGBImage:
    """``thumbnail`` with the tissue tinted green and outlined, and what the exclusion
    removed in red. Classical: ink in magenta and dark artefacts in blue, anywhere. With an
    artefact model: each of its classes in its ``ARTIFACT_COLOURS``, the removed area
    outlined in red."""
    th, tw = thumbnail.shape[:2]

    def fit(mask: BoolMask) -> BoolMask:
        resized = cv2.resize(mask.view(np.uint8), (tw, th), interpolation=cv2.INTER_NEAREST)
        fitted: BoolMask = resized.view(bool)
        return fitted

    classes = overlay_classes(masks)
    removed = fit(classes[0][1])
    img = thumbnail.astype(np.float32)
    layers = [(fit(masks.tissue), (40, 170, 60), 0.40), (removed, REMOVED_COLOUR, 0.55)]
    layers += [(fit(where), colour, alpha) for _, where, colour, alpha in classes[1:]]
    for where, colour, alpha in layers:
        img[where] = img[where] * (1 - alpha) + np.array(colour, np.float32) * alpha
    out = np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8))
    for where, colour in ((fit(masks.tissue), (0, 120, 30)), (removed, (200, 0, 0))):
        contours, _ = cv2.findContours(where.view(np.uint8), cv2.RETR_LIST,
                                       cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colour, 1)
    return out


def artifact_map(tm: TissueMask) -> tuple[RGBImage, dict[str, Any]]:
    """The artefact model's classes in their ``ARTIFACT_COLOURS`` on black (the tissue
    before exclusion grey), at the mask's resolution; and each class's area in mm² and as a
    percentage of that tissue."""
    ex = tm.exclusion
    before = ex.before if ex is not None else tm.mask
    image = np.zeros((*tm.mask.shape, 3), np.uint8)
    image[before] = (128, 128, 128)
    for name, where in (ex.found if ex is not None else {}).items():
        image[where] = ARTIFACT_COLOURS.get(name, (255, 255, 255))
    tissue_mm2 = mm2(before, tm.mpp)
    classes = {name: {"mm2": mm2(where, tm.mpp), "um2": round(mm2(where, tm.mpp) * 1e6),
                      "percent_of_tissue": round(100 * mm2(where, tm.mpp) / tissue_mm2, 2)
                      if tissue_mm2 else 0.0,
                      "colour": list(ARTIFACT_COLOURS.get(name, (255, 255, 255)))}
               for name, where in (ex.found if ex is not None else {}).items()}
    return image, {"detector": ex.detector if ex is not None else None, "mask_mpp": tm.mpp,
                   "tissue_mm2": tissue_mm2, "classes": classes}
