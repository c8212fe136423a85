"""Attention heatmaps as CLAM's ``create_heatmaps`` draws them, and the normalised forms of
attention a viewer shows.

What CLAM does (``wsi_core/WholeSlideImage.visHeatmap`` and ``block_blending``; described,
not copied): scores become percentiles (``rankdata(scores, "average") / N``); each patch's
box on the canvas (coordinates and size scaled to the canvas, rounded up) accumulates its
score and a counter, overlapping boxes are averaged; optionally the score image is
Gaussian-blurred (kernel ``2 · patch · (1 - overlap) + 1``); the colour map turns scores
into colours (``(cmap(score) · 255)[:3]`` truncated to uint8; CLAM's template uses
``jet``), and inside the patches the canvas becomes ``alpha · colour + (1 - alpha) ·
slide`` (alpha 0.4); outside them the slide stays as it is. Ours draws on the slide's
thumbnail (or a white canvas when only the bag is known) and adds a legend strip.

``jet`` is matplotlib's: the piecewise-linear segments of its ``_jet_data``, sampled at 256
levels (``LinearSegmentedColormap(N=256)``), indexed by ``int(score · 256)``.
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

from ..export import heatmap_legend, viridis_rgb
from ..types import RGBImage

__all__ = ["COLORMAPS", "colormap_rgb", "draw_attention_heatmap", "percentiles",
           "softmax_columns"]

# matplotlib's _jet_data: (x, value) breakpoints per channel
_JET = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}
COLORMAPS = ("jet", "viridis")


def _jet_lut() -> npt.NDArray[np.float64]:
    x = np.linspace(0.0, 1.0, 256)
    return np.stack([np.interp(x, [p[0] for p in _JET[c]], [p[1] for p in _JET[c]])
                     for c in ("red", "green", "blue")], axis=1)


_JET_LUT = _jet_lut()


def colormap_rgb(levels: npt.NDArray[np.uint8], name: str = "jet") -> npt.NDArray[np.uint8]:
    """RGB colours of 0..255 levels."""
    if name == "viridis":
        return viridis_rgb(levels.ravel()).reshape(*levels.shape, 3)
    return (_JET_LUT[levels] * 255).astype(np.uint8)


def _levels(scores: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
    """matplotlib's lookup: ``int(score · 256)`` clipped to 0..255."""
    return np.clip((scores * 256).astype(np.int64), 0, 255).astype(np.uint8)


def percentiles(scores: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """CLAM's ``to_percentiles`` / 100: average ranks over N, in (0, 1]."""
    v = np.asarray(scores, np.float64)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v), np.float64)
    ranks[order] = np.arange(1, len(v) + 1)
    # ties share the mean of their ranks (scipy's rankdata "average")
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    out: npt.NDArray[np.float32] = (sums[inverse] / counts[inverse] / max(len(v), 1)
                                    ).astype(np.float32)
    return out


def softmax_columns(scores: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Softmax over the patches (rows), per column: the pooling weights."""
    s = scores.astype(np.float64)
    e = np.exp(s - s.max(axis=0, keepdims=True))
    out: npt.NDArray[np.float32] = (e / e.sum(axis=0, keepdims=True)).astype(np.float32)
    return out


def _accumulate(canvas_hw: tuple[int, int], coords: npt.NDArray[np.int64], size0: int,
                scale: float, scores: npt.NDArray[np.float64]
                ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    h, w = canvas_hw
    overlay = np.zeros((h, w), np.float64)
    counter = np.zeros((h, w), np.uint16)
    side = int(np.ceil(size0 * scale))
    corners = np.ceil(coords * scale).astype(np.int64)
    for (x, y), score in zip(corners, scores, strict=True):
        overlay[y:y + side, x:x + side] += score
        counter[y:y + side, x:x + side] += 1
    covered = counter > 0
    overlay[covered] /= counter[covered]
    return overlay, covered


def draw_attention_heatmap(
    canvas: RGBImage, level0_size: tuple[int, int], coords: npt.NDArray[np.int64],
    patch_size_level0: int, scores: npt.ArrayLike, *, alpha: float = 0.4,
    blur: bool = False, overlap: float = 0.0, colormap: str = "jet",
    label: str = "attention percentile",
) -> RGBImage:
    """The canvas (the slide's thumbnail, covering ``level0_size``) with each patch coloured
    by its score in 0..1 (percentiles: :func:`percentiles`), blended with ``alpha``, and a
    legend strip below."""
    img = np.ascontiguousarray(canvas.copy())
    scale = img.shape[1] / level0_size[0]
    v = np.clip(np.asarray(scores, np.float64), 0.0, 1.0)
    overlay, covered = _accumulate(img.shape[:2], coords, patch_size_level0, scale, v)
    if blur:
        k = int(np.ceil(patch_size_level0 * scale) * (1 - overlap)) * 2 + 1
        overlay = cv2.GaussianBlur(overlay, (k, k), 0)
    colours = colormap_rgb(_levels(overlay[covered]), colormap)
    img[covered] = np.rint(alpha * colours + (1 - alpha) * img[covered]).astype(np.uint8)
    legend = heatmap_legend(img.shape[1], label, 0.0, 1.0,
                            colours=lambda lv: colormap_rgb(lv, colormap), colormap=colormap)
    out: RGBImage = np.vstack([img, legend])
    return out
