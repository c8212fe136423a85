"""Tissue detection: pure functions from a low-resolution RGB image to a boolean mask.

Frame: masks are in the pixel grid of the low-resolution image they came from; ``mpp`` is
that image's µm/px. Polygons returned or accepted here are in level-0 pixels, converted
with an explicit ``scale`` (level-0 px per mask px).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry import MultiPolygon, Polygon, shape
from shapely.geometry.base import BaseGeometry

from ._components import fill_small_holes, remove_small_objects
from .errors import InvalidRequestError
from .types import BoolMask, RGBImage, TissueMethod

__all__ = [
    "TissueParams",
    "classical_artifact_masks",
    "clean_mask",
    "dark_artefact_mask",
    "detect_tissue",
    "detect_tissue_and_exclusion",
    "is_fluorescence",
    "load_geojson_geometry",
    "load_mask_png",
    "mask_to_polygons",
    "pen_ink_mask",
    "rasterize_geometry",
]

# OpenCV hue runs 0..179 (degrees / 2). H&E lies in magenta..purple (hue > 125 or < 12);
# marker inks used on slides are green (35..90) and blue (95..125).
_GREEN_HUE = (35, 90)
_BLUE_HUE = (95, 125)
_INK_MIN_SATURATION = 60


CLASSICAL_METHODS = ("auto", "brightfield", "fluorescence")
DEEP_METHODS = {
    "hest": "deeplabv3_seg_v4.ckpt from huggingface.co/MahmoodLab/hest-tissue-seg",
    "hest-fast": "deeplabv3_seg_v4.ckpt from huggingface.co/MahmoodLab/hest-tissue-seg",
    "grandqc": "Tissue_Detection_MPP10.pth from zenodo.org/records/14507273",
}
"""Deep segmenters (:mod:`wsi_sampler.segmenters`) and where their weights come from."""
DEEP_ARTIFACT_CLASSES = ("fold", "dark_spot", "pen", "air_bubble", "out_of_focus")
"""What GrandQC's artefact model finds (``--artifact-weights``): folds, dark spots and
foreign objects, pen marking, edges and air bubbles, out-of-focus areas."""
CLASSICAL_ARTIFACT_CLASSES = ("pen", "dark")
"""What the classical detector excludes without an artefact model: blue / green ink, and
near-black pixels (black marker, dirt, dense folds)."""
ARTIFACT_WEIGHTS_HINT = ("GrandQC_MPP1_state_dict.pth from "
                         "huggingface.co/MahmoodLab/hest-tissue-seg")


@dataclass(frozen=True, kw_only=True)
class TissueParams:
    """Tunable knobs of :func:`detect_tissue`; sizes are physical (µm, µm²)."""

    method: TissueMethod = "auto"
    min_saturation: int = 20
    """Brightfield: the Otsu threshold on HSV saturation (0..255) never drops below this."""
    min_fluorescence_signal: int = 6
    """Fluorescence: the triangle threshold on brightness (0..255) never drops below this."""
    median_blur_um: float = 16.0
    close_um: float = 32.0
    min_tissue_area_um2: float = 20_000.0
    min_hole_area_um2: float = 10_000.0
    exclude_pen: bool = True
    exclude_dark: bool = True
    dark_value: int = 50
    """Pixels whose HSV value (0..255) is below this are black marker or dark artefact."""
    segmenter_weights: str | None = None
    """``hest`` / ``grandqc``: the segmenter's weights (HEST's ``deeplabv3_seg_v4.ckpt``,
    GrandQC's ``Tissue_Detection_MPP10.pth``)."""
    exclude_artifacts: tuple[str, ...] = ()
    """Artefact classes a plan drops. With ``artifact_weights``: any of
    ``DEEP_ARTIFACT_CLASSES`` (none named = all of them, as TRIDENT's artefact removal);
    without: ``pen`` / ``dark`` from the classical detector, and then they replace
    ``exclude_pen`` / ``exclude_dark``."""
    artifact_weights: str | None = None
    """The artefact model's weights (GrandQC's ``GrandQC_MPP1_state_dict.pth``)."""
    artifact_model: str = "grandqc-artifacts"
    """The artefact model's card (``grandqc-artifacts-mpp15`` / ``-mpp2``: GrandQC's coarser
    variants)."""
    max_excluded_share: float = 0.5
    """When exclusion removes more of the tissue than this (or all of it), the plan says so
    and keeps the patches it would have dropped, marked ``excluded``."""
    strict_exclusion: bool = False
    """Drop the excluded patches whatever the share (the plan may then be empty)."""

    def __post_init__(self) -> None:
        names = self.exclude_artifacts
        if isinstance(names, str):
            names = tuple(names.split(","))
        # a tuple of names, as given from a list, "pen,fold" or the CLI's split
        object.__setattr__(self, "exclude_artifacts",
                           tuple(dict.fromkeys(n.strip() for n in names if n.strip())))
        self._check_method()
        self._check_artifacts()
        for name in ("median_blur_um", "close_um", "min_tissue_area_um2", "min_hole_area_um2"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InvalidRequestError(f"{name} must be >= 0, got {value}")

    def _check_artifacts(self) -> None:
        known = DEEP_ARTIFACT_CLASSES if self.artifact_weights else CLASSICAL_ARTIFACT_CLASSES
        for name in self.exclude_artifacts:
            if name in known:
                continue
            if name in DEEP_ARTIFACT_CLASSES:
                raise InvalidRequestError(
                    f"excluding {name!r} needs the artefact model's weights "
                    f"(--artifact-weights FILE: {ARTIFACT_WEIGHTS_HINT}); without them "
                    f"only {', '.join(CLASSICAL_ARTIFACT_CLASSES)}")
            raise InvalidRequestError(f"unknown artefact class {name!r} ({', '.join(known)})")
        if not (math.isfinite(self.max_excluded_share) and 0 <= self.max_excluded_share <= 1):
            raise InvalidRequestError(
                f"max_excluded_share must be in [0, 1], got {self.max_excluded_share}")

    def classical_exclusion(self) -> tuple[bool, bool]:
        """(pen, dark): what the classical detector removes under these settings."""
        if self.artifact_weights:
            return False, False
        if self.exclude_artifacts:
            return "pen" in self.exclude_artifacts, "dark" in self.exclude_artifacts
        return self.exclude_pen, self.exclude_dark

    def deep_exclusion(self) -> tuple[str, ...]:
        """The artefact model's classes to drop (empty without its weights)."""
        if not self.artifact_weights:
            return ()
        return self.exclude_artifacts or DEEP_ARTIFACT_CLASSES

    def _check_method(self) -> None:
        if self.method not in (*CLASSICAL_METHODS, *DEEP_METHODS):
            raise InvalidRequestError(
                f"unknown tissue method {self.method!r} (auto, brightfield, fluorescence, "
                "hest, hest-fast, grandqc)"
            )
        if self.method in DEEP_METHODS and not self.segmenter_weights:
            raise InvalidRequestError(
                f"tissue method {self.method!r} needs the segmenter's weights "
                f"(--segmenter-weights FILE: {DEEP_METHODS[self.method]})")


def _odd_kernel(size_um: float, mpp: float) -> int:
    px = max(1, round(size_um / mpp))
    return px if px % 2 else px + 1


def _threshold(channel: np.ndarray, floor: int, method: int) -> BoolMask:
    """``channel > max(automatic threshold, floor)``, using the thresholded image OpenCV
    makes anyway (one 31 Mpx image less for a 50 x 40 mm slide at 8 µm/px)."""
    thr, above = cv2.threshold(channel, 0, 1, cv2.THRESH_BINARY + method)
    if thr < floor:
        cv2.threshold(channel, floor, 1, cv2.THRESH_BINARY, dst=above)
    return above.view(bool)  # type: ignore[no-any-return]


def channel_max(rgb: RGBImage) -> npt.NDArray[np.uint8]:
    """HSV value, max(R, G, B), per pixel (element-wise: ~15x faster than ``max(axis=2)``)."""
    out: npt.NDArray[np.uint8] = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    return out


def is_fluorescence(rgb: RGBImage) -> bool:
    """Tell a dark-background (fluorescence) image from a bright-field one."""
    step = max(1, int(math.sqrt(rgb.shape[0] * rgb.shape[1] / 1e6)))  # ~1 Mpx is plenty
    value = channel_max(rgb[::step, ::step])
    return bool(np.median(value) < 60)


def pen_ink_mask(rgb: RGBImage) -> BoolMask:
    """Return where blue or green marker ink is (black marker is a dark artefact)."""
    return _pen_from_hsv(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV))


