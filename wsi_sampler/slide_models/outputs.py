"""The files of one slide-level answer, written side by side with a common prefix:

- ``<prefix>.slide.json``: the answer (``slide_model``, ``class_names``, ``probabilities``,
  ``predicted_class``, ``logits``, ``n_patches``), the slide model's card and its patch
  encoder, the input, and run metadata (versions, timings);
- ``<prefix>.attention.h5``: ``coords`` (N, 2) level-0 as in the bag, ``attention`` (N, K)
  float32 raw scores before the softmax (CLAM's ``A_raw`` transposed), rows in the input
  bag's order, and the normalised forms ``attention_softmax`` (the pooling weights) and
  ``attention_percentile`` (CLAM's heatmap scores, in (0, 1]);
- ``<prefix>.heatmap.png``: the CLAM-style heatmap of the display column over the thumbnail;
- ``<prefix>.attention.geojson``: one QuPath tile per patch with its attention as
  measurements;
- ``<prefix>.patches.tar``: the top-k and bottom-k attended patches as PNGs (what the model
  saw) with ``index.csv`` (rank, row, x, y, raw attention, percentile).

Models without patch scores (TransMIL, mean pooling) write the answer only, and say so.
"""

from __future__ import annotations

import csv
import io
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt

from .._io import atomic_path, atomic_write_bytes
from ..encoding import encode_png
from ..export import write_metadata_json
from ..geojson import box_geometry, dumps, feature, feature_collection
from ..types import RGBImage
from .heatmap import draw_attention_heatmap, percentiles, softmax_columns
from .model import SlideModel, SlidePrediction

__all__ = ["AttentionGeometry", "HeatmapOptions", "write_slide_outputs"]


@dataclass(frozen=True)
class AttentionGeometry:
    """Where the bag's patches lie: level-0 corners, their level-0 side, the slide's size."""

    coords: npt.NDArray[np.int64]
    patch_size_level0: int
    level0_size: tuple[int, int]


@dataclass(frozen=True)
class HeatmapOptions:
    """How the heatmap is drawn and how many patches are kept (CLAM's defaults)."""

    colormap: str = "jet"
    alpha: float = 0.4
    blur: bool = False
    overlap: float = 0.0
    top_k: int = 15
    max_size: int = 2048


PatchReader = Callable[[list[int]], list[RGBImage]]
"""Reads the patches of the given bag rows, as the encoder saw them."""


def _write_attention_h5(path: Path, pred: SlidePrediction, coords: npt.NDArray[np.int64] | None
                        ) -> None:
    assert pred.attention is not None
    raw = pred.attention.astype(np.float32)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        if coords is not None:
            f.create_dataset("coords", data=coords.astype(np.int64))
        f.create_dataset("attention", data=raw)
        f.create_dataset("attention_softmax", data=softmax_columns(raw))
        f.create_dataset("attention_percentile",
                         data=np.stack([percentiles(raw[:, k]) for k in range(raw.shape[1])],
                                       axis=1))
        f.attrs["slide_model"] = pred.model
        f.attrs["columns"] = list(pred.attention_columns)
        f.attrs["display_column"] = pred.attention_columns[pred.display_column]
        f.attrs["class_names"] = list(pred.class_names)
        f.attrs["predicted_class"] = pred.predicted_class or ""  # "" for a slide encoder


def _write_geojson(path: Path, pred: SlidePrediction, geo: AttentionGeometry) -> None:
    assert pred.attention is not None
    pct = percentiles(pred.attention[:, pred.display_column])
    feats = []
    for i, (x, y) in enumerate(geo.coords.tolist()):
        measures = {name: float(pred.attention[i, k])
                    for k, name in enumerate(pred.attention_columns)}
        measures["attention_percentile"] = float(pct[i])
        feats.append(feature(box_geometry(x, y, geo.patch_size_level0, geo.patch_size_level0),
                             object_type="tile", name=f"patch {i}", measurements=measures))
    atomic_write_bytes(path, dumps(feature_collection(feats)).encode())


