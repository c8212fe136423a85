"""Patch plans: which level-0 boxes to read, at what resolution. Coordinates only.

Frame: ``x0``/``y0``/``width0``/``height0`` are level-0 pixels; ``patch_size_px`` is the
side of the output patch at ``target_mpp`` µm/px. Candidates are laid on a regular grid
anchored at (0, 0) in row-major order (top row first, left to right); every strategy keeps
that order.
"""

from __future__ import annotations

import copy
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from shapely.geometry.base import BaseGeometry

from .errors import InvalidRequestError
from .exclusion import Exclusion, classical_exclusion, deep_exclusion
from .medgemma import (
    MEDGEMMA_DETECT_MPP,
    MEDGEMMA_MAX_PATCHES,
    MEDGEMMA_PATCH_PX,
    MEDGEMMA_TISSUE_MPP,
    NOTEBOOK_MAGNIFICATION,
    NOTEBOOK_MAX_PATCHES,
    BagOrder,
    MedgemmaVariant,
    select_bag,
)
from .sampling import (
    draw_medgemma_magnification,
    sample_random,
    sample_stratified,
)
from .slide import Slide
from .tissue import (
    DEEP_METHODS,
    TissueParams,
    clean_mask,
    detect_tissue_and_exclusion,
    rasterize_geometry,
)
from .types import BoolMask, Strategy
from .units import TISSUE_MPP_RANGE, check_mpp, magnification_to_mpp, resolve_target_mpp

__all__ = ["PatchPlan", "PlanParams", "TissueMask", "compute_tissue_mask", "make_plan",
           "medgemma_params"]

__all__ += ["MEDGEMMA_DETECT_MPP", "MEDGEMMA_MAX_PATCHES", "MEDGEMMA_PATCH_PX",
            "MEDGEMMA_TISSUE_MPP"]

# Bounds on the work one plan may cost: the tissue mask (the MedGemma 5x mask of a
# 100,000 x 80,000 slide is 125 Mpx), the candidate grid, and upsampling past the scan.
MAX_MASK_PX = 1 << 27
MAX_GRID_CELLS = 1 << 26
MAX_UPSAMPLING = 4.0