def _pen_from_hsv(hsv: npt.NDArray[np.uint8]) -> BoolMask:
    # cv2.inRange (inclusive bounds): saturation >= the ink floor, hue in the green or blue band.
    green = cv2.inRange(hsv, (_GREEN_HUE[0], _INK_MIN_SATURATION, 0), (_GREEN_HUE[1], 255, 255))
    blue = cv2.inRange(hsv, (_BLUE_HUE[0], _INK_MIN_SATURATION, 0), (_BLUE_HUE[1], 255, 255))
    ink: BoolMask = cv2.bitwise_or(green, blue) > 0
    return ink


def dark_artefact_mask(rgb: RGBImage, *, dark_value: int = 50) -> BoolMask:
    """Return near-black pixels: black marker, folds, dirt, out-of-focus debris."""
    if dark_value <= 0:
        return np.zeros(rgb.shape[:2], bool)
    top = min(dark_value - 1, 255)
    dark: BoolMask = cv2.inRange(rgb, (0, 0, 0), (top, top, top)) > 0  # max < value
    return dark


def _brightfield_mask(rgb: RGBImage, blur: int, p: TissueParams) -> tuple[BoolMask, float]:
    """Otsu on the median-blurred saturation, less pen ink and near-black artefacts; and
    the share of the thresholded pixels the exclusion removed."""
    sat, excluded = _saturation_and_artefacts(rgb, p)
    blurred = cv2.medianBlur(sat, blur)
    del sat
    mask = _threshold(blurred, p.min_saturation, cv2.THRESH_OTSU)
    del blurred
    share = 0.0
    if excluded.any():
        # Grow the exclusion a little: stroke edges are ink blended with background.
        grow = cv2.dilate(excluded.view(np.uint8), np.ones((3, 3), np.uint8)).view(bool)
        del excluded
        before = int(np.count_nonzero(mask))
        np.logical_and(mask, np.logical_not(grow, out=grow), out=mask)
        share = 1 - np.count_nonzero(mask) / before if before else 0.0
    return mask, share