def _ranked(pred: SlidePrediction, k: int) -> list[tuple[str, int, int]]:
    """(kind, rank, row) of the top-k and bottom-k rows of the display column."""
    assert pred.attention is not None
    scores = pred.attention[:, pred.display_column]
    order = np.argsort(-scores, kind="stable")
    k = min(k, len(order))
    top = [("top", r + 1, int(i)) for r, i in enumerate(order[:k])]
    bottom = [("bottom", r + 1, int(i)) for r, i in enumerate(order[::-1][:k])]
    return top + bottom


def _write_patch_tar(path: Path, pred: SlidePrediction, geo: AttentionGeometry,
                     read: PatchReader, k: int) -> None:
    assert pred.attention is not None
    ranked = _ranked(pred, k)
    images = read([row for _, _, row in ranked])
    pct = percentiles(pred.attention[:, pred.display_column])
    index = io.StringIO()
    writer = csv.writer(index)
    writer.writerow(["file", "kind", "rank", "row", "x", "y", "attention", "percentile"])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for (kind, rank, row), img in zip(ranked, images, strict=True):
            x, y = (int(v) for v in geo.coords[row])
            name = f"{kind}_{rank:03d}_x{x}_y{y}.png"
            writer.writerow([name, kind, rank, row, x, y,
                             f"{float(pred.attention[row, pred.display_column]):.6g}",
                             f"{float(pct[row]):.6g}"])
            _add(tar, name, encode_png(img))
        _add(tar, "index.csv", index.getvalue().encode())
    atomic_write_bytes(path, buf.getvalue())


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _canvas(thumbnail: RGBImage | None, geo: AttentionGeometry, max_size: int) -> RGBImage:
    if thumbnail is not None:
        return thumbnail
    w0, h0 = geo.level0_size
    scale = max_size / max(w0, h0)
    return np.full((max(1, round(h0 * scale)), max(1, round(w0 * scale)), 3), 255, np.uint8)


def write_slide_outputs(
    prefix: Path, pred: SlidePrediction, model: SlideModel, *, record: dict[str, Any],
    geometry: AttentionGeometry | None = None, thumbnail: RGBImage | None = None,
    read_patches: PatchReader | None = None, options: HeatmapOptions = HeatmapOptions(),
) -> dict[str, Any]:
    """Write the files of one answer (see the module docstring); return the answer record
    (also ``<prefix>.slide.json``, written last: the answer is complete iff it exists)."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    notes: list[str] = []
    stem = prefix.name
    if pred.attention is not None:
        _write_attention_h5(Path(f"{prefix}.attention.h5"), pred,
                            geometry.coords if geometry else None)
        files["attention"] = f"{stem}.attention.h5"
        if geometry is None:
            notes.append("the bag has no coordinates (a CLAM .pt file): no heatmap, GeoJSON "
                         "or patches; give its .h5 for those")
        else:
            scores = percentiles(pred.attention[:, pred.display_column])
            png = draw_attention_heatmap(
                _canvas(thumbnail, geometry, options.max_size), geometry.level0_size,
                geometry.coords, geometry.patch_size_level0, scores, alpha=options.alpha,
                blur=options.blur, overlap=options.overlap, colormap=options.colormap,
                label=f"{pred.attention_columns[pred.display_column]} percentile")
            atomic_write_bytes(Path(f"{prefix}.heatmap.png"), encode_png(png))
            _write_geojson(Path(f"{prefix}.attention.geojson"), pred, geometry)
            files |= {"heatmap": f"{stem}.heatmap.png",
                      "geojson": f"{stem}.attention.geojson"}
            if read_patches is not None and options.top_k > 0:
                _write_patch_tar(Path(f"{prefix}.patches.tar"), pred, geometry, read_patches,
                                 options.top_k)
                files["patches"] = f"{stem}.patches.tar"
            elif read_patches is None:
                notes.append("from a feature bag without its slide: no patch images")
    else:
        notes.append(f"{model.card.architecture} has no per-patch scores: no attention files")
    answer = pred.to_dict() | {"files": files, "notes": notes} | record | {
        "card": model.card.model_dump(mode="json"),
        "patch_encoder": model.encoder_card.name}
    write_metadata_json(Path(f"{prefix}.slide.json"), answer)
    return answer