@dataclass(frozen=True, kw_only=True)
class PlanParams:
    """What to sample. Sizes are physical or at the target resolution."""

    strategy: Strategy = "grid"
    patch_size_px: int = 256
    target_mpp: float | None = None
    """µm/px of the output patches; None = the slide's own level-0 resolution."""
    magnification: float | None = None
    """Alternative to target_mpp (10x = 1.0 µm/px). For ``medgemma``, fixes the draw."""
    overlap: float = 0.0
    """Fraction of a patch shared with its neighbour, 0 <= overlap < 1."""
    min_tissue_fraction: float = 0.5
    n_patches: int | None = None
    """How many patches ``random`` / ``stratified`` keep; the cap for ``medgemma``."""
    seed: int = 0
    tissue_mpp: float = 8.0
    """Resolution of the tissue mask in µm/px (8 ≈ 1.25x)."""
    tissue: TissueParams = field(default_factory=TissueParams)
    order: BagOrder = "row-major"
    """``medgemma`` only: ``sampled`` keeps the order of the notebook's ``random.sample``."""

    def __post_init__(self) -> None:
        if self.order not in ("row-major", "sampled"):
            raise InvalidRequestError(f"unknown order {self.order!r} (row-major, sampled)")
        if self.order == "sampled" and self.strategy != "medgemma":
            raise InvalidRequestError("order 'sampled' belongs to the medgemma preset")
        if self.strategy not in ("grid", "random", "stratified", "medgemma"):
            raise InvalidRequestError(
                f"unknown strategy {self.strategy!r} (grid, random, stratified, medgemma)"
            )
        if not 8 <= self.patch_size_px <= 8192:
            raise InvalidRequestError(f"patch_size_px must be 8..8192, got {self.patch_size_px}")
        if not (0 <= self.overlap < 1):
            raise InvalidRequestError(f"overlap must be in [0, 1), got {self.overlap}")
        if not (0 <= self.min_tissue_fraction <= 1):
            raise InvalidRequestError(
                f"min_tissue_fraction must be in [0, 1], got {self.min_tissue_fraction}"
            )
        check_mpp("tissue_mpp", self.tissue_mpp, TISSUE_MPP_RANGE)
        if self.strategy in ("random", "stratified") and self.n_patches is None:
            raise InvalidRequestError(f"strategy {self.strategy!r} needs n_patches")
        if self.n_patches is not None and self.n_patches < 1:
            raise InvalidRequestError(f"n_patches must be >= 1, got {self.n_patches}")
        if self.strategy != "medgemma":
            resolve_target_mpp(target_mpp=self.target_mpp, magnification=self.magnification)
        elif self.target_mpp is not None:
            raise InvalidRequestError("medgemma draws its magnification; fix it with magnification")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def medgemma_params(
    *,
    seed: int = 0,
    magnification: float | None = None,
    max_patches: int | None = None,
    min_tissue_fraction: float = 0.5,
    variant: MedgemmaVariant = "report",
    tissue_mpp: float = MEDGEMMA_DETECT_MPP,
) -> PlanParams:
    """The MedGemma 1.5 whole-slide recipe: 896 px, no overlap, a low-resolution tissue mask,
    and either the technical report's sampling (``report``: magnification drawn 5x/10x/20x,
    ≤ 126 patches, row-major order) or Google's public notebook (``notebook``: 10x, ≤ 125
    patches, in the order ``random.sample`` returns). ``magnification`` and ``max_patches``
    override both. ``tissue_mpp``: 8 µm/px by default (see ``MEDGEMMA_DETECT_MPP``); 2.0 is
    the recipe's 5x mask exactly."""
    if variant not in ("report", "notebook"):
        raise InvalidRequestError(f"unknown medgemma variant {variant!r} (report, notebook)")
    notebook = variant == "notebook"
    return PlanParams(
        strategy="medgemma",
        patch_size_px=MEDGEMMA_PATCH_PX,
        magnification=magnification or (NOTEBOOK_MAGNIFICATION if notebook else None),
        n_patches=max_patches or (NOTEBOOK_MAX_PATCHES if notebook else MEDGEMMA_MAX_PATCHES),
        seed=seed,
        min_tissue_fraction=min_tissue_fraction,
        tissue_mpp=tissue_mpp,
        order="sampled" if notebook else "row-major",
    )


@dataclass(frozen=True)
class TissueMask:
    """A tissue mask and how it maps to level 0."""

    mask: BoolMask
    mpp: float
    """µm/px of the mask (may be coarser than asked for a slide without a fine level)."""
    scale: tuple[float, float]
    """Level-0 px per mask px, (x, y)."""
    exclusion: Exclusion | None = None
    """What artefact exclusion found and removed (None: no artefact model ran and the
    classical exclusion removed nothing)."""

    @property
    def excluded_share(self) -> float:
        """Of the tissue before exclusion, the share removed (0 without exclusion)."""
        return self.exclusion.share if self.exclusion is not None else 0.0