_BAND_ROWS = 256
"""Rows of the image converted to HSV at a time: the HSV copy of a 31 Mpx thumbnail (a
50 x 40 mm slide at 8 µm/px) would take 94 MiB at once."""


def _saturation_and_artefacts(
    rgb: RGBImage, p: TissueParams
) -> tuple[npt.NDArray[np.uint8], BoolMask]:
    """HSV saturation, and where pen ink or near-black artefacts are (as ``p`` asks)."""
    height = rgb.shape[0]
    pen, dark = p.classical_exclusion()
    sat = np.empty(rgb.shape[:2], np.uint8)
    excluded = np.zeros(rgb.shape[:2], bool)
    for y in range(0, height, _BAND_ROWS):
        band = rgb[y : y + _BAND_ROWS]
        hsv = cv2.cvtColor(band, cv2.COLOR_RGB2HSV)
        sat[y : y + _BAND_ROWS] = hsv[:, :, 1]
        if pen:
            excluded[y : y + _BAND_ROWS] |= _pen_from_hsv(hsv)
        if dark:
            excluded[y : y + _BAND_ROWS] |= dark_artefact_mask(band, dark_value=p.dark_value)
    return sat, excluded


def classical_artifact_masks(rgb: RGBImage, params: TissueParams) -> dict[str, BoolMask]:
    """Where the classical detector finds pen ink and near-black artefacts, grown by the
    pixels the detector's own grow and close take with them (for the area each removed)."""
    pen, dark = params.classical_exclusion()
    found = {"pen": pen_ink_mask(rgb) if pen else None,
             "dark": dark_artefact_mask(rgb, dark_value=params.dark_value) if dark else None}
    kernel = np.ones((5, 5), np.uint8)
    return {name: cv2.dilate(mask.view(np.uint8), kernel).view(bool)
            for name, mask in found.items() if mask is not None}


