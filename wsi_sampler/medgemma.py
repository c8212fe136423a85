"""The MedGemma 1.5 whole-slide bag: which grid cells go to the model, and in which order.

Pure functions over the candidate grid of a plan (tissue fraction per cell, cells in
row-major order). Sources, as summarised in ``shared/docs/DESIGN.md`` ("MedGemma 1.5
whole-slide recipe"): the MedGemma 1.5 technical report §2.3.2 (one magnification per
slide drawn 5x/10x/20x with p = .34/.33/.33, non-overlapping 896 px patches on a grid over
tissue, at most 126 of them sampled without replacement, spatial order kept) and Google's
public notebook (10x fixed, at most 125, in the order Python's ``random.sample`` returns).

The bag is never empty when the slide has tissue: if fewer cells than the cap reach
``min_tissue_fraction`` (small biopsies at 5x have no cell that is half tissue), the bag is
filled from the other cells with any tissue, most tissue first, and the selection says so.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .sampling import sample_random

__all__ = [
    "BagOrder",
    "BagSelection",
    "MEDGEMMA_MAX_PATCHES",
    "MEDGEMMA_DETECT_MPP",
    "MEDGEMMA_PATCH_PX",
    "MEDGEMMA_TISSUE_MPP",
    "MedgemmaVariant",
    "NOTEBOOK_MAGNIFICATION",
    "NOTEBOOK_MAX_PATCHES",
    "select_bag",
]

MEDGEMMA_PATCH_PX = 896
MEDGEMMA_MAX_PATCHES = 126  # technical report; the notebook uses 125
MEDGEMMA_TISSUE_MPP = 2.0  # the recipe's 5x tissue mask, literally (tissue_mpp=2.0)
MEDGEMMA_DETECT_MPP = 8.0
"""Where the preset detects tissue by default: 16x fewer pixels than the 5x mask. The bag's
cells are 896 px at 5x/10x/20x (1,792 / 896 / 448 µm), 224 / 112 / 56 mask pixels a side at
8 µm/px, plenty for a tissue fraction. Measured against the literal 5x mask on six slides at
5x, 10x and 20x (``benchmarks/RESULTS.md``): the same cells at or above the threshold and
the same default bags everywhere; the cells with any tissue at all (which only fill a bag)
differ by 2 of 457 at 20x on a 100,000 x 80,000 slide, where tissue + plan fall from 14.3 s
and 1.7 GiB to 0.54 s and 213 MiB. ``tissue_mpp=2.0`` reproduces the recipe's mask
exactly."""
NOTEBOOK_MAX_PATCHES = 125
NOTEBOOK_MAGNIFICATION = 10.0

MedgemmaVariant = Literal["report", "notebook"]
"""``report``: the technical report's recipe; ``notebook``: Google's public notebook."""
BagOrder = Literal["row-major", "sampled"]
"""``row-major``: spatial order (the report); ``sampled``: ``random.sample`` order."""

Rule = Literal["min_tissue_fraction", "filled_by_tissue_rank", "edge_cells", "no_tissue"]
Indices = npt.NDArray[np.int64]


@dataclass(frozen=True)
class BagSelection:
    """Which candidate cells form the bag (``indices``, in bag order) and why."""

    indices: Indices
    rule: Rule
    """``min_tissue_fraction``: every cell reached it; ``filled_by_tissue_rank``: cells below
    it were added, most tissue first; ``edge_cells``: the slide is smaller than a patch, so
    cells reaching past its edge (read as white) were used; ``no_tissue``: empty bag."""
    n_above_threshold: int
    n_filled: int

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "n_above_threshold": self.n_above_threshold,
                "n_filled": self.n_filled}


def _sampled_order(indices: Indices, k: int, seed: int) -> Indices:
    # The notebook's order: Python's random.sample over the candidates (Mersenne Twister).
    picked = random.Random(seed).sample(indices.tolist(), k)
    return np.asarray(picked, np.int64)


def select_bag(
    tissue_fraction: npt.NDArray[np.floating], *, min_tissue_fraction: float, cap: int,
    order: BagOrder, seed: int, rng: np.random.Generator, edge: bool = False,
) -> BagSelection:
    """Choose at most ``cap`` cells: a random sample of those reaching the threshold, or all
    of them topped up from the cells with less tissue, most tissue first.

    ``rng`` draws the row-major sample (it continues the plan's generator, so a seed gives
    the same bag on every backend); ``seed`` seeds the notebook's ``random.sample`` order.
    ``edge`` marks a grid whose cells reach past the slide (the rule says so).
    """
    has_tissue = tissue_fraction > 0
    above = np.flatnonzero(has_tissue & (tissue_fraction >= min_tissue_fraction))
    if len(above) >= cap:
        if order == "sampled":
            return BagSelection(_sampled_order(above, cap, seed), "min_tissue_fraction",
                                len(above), 0)
        chosen = above[sample_random(len(above), cap, rng)]
        return BagSelection(chosen, "min_tissue_fraction", len(above), 0)
    rest = np.flatnonzero(has_tissue & (tissue_fraction < min_tissue_fraction))
    fill = rest[np.argsort(-tissue_fraction[rest], kind="stable")][: cap - len(above)]
    chosen = np.sort(np.concatenate([above, fill])).astype(np.int64)
    if order == "sampled":
        chosen = _sampled_order(chosen, len(chosen), seed)
    rule: Rule = "edge_cells" if edge and len(chosen) else \
        "filled_by_tissue_rank" if len(fill) else \
        "min_tissue_fraction" if len(chosen) else "no_tissue"
    return BagSelection(chosen, rule, len(above), len(fill))