def compute_tissue_mask(
    slide: Slide, *, tissue_mpp: float = 8.0, params: TissueParams | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TissueMask:
    """Detect tissue on a thumbnail of ``slide`` at ``tissue_mpp`` µm/px (or with a deep
    segmenter), then exclude artefacts as ``params`` says (``progress``: the artefact
    model's tiles done and in all)."""
    check_mpp("tissue_mpp", tissue_mpp, TISSUE_MPP_RANGE)
    mx, my = slide.require_mpp()
    mpp = max(tissue_mpp, mx, my)
    w, h = slide.dimensions
    mask_px = (w * mx / mpp) * (h * my / mpp)
    if mask_px > MAX_MASK_PX:
        coarser = mpp * math.sqrt(mask_px / MAX_MASK_PX)
        raise InvalidRequestError(
            f"a tissue mask at {mpp:g} µm/px would have {mask_px / 1e6:,.0f} Mpx (limit "
            f"{MAX_MASK_PX / 1e6:,.0f}); use tissue_mpp >= {math.ceil(coarser * 100) / 100:g}"
        )
    p = params or TissueParams()
    key = _deep_key(slide, mpp, p)
    if key is None:
        return _detect_tissue_mask(slide, mpp, p, progress)
    with _DEEP_MASKS_LOCK:
        cached = _DEEP_MASKS.get(key)
        if cached is not None:
            _DEEP_MASKS.move_to_end(key)
            return cached
    tm = _detect_tissue_mask(slide, mpp, p, progress)
    with _DEEP_MASKS_LOCK:
        _DEEP_MASKS[key] = tm
        while len(_DEEP_MASKS) > DEEP_MASK_CACHE:
            _DEEP_MASKS.popitem(last=False)
    return tm


DEEP_MASK_CACHE = 2
"""Masks of a deep segmenter or the artefact model kept in memory (minutes of work each on
a CPU): a service's plan, stream, job and QC requests on one slide, and a batch's plan and
QC, run the model once."""
_DEEP_MASKS: OrderedDict[tuple[Any, ...], TissueMask] = OrderedDict()
_DEEP_MASKS_LOCK = threading.Lock()


def _deep_key(slide: Slide, mpp: float, p: TissueParams) -> tuple[Any, ...] | None:
    """The cache key of a mask a model makes (None for the classical detector, which
    takes a fraction of a second): the slide's content, geometry, settings and weights."""
    if p.method not in DEEP_METHODS and not p.deep_exclusion():
        return None
    stamps = []
    for weights in (p.segmenter_weights, p.artifact_weights):
        try:
            st = os.stat(weights) if weights else None
        except OSError:
            st = None
        stamps.append((st.st_size, st.st_mtime_ns) if st else None)
    return (slide.fingerprint, slide.require_mpp(), slide.dimensions, mpp, p, tuple(stamps))


def _detect_tissue_mask(slide: Slide, mpp: float, p: TissueParams,
                        progress: Callable[[int, int], None] | None) -> TissueMask:
    """The detection behind :func:`compute_tissue_mask`, uncached."""
    w, h = slide.dimensions
    exclusion = None
    if p.method in DEEP_METHODS:
        mask = _segmented(slide, mpp, p)
    else:
        thumb = slide.thumbnail(mpp=mpp)
        mask, share = detect_tissue_and_exclusion(thumb, mpp, p)
        if share > 0:
            exclusion = classical_exclusion(thumb, mpp, p, mask)
        del thumb
    if p.deep_exclusion():
        exclusion = deep_exclusion(slide, mask, mpp, p, progress=progress)
        mask = exclusion.after
    if exclusion is not None and exclusion.detector == "classical" and not (
            exclusion.before & ~exclusion.after).any():
        exclusion = None  # (an artefact model's finds are kept even when none was removed)
    return TissueMask(mask=mask, mpp=mpp, scale=(w / mask.shape[1], h / mask.shape[0]),
                      exclusion=exclusion)


def _segmented(slide: Slide, mpp: float, params: TissueParams) -> BoolMask:
    """A deep segmenter's mask (``wsi_sampler.segmenters``; torch is imported only here)."""
    from .segmenters import cached_segmenter, segment_slide

    segmenter = cached_segmenter(params.method, params.segmenter_weights)
    return clean_mask(segment_slide(slide, segmenter, mask_mpp=mpp), mpp, params)


@dataclass(frozen=True)
class PatchPlan:
    """Planned patches of one slide. Cheap: coordinates, no pixels."""

    x0: npt.NDArray[np.int64]
    y0: npt.NDArray[np.int64]
    tissue_fraction: npt.NDArray[np.float32]
    width0: int
    height0: int
    patch_size_px: int
    target_mpp: float
    level: int
    downsample: float
    slide_dimensions: tuple[int, int]
    slide_mpp: tuple[float, float]
    strategy: Strategy
    seed: int
    magnification: float | None
    n_candidates: int
    params: dict[str, Any]
    selection: dict[str, Any] = field(default_factory=dict)
    """How the patches were chosen (the medgemma bag: which rule filled it)."""
    excluded: npt.NDArray[np.bool_] | None = None
    """Per patch, whether artefact exclusion would have dropped it (kept, marked, because
    it removed more than ``max_excluded_share`` of the tissue); None: none kept so."""

    def __len__(self) -> int:
        return len(self.x0)

    @property
    def coords(self) -> npt.NDArray[np.int64]:
        """(N, 2) level-0 top-left corners, x then y."""
        return np.stack([self.x0, self.y0], axis=1)

    @property
    def levels(self) -> npt.NDArray[np.int64]:
        """The pyramid level each patch is read from."""
        return np.full(len(self), self.level, np.int64)

    @property
    def downsamples(self) -> npt.NDArray[np.float64]:
        return np.full(len(self), self.downsample, np.float64)

    def why_empty(self) -> str | None:
        """Why the plan holds no patch, in words; None when it holds some."""
        if len(self):
            return None
        exclusion = self.selection.get("exclusion")
        if exclusion is not None and exclusion["tissue_mm2_after"] == 0:
            return "strict_exclusion keeps none of the tissue, so the plan is empty"
        if self.strategy == "medgemma":
            return ("the tissue detector finds no tissue on this slide, so the MedGemma bag "
                    "is empty (check the tissue mask: GET .../tissue, or wsi-sampler tissue)")
        return (f"no grid cell reaches min_tissue_fraction="
                f"{self.params.get('min_tissue_fraction')}; lower it or check the tissue mask")

    def note(self) -> str | None:
        """What a reader must know about the plan, in words: that the pen/dark exclusion
        removed most of the tissue, why it is empty, or that it holds fewer patches than
        ``n_patches`` asked (random / stratified); else None."""
        notes = []
        exclusion = self.selection.get("exclusion")
        if exclusion is not None:
            notes.extend(_exclusion_notes(exclusion))
        empty = self.why_empty()
        asked = self.params.get("n_patches")
        if empty is not None:
            notes.append(empty)
        elif self.strategy in ("random", "stratified") and asked and len(self) < int(asked):
            notes.append(f"{len(self)} patches, fewer than the {int(asked)} asked: only "
                         f"{len(self)} grid cells reach min_tissue_fraction="
                         f"{self.params.get('min_tissue_fraction')} on this slide")
        return "; ".join(notes) or None

    def subset(self, indices: npt.NDArray[np.int64]) -> PatchPlan:
        """A plan holding only ``indices`` (in the given order)."""
        return replace(
            self, x0=self.x0[indices], y0=self.y0[indices],
            tissue_fraction=self.tissue_fraction[indices],
            excluded=self.excluded[indices] if self.excluded is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, one record per patch."""
        return {
            "strategy": self.strategy,
            "seed": self.seed,
            "magnification": self.magnification,
            "target_mpp": self.target_mpp,
            "patch_size_px": self.patch_size_px,
            "width0": self.width0,
            "height0": self.height0,
            "level": self.level,
            "downsample": self.downsample,
            "n_candidates": self.n_candidates,
            "n_patches": len(self),
            "selection": self.selection,
            "params": self.params,
            "patches": self.patch_records(),
        }

    def patch_records(self) -> list[dict[str, Any]]:
        """One record per patch: ``x0``, ``y0``, ``tissue_fraction`` and, when the plan
        keeps patches exclusion would have dropped, ``excluded``."""
        records: list[dict[str, Any]] = [
            {"x0": int(x), "y0": int(y), "tissue_fraction": round(float(f), 4)}
            for x, y, f in zip(self.x0, self.y0, self.tissue_fraction, strict=True)]
        if self.excluded is not None:
            for record, flag in zip(records, self.excluded, strict=True):
                record["excluded"] = bool(flag)
        return records


def _exclusion_notes(exclusion: dict[str, Any]) -> list[str]:
    """The plan's words on an exclusion that removed more than its share, or everything."""
    share, limit = exclusion["excluded_share"], exclusion["max_excluded_share"]
    if share <= limit and exclusion["tissue_mm2_after"] > 0 and not exclusion["kept_marked"]:
        return []
    what = f"{exclusion['detector']} exclusion of {', '.join(exclusion['classes'])}"
    notes = [f"{what} removed {share:.0%} of the tissue (max_excluded_share={limit:g})"]
    if exclusion["kept_marked"]:
        notes.append(f"the plan keeps the patches it would have dropped, marked excluded "
                     f"({exclusion['n_marked']} of them; strict_exclusion drops them)")
    elif exclusion["strict"] and exclusion["tissue_mm2_after"] > 0:
        notes.append("strict_exclusion: its patches are dropped")
    notes.append("check the slide's QC overlay" + (
        " (dark-stained tissue can read as a dark artefact; exclude_dark=false keeps it)"
        if "dark" in exclusion["classes"] else ""))
    return notes


def _box_fractions(
    mask: BoolMask, scale: tuple[float, float], xs: np.ndarray, ys: np.ndarray, w0: int, h0: int
) -> npt.NDArray[np.float32]:
    """Tissue fraction of each level-0 box, from summed-area tables of the mask."""
    sx, sy = scale
    mh, mw = mask.shape
    ax = np.clip(np.floor(xs / sx).astype(np.int64), 0, mw - 1)
    bx = np.clip(np.ceil((xs + w0) / sx).astype(np.int64), ax + 1, mw)
    ay = np.clip(np.floor(ys / sy).astype(np.int64), 0, mh - 1)
    by = np.clip(np.ceil((ys + h0) / sy).astype(np.int64), ay + 1, mh)
    total = _box_sums(mask, ax, bx, ay, by)
    return (total / ((bx - ax) * (by - ay))).astype(np.float32)


def _box_sums(mask: BoolMask, ax: np.ndarray, bx: np.ndarray, ay: np.ndarray, by: np.ndarray
              ) -> npt.NDArray[np.int64]:
    """Mask pixels in each box [ax, bx) x [ay, by).

    Boxes sharing rows (a grid's) are summed a band of rows at a time: the whole mask's
    table would take 4 bytes a pixel (125 MiB for a 50 x 40 mm slide at 8 µm/px).
    """
    bands, band_of = np.unique(np.stack([ay, by], axis=1), axis=0, return_inverse=True)
    band_of = band_of.ravel()
    if int((bands[:, 1] - bands[:, 0]).sum()) > 2 * mask.shape[0]:
        # Boxes at scattered rows: one table of the whole mask (int32 counts exactly up to
        # 2**31 px, float64 beyond).
        depth = cv2.CV_32S if mask.size < 2**31 else cv2.CV_64F
        table: npt.NDArray[Any] = cv2.integral(mask.view(np.uint8), sdepth=depth)

        def at(rows: np.ndarray, cols: np.ndarray) -> npt.NDArray[np.int64]:
            corner: npt.NDArray[np.int64] = table[rows, cols].astype(np.int64)
            return corner

        return at(by, bx) - at(ay, bx) - at(by, ax) + at(ay, ax)
    total = np.empty(len(ax), np.int64)
    order = np.argsort(band_of, kind="stable")
    starts = np.searchsorted(band_of[order], np.arange(len(bands) + 1))
    for band, (top, bottom) in enumerate(bands):
        members = order[starts[band] : starts[band + 1]]
        # The table's last row: the band's pixels left of each column.
        left_of = cv2.integral(mask[top:bottom].view(np.uint8))[-1].astype(np.int64)
        total[members] = left_of[bx[members]] - left_of[ax[members]]
    return total


@dataclass(frozen=True)
class _Grid:
    """Cell size and stride in level-0 px."""

    w0: int
    h0: int
    stride_x: int
    stride_y: int

    def corners(self, w: int, h: int, *, past_edge: bool = False
                ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Top-left corners, row-major; ``past_edge`` also keeps cells reaching past it."""
        stop_x, stop_y = (w, h) if past_edge else (w - self.w0 + 1, h - self.h0 + 1)
        gy, gx = np.meshgrid(np.arange(0, stop_y, self.stride_y, dtype=np.int64),
                             np.arange(0, stop_x, self.stride_x, dtype=np.int64), indexing="ij")
        return gx.ravel(), gy.ravel()


def _resolution(params: PlanParams, rng: np.random.Generator, mx: float
                ) -> tuple[float | None, float]:
    """(magnification, target µm/px); the medgemma preset draws its magnification here."""
    magnification = params.magnification
    if params.strategy == "medgemma":
        if magnification is None:
            magnification = draw_medgemma_magnification(rng)
        return magnification, magnification_to_mpp(magnification)
    resolved = resolve_target_mpp(target_mpp=params.target_mpp, magnification=magnification)
    return magnification, resolved if resolved is not None else mx


def _grid_for(slide: Slide, params: PlanParams, target_mpp: float) -> _Grid:
    mx, my = slide.require_mpp()
    w, h = slide.dimensions
    if target_mpp * MAX_UPSAMPLING < min(mx, my):
        raise InvalidRequestError(
            f"target resolution {target_mpp:g} µm/px is more than {MAX_UPSAMPLING:g}x finer "
            f"than the slide's scan ({min(mx, my):g} µm/px): read coarser (CLI: --mpp or "
            "--magnification; API: target_mpp)"
        )
    w0 = max(1, round(params.patch_size_px * target_mpp / mx))
    h0 = max(1, round(params.patch_size_px * target_mpp / my))
    grid = _Grid(w0, h0, max(1, round(w0 * (1 - params.overlap))),
                 max(1, round(h0 * (1 - params.overlap))))
    cells = (-(-w // grid.stride_x)) * (-(-h // grid.stride_y))
    if cells > MAX_GRID_CELLS:
        raise InvalidRequestError(
            f"the patch grid would have {cells:,} cells (limit {MAX_GRID_CELLS:,}); use larger "
            "patches, less overlap or a coarser target resolution"
        )
    return grid


def make_plan(
    slide: Slide,
    params: PlanParams,
    *,
    tissue: TissueMask | None = None,
    roi: BaseGeometry | None = None,
) -> PatchPlan:
    """Plan the patches of ``slide``.

    ``tissue`` replaces detection (e.g. a user mask); ``roi`` (level-0 polygons) restricts
    sampling to its inside. Same slide, params and seed give the same plan on any backend.
    """
    mx, my = slide.require_mpp()
    rng = np.random.default_rng(params.seed)
    magnification, target_mpp = _resolution(params, rng, mx)
    grid = _grid_for(slide, params, target_mpp)
    tm = tissue or compute_tissue_mask(slide, tissue_mpp=params.tissue_mpp, params=params.tissue)
    after, before = tm.mask, tm.exclusion.before if tm.exclusion is not None else None
    if roi is not None:
        inside = rasterize_geometry(roi, after.shape, tm.scale)
        after = after & inside
        before = before & inside if before is not None else None
    draw_state = copy.deepcopy(rng)
    xs, ys, frac, idx, selection = _choose(slide, params, grid, after, tm, rng)
    excluded = None
    if before is not None and _keeps_excluded(tm, params.tissue, bool(len(idx))):
        # the tissue before exclusion chooses (its fractions are the patches'), and the
        # tissue after it marks
        xs, ys, frac, idx, selection = _choose(slide, params, grid, before, tm, draw_state)
        excluded = _marked(after, tm, grid, xs[idx], ys[idx], frac[idx], params)
    if tm.exclusion is not None:
        selection["exclusion"] = _exclusion_summary(tm, params.tissue, excluded)
    level = slide.best_level_for_downsample(min(grid.w0, grid.h0) / params.patch_size_px)
    return PatchPlan(
        x0=xs[idx], y0=ys[idx], tissue_fraction=frac[idx], excluded=excluded,
        width0=grid.w0, height0=grid.h0, patch_size_px=params.patch_size_px,
        target_mpp=target_mpp, level=level, downsample=slide.level_downsamples[level],
        slide_dimensions=slide.dimensions, slide_mpp=(mx, my), strategy=params.strategy,
        seed=params.seed, magnification=magnification,
        n_candidates=int(selection["n_above_threshold"]), params=params.to_dict(),
        selection=selection,
    )


def _choose(
    slide: Slide, params: PlanParams, grid: _Grid, mask: BoolMask, tm: TissueMask,
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float32],
           npt.NDArray[np.int64], dict[str, Any]]:
    """Candidate cells, their tissue fractions on ``mask``, the chosen ones and the rule."""
    if params.strategy == "medgemma":
        return _medgemma_cells(slide, params, grid, mask, tm, rng)
    xs, ys = grid.corners(*slide.dimensions)
    frac = _fractions(mask, tm, xs, ys, grid)
    keep = (frac >= params.min_tissue_fraction) & (frac > 0)
    xs, ys, frac = xs[keep], ys[keep], frac[keep]
    selection = {"rule": "min_tissue_fraction", "n_above_threshold": len(xs), "n_filled": 0}
    return xs, ys, frac, _select(params, xs, ys, rng), selection


def _keeps_excluded(tm: TissueMask, p: TissueParams, after_has_patches: bool) -> bool:
    """Whether the plan keeps the patches exclusion drops, marked: it removed more than
    ``max_excluded_share`` of the tissue, or every patch, and strict mode is off."""
    if tm.exclusion is None or p.strict_exclusion:
        return False
    return tm.excluded_share > p.max_excluded_share or not after_has_patches


def _marked(after: BoolMask, tm: TissueMask, grid: _Grid, xs: npt.NDArray[np.int64],
            ys: npt.NDArray[np.int64], before: npt.NDArray[np.float32], params: PlanParams
            ) -> npt.NDArray[np.bool_]:
    """The patches exclusion would have dropped: it took at least half of their tissue, or
    took them under ``min_tissue_fraction``."""
    left = _fractions(after, tm, xs, ys, grid)
    threshold = params.min_tissue_fraction
    marked: npt.NDArray[np.bool_] = ((left < 0.5 * before)
                                     | ((left < threshold) & (before >= threshold)))
    return marked


def _exclusion_summary(tm: TissueMask, p: TissueParams,
                       excluded: npt.NDArray[np.bool_] | None) -> dict[str, Any]:
    assert tm.exclusion is not None
    return {**tm.exclusion.report(tm.mpp), "max_excluded_share": p.max_excluded_share,
            "strict": p.strict_exclusion, "kept_marked": excluded is not None,
            "n_marked": int(excluded.sum()) if excluded is not None else 0}


def _fractions(mask: BoolMask, tm: TissueMask, xs: npt.NDArray[np.int64],
               ys: npt.NDArray[np.int64], grid: _Grid) -> npt.NDArray[np.float32]:
    if not len(xs):
        return np.zeros(0, np.float32)
    return _box_fractions(mask, tm.scale, xs, ys, grid.w0, grid.h0)


def _medgemma_cells(
    slide: Slide, params: PlanParams, grid: _Grid, mask: BoolMask, tm: TissueMask,
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float32],
           npt.NDArray[np.int64], dict[str, Any]]:
    """The bag's cells (see :mod:`wsi_sampler.medgemma`): never empty while there is tissue;
    a slide smaller than one patch uses the cells reaching past its edge (read as white)."""
    cap = params.n_patches or MEDGEMMA_MAX_PATCHES
    for past_edge in (False, True):
        xs, ys = grid.corners(*slide.dimensions, past_edge=past_edge)
        frac = _fractions(mask, tm, xs, ys, grid)
        bag = select_bag(frac, min_tissue_fraction=params.min_tissue_fraction, cap=cap,
                         order=params.order, seed=params.seed, rng=rng, edge=past_edge)
        if len(bag.indices) or not mask.any():
            break
    return xs, ys, frac, bag.indices, bag.to_dict()


def _select(
    params: PlanParams, xs: np.ndarray, ys: np.ndarray, rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    n_total = len(xs)
    if params.strategy == "grid" or n_total == 0:
        idx = np.arange(n_total, dtype=np.int64)
        return idx if params.n_patches is None else idx[: params.n_patches]
    if params.strategy == "stratified":
        assert params.n_patches is not None  # enforced by PlanParams
        return sample_stratified(xs, ys, params.n_patches, rng)
    assert params.n_patches is not None  # random: enforced by PlanParams
    return sample_random(n_total, params.n_patches, rng)