def _morph_close(mask: np.ndarray, ksize: int) -> np.ndarray:
    if ksize <= 1:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (ksize, ksize))
    closed = cv2.morphologyEx(mask.view(np.uint8), cv2.MORPH_CLOSE, kernel)
    return closed.view(bool)  # type: ignore[no-any-return]


def detect_tissue(rgb: RGBImage, mpp: float, params: TissueParams | None = None) -> BoolMask:
    """Return the tissue mask of a low-resolution RGB image taken at ``mpp`` µm/px
    (:func:`detect_tissue_and_exclusion` without the share)."""
    return detect_tissue_and_exclusion(rgb, mpp, params)[0]


def detect_tissue_and_exclusion(rgb: RGBImage, mpp: float, params: TissueParams | None = None
                                ) -> tuple[BoolMask, float]:
    """Return the tissue mask of a low-resolution RGB image taken at ``mpp`` µm/px, and the
    share of the thresholded tissue pixels that pen ink and dark-artefact exclusion removed.

    Bright-field: HSV saturation, median blur, Otsu (with a floor so a blank slide gives
    an empty mask), pen ink and near-black artefacts removed, morphological close, then
    objects and holes smaller than the physical thresholds dropped / filled.
    Fluorescence: a triangle threshold on brightness (tissue glows over a dark background).
    """
    p = params or TissueParams()
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InvalidRequestError(f"expected an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    if not (math.isfinite(mpp) and mpp > 0):
        raise InvalidRequestError(f"mpp must be > 0, got {mpp}")
    method = p.method
    if method in DEEP_METHODS:
        raise InvalidRequestError(f"tissue method {method!r} segments the slide itself: use "
                                  "compute_tissue_mask(slide, …)")
    if method == "auto":
        method = "fluorescence" if is_fluorescence(rgb) else "brightfield"
    blur = _odd_kernel(p.median_blur_um, mpp)
    share = 0.0
    if method == "fluorescence":
        signal = cv2.medianBlur(channel_max(rgb), blur)
        # Triangle, not Otsu: dim tissue between bright nuclei must count as tissue.
        mask = _threshold(signal, p.min_fluorescence_signal, cv2.THRESH_TRIANGLE)
    else:
        mask, share = _brightfield_mask(rgb, blur, p)
    mask = _morph_close(mask, _odd_kernel(p.close_um, mpp))
    return clean_mask(mask, mpp, p), share


def clean_mask(mask: BoolMask, mpp: float, params: TissueParams) -> BoolMask:
    """Drop objects and fill holes smaller than ``params``' physical thresholds."""
    px_area = mpp * mpp
    mask = remove_small_objects(mask, math.ceil(params.min_tissue_area_um2 / px_area))
    return fill_small_holes(mask, math.floor(params.min_hole_area_um2 / px_area))


# -- polygons -------------------------------------------------------------------------------
def mask_to_polygons(
    mask: BoolMask, scale: tuple[float, float], *, simplify_px: float = 1.0
) -> MultiPolygon:
    """Vectorise a mask into level-0 polygons (``scale`` = level-0 px per mask px, x and y)."""
    contours, hierarchy = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
    )
    polys: list[Polygon] = []
    if hierarchy is None:
        return MultiPolygon()
    sx, sy = scale
    hier = hierarchy[0]

    def to_ring(c: np.ndarray) -> np.ndarray:
        pts: np.ndarray = c[:, 0, :].astype(np.float64) * np.array([sx, sy])
        return pts

    for i, contour in enumerate(contours):
        if hier[i][3] != -1 or len(contour) < 3:
            continue
        holes = []
        child = hier[i][2]
        while child != -1:
            if len(contours[child]) >= 3:
                holes.append(to_ring(contours[child]))
            child = hier[child][0]
        poly = Polygon(to_ring(contour), holes).buffer(0)
        if simplify_px > 0:
            poly = poly.simplify(simplify_px * max(sx, sy))
        if not poly.is_empty:
            polys.extend(poly.geoms if isinstance(poly, MultiPolygon) else [poly])
    return MultiPolygon(polys)


def rasterize_geometry(
    geom: BaseGeometry, shape_hw: tuple[int, int], scale: tuple[float, float]
) -> BoolMask:
    """Draw level-0 polygons onto a mask of ``shape_hw`` (``scale`` as above)."""
    canvas = np.zeros(shape_hw, np.uint8)
    sx, sy = scale
    for poly in _polygons(geom):
        ext = np.round(np.asarray(poly.exterior.coords)[:, :2] / [sx, sy]).astype(np.int32)
        cv2.fillPoly(canvas, [ext], 1)
        for ring in poly.interiors:
            hole = np.round(np.asarray(ring.coords)[:, :2] / [sx, sy]).astype(np.int32)
            cv2.fillPoly(canvas, [hole], 0)
    return canvas.astype(bool)


def _polygons(geom: BaseGeometry) -> list[Polygon]:
    if isinstance(geom, Polygon):
        return [geom]
    if hasattr(geom, "geoms"):
        out: list[Polygon] = []
        for g in geom.geoms:
            out.extend(_polygons(g))
        return out
    return []


def load_geojson_geometry(source: str | Path | dict[str, Any]) -> BaseGeometry:
    """Read polygons (level-0 px) from a GeoJSON file, FeatureCollection, Feature or geometry."""
    try:
        data = json.loads(Path(source).read_text()) if isinstance(source, (str, Path)) else source
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"cannot read GeoJSON {source}: {exc}") from exc
    try:
        if data.get("type") == "FeatureCollection":
            geoms = [shape(f["geometry"]) for f in data["features"] if f.get("geometry")]
        elif data.get("type") == "Feature":
            geoms = [shape(data["geometry"])]
        else:
            geoms = [shape(data)]
    except (KeyError, TypeError, ValueError, AttributeError, shapely.errors.GEOSException) as exc:
        raise InvalidRequestError(f"not valid GeoJSON polygons: {exc}") from exc
    polys = [p for g in geoms for p in _polygons(g)]
    if not polys:
        raise InvalidRequestError("the GeoJSON holds no Polygon or MultiPolygon")
    return shapely.union_all([p.buffer(0) for p in polys])


def load_mask_png(path: str | Path, shape_hw: tuple[int, int]) -> BoolMask:
    """Read a user mask image (non-zero = tissue) and fit it to ``shape_hw``.

    The image must cover the whole slide (same aspect ratio within 2 %).
    """
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise InvalidRequestError(f"{path}: not a readable mask image (PNG, TIFF, ...)")
    h, w = shape_hw
    mh, mw = img.shape
    if abs((mw / mh) / (w / h) - 1) > 0.02:
        raise InvalidRequestError(
            f"{path}: mask aspect ratio {mw}x{mh} does not match the slide's ({w}x{h} at mask "
            "resolution); the mask must cover the whole slide"
        )
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_NEAREST) > 0  # type: ignore[no-any-return]
