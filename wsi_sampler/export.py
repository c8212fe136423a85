"""Exports in formats labs already use. Every file is written atomically.

Frame: coordinates written are level-0 pixels (``minx``/``miny`` = top-left corner).
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np
import numpy.typing as npt

from ._io import atomic_path, atomic_write_bytes, atomic_write_text
from .encoding import encode_image
from .errors import InvalidRequestError
from .geojson import (
    TISSUE_COLOUR,
    box_geometry,
    classification,
    dumps,
    feature,
    feature_collection,
    polygon_geometry,
)
from .plan import PatchPlan
from .slide import Slide
from .tissue import mask_to_polygons
from .types import BoolMask, RGBImage

__all__ = [
    "encode_image",
    "run_metadata",
    "write_clam_h5",
    "write_csv",
    "tissue_collection",
    "write_geojson",
    "write_mask_png",
    "write_metadata_json",
    "write_overlay_png",
    "write_tissue_geojson",
    "write_wsinfer_h5",
]

Outputs = Mapping[str, npt.ArrayLike]
_VERSIONED = ("wsi-sampler", "numpy", "openslide-python", "openslide-bin", "tiffslide",
              "tifffile", "imagecodecs", "opencv-python-headless", "torch")


def _columns(plan: PatchPlan, outputs: Outputs | None) -> dict[str, np.ndarray]:
    cols = {name: np.asarray(values) for name, values in (outputs or {}).items()}
    for name, col in cols.items():
        if col.shape != (len(plan),):
            raise InvalidRequestError(
                f"output {name!r} has shape {col.shape}, expected ({len(plan)},)"
            )
    return cols


def plan_fraction_column(columns: Iterable[str]) -> str:
    """Name of the plan's (tissue-mask) fraction: ``tissue_fraction``, or
    ``mask_tissue_fraction`` when a model output already has that name (tissue-qc measures
    the fraction on the patch's own pixels), so neither value hides the other."""
    return "mask_tissue_fraction" if "tissue_fraction" in set(columns) else "tissue_fraction"


def write_csv(
    path: str | os.PathLike[str], plan: PatchPlan, outputs: Outputs | None = None
) -> None:
    """CSV with ``minx,miny,width,height,tissue_fraction`` (then ``excluded``, 1 for a
    patch exclusion would have dropped, when the plan keeps such patches), then one column
    per output."""
    cols = _columns(plan, outputs)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    marks = plan.excluded
    writer.writerow(["minx", "miny", "width", "height", plan_fraction_column(cols),
                     *(["excluded"] if marks is not None else []), *cols])
    for i in range(len(plan)):
        writer.writerow([
            int(plan.x0[i]), int(plan.y0[i]), plan.width0, plan.height0,
            f"{float(plan.tissue_fraction[i]):.4f}",
            *([int(marks[i])] if marks is not None else []),
            *(_cell(c[i]) for c in cols.values()),
        ])
    atomic_write_text(path, buf.getvalue())


def _cell(value: Any) -> str | int | float:
    item = value.item() if hasattr(value, "item") else value
    return item if isinstance(item, (str, int, float)) else str(item)


# QuPath keeps a feature's "id" only if it is a UUID; ours derive from the slide and the
# tile's box, so the same tile gets the same id in every run (links between runs survive).
_TILE_NAMESPACE = uuid.UUID("5d0c3f0e-6a0b-4f5e-9d27-7f4a5b1c2e10")


def tile_uuid(slide_key: str, x0: int, y0: int, width0: int, height0: int) -> str:
    """A stable UUID for a tile of a slide (``slide_key``: e.g. its fingerprint)."""
    return str(uuid.uuid5(_TILE_NAMESPACE, f"{slide_key}:{x0}:{y0}:{width0}:{height0}"))


def write_geojson(
    path: str | os.PathLike[str], plan: PatchPlan, measurements: Outputs | None = None, *,
    slide_key: str = "", classes: Sequence[tuple[str, str]] = (),
) -> None:
    """QuPath-compatible FeatureCollection of tile Polygons (drag-and-drop into QuPath).

    Ids are UUIDs stable across runs (:func:`tile_uuid`); ``classes`` ((column, class name),
    a classifier's probability columns) gives each tile its top class as QuPath's
    ``classification``, which QuPath colours and counts by.
    """
    cols = _columns(plan, measurements)
    fraction = plan_fraction_column(cols)
    features = []
    for i in range(len(plan)):
        x, y, w, h = int(plan.x0[i]), int(plan.y0[i]), plan.width0, plan.height0
        meas = {fraction: round(float(plan.tissue_fraction[i]), 4)}
        if plan.excluded is not None:
            meas["excluded"] = float(plan.excluded[i])
        meas.update({k: float(v[i]) for k, v in cols.items()})
        cls = None
        if classes:
            best = int(np.argmax([cols[c][i] for c, _ in classes]))
            cls = classification(classes[best][1], best)
        features.append(feature(box_geometry(x, y, w, h), object_type="tile",
                                feature_id=tile_uuid(slide_key, x, y, w, h), cls=cls,
                                measurements=meas, locked=True))
    atomic_write_text(path, dumps(feature_collection(features)))


def write_clam_h5(path: str | os.PathLike[str], plan: PatchPlan, slide: Slide) -> None:
    """Patch coordinates for CLAM and TRIDENT: ``coords`` (N, 2) level-0 top-left with both
    tools' attributes (:func:`wsi_sampler.features.coords_attrs`)."""
    from .features import write_coords_dataset  # features imports models: load it late

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        write_coords_dataset(f, plan, slide)


def clam_h5_bytes(plan: PatchPlan, slide: Slide) -> bytes:
    """The file :func:`write_clam_h5` writes, as bytes (an HTTP download)."""
    from .features import write_coords_dataset

    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        write_coords_dataset(f, plan, slide)
    return buf.getvalue()


def write_wsinfer_h5(path: str | os.PathLike[str], plan: PatchPlan) -> None:
    """WSInfer's patch file, as its own writer (``wsinfer.patchlib.save_hdf5``) makes it:
    ``/coords`` (N, 2) level-0 top-left corners with attributes ``patch_size`` (the patch's
    side in level-0 pixels), ``patch_level`` 0 and ``patch_spacing_um_px`` (the µm/px the
    model reads at). WSInfer reads ``patch_size`` level-0 pixels and resizes them itself;
    its patches are square, sized from the mean of the x and y MPP, as here."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        dset = f.create_dataset("/coords", data=plan.coords.astype(np.int64),
                                compression="gzip")
        dset.attrs["patch_size"] = round((plan.width0 + plan.height0) / 2)
        dset.attrs["patch_level"] = 0
        dset.attrs["patch_spacing_um_px"] = plan.target_mpp


def tissue_feature(mask: BoolMask, scale: tuple[float, float],
                   measurements: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The tissue outline as a QuPath annotation classified ``Tissue`` (MultiPolygon,
    level-0 px)."""
    return feature(polygon_geometry(mask_to_polygons(mask, scale)), object_type="annotation",
                   name="tissue", cls=classification("Tissue", colour=TISSUE_COLOUR),
                   measurements=measurements)


def tissue_collection(mask: BoolMask, scale: tuple[float, float]) -> dict[str, Any]:
    """The tissue outline alone (:func:`tissue_feature`): what the CLI writes and the API
    answers."""
    return feature_collection([tissue_feature(mask, scale)])


def write_tissue_geojson(
    path: str | os.PathLike[str], mask: BoolMask, scale: tuple[float, float]
) -> None:
    """Tissue outline as one QuPath annotation (:func:`tissue_collection`)."""
    atomic_write_text(path, dumps(tissue_collection(mask, scale)))


def write_mask_png(path: str | os.PathLike[str], mask: BoolMask) -> None:
    """Tissue mask as an 8-bit PNG: 255 tissue, 0 background."""
    atomic_write_bytes(path, encode_image(mask.astype(np.uint8) * 255))


def write_overlay_png(
    path: str | os.PathLike[str], thumbnail: RGBImage, plan: PatchPlan,
    mask: BoolMask | None = None,
) -> None:
    """Thumbnail with the tissue outline (blue) and the chosen patches (green boxes)."""
    img = np.ascontiguousarray(thumbnail.copy())
    th, tw = img.shape[:2]
    sx, sy = plan.slide_dimensions[0] / tw, plan.slide_dimensions[1] / th
    if mask is not None:
        m = cv2.resize(mask.astype(np.uint8), (tw, th), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(img, contours, -1, (30, 90, 220), 1)
    for x, y in plan.coords:
        p0 = (int(x / sx), int(y / sy))
        p1 = (int((x + plan.width0) / sx), int((y + plan.height0) / sy))
        cv2.rectangle(img, p0, p1, (0, 170, 0), 1)
    atomic_write_bytes(path, encode_image(img))


def write_heatmap_png(
    path: str | os.PathLike[str], thumbnail: RGBImage, plan: PatchPlan,
    values: npt.ArrayLike, *, vmin: float = 0.0, vmax: float = 1.0, label: str = "",
) -> None:
    """Thumbnail with each patch filled by ``values`` (clipped to vmin..vmax, viridis),
    and a legend below it: ``label`` (what the colours are), the colour bar and its range."""
    img = np.ascontiguousarray(thumbnail.copy())
    th, tw = img.shape[:2]
    v = np.asarray(values, np.float64)
    if v.shape != (len(plan),):
        raise InvalidRequestError(f"heatmap values have shape {v.shape}, expected ({len(plan)},)")
    blended = img
    if len(plan):  # nothing to paint (a slide without tissue): the thumbnail as it is
        span = vmax - vmin if vmax > vmin else 1.0
        levels = np.clip((v - vmin) / span * 255, 0, 255).astype(np.uint8)
        layer = img.copy()
        sx, sy = plan.slide_dimensions[0] / tw, plan.slide_dimensions[1] / th
        for (x, y), colour in zip(plan.coords, viridis_rgb(levels), strict=True):
            p0 = (int(x / sx), int(y / sy))
            p1 = (max(p0[0], int((x + plan.width0) / sx) - 1),
                  max(p0[1], int((y + plan.height0) / sy) - 1))
            cv2.rectangle(layer, p0, p1, tuple(int(c) for c in colour), -1)
        blended = cv2.addWeighted(layer, 0.65, img, 0.35, 0)
    legend = heatmap_legend(tw, label or "value", vmin, vmax)
    atomic_write_bytes(path, encode_image(np.vstack([blended, legend])))


def viridis_rgb(levels: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """RGB viridis colours of 0..255 levels."""
    rgb: npt.NDArray[np.uint8] = cv2.applyColorMap(levels.reshape(-1, 1),
                                                   cv2.COLORMAP_VIRIDIS)[:, 0, ::-1]
    return rgb


LEGEND_PX = 44


def heatmap_legend(
    width: int, label: str, vmin: float, vmax: float, *,
    colours: Callable[[npt.NDArray[np.uint8]], npt.NDArray[np.uint8]] | None = None,
    colormap: str = "viridis",
) -> RGBImage:
    """A white strip ``LEGEND_PX`` high: ``label`` and its range above a colour bar
    (``colours``: RGB of 0..255 levels, default viridis; ``colormap``: its name)."""
    strip: RGBImage = np.full((LEGEND_PX, width, 3), 255, np.uint8)
    margin = min(10, width // 8)
    bar_w = max(1, width - 2 * margin)
    strip[26:38, margin:margin + bar_w] = (colours or viridis_rgb)(
        np.linspace(0, 255, bar_w).astype(np.uint8))[None, :, :]
    text = f"{label} ({colormap}): {vmin:.3g} .. {vmax:.3g}"
    cv2.putText(strip, text, (margin, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (20, 20, 20), 1,
                cv2.LINE_AA)
    return strip


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def run_metadata(
    *, slide: Slide | None = None, plan: PatchPlan | None = None,
    config: Mapping[str, Any] | None = None, timings_s: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Everything needed to reproduce and audit a result."""
    meta: dict[str, Any] = {
        "created_unix": time.time(),
        "python": sys.version.split()[0],
        # the system and the processor, not the host's kernel build
        "platform": f"{platform.system()}-{platform.machine()}",
        "versions": _versions(),
        "config": dict(config or {}),
        "timings_s": dict(timings_s or {}),
    }
    if slide is not None:
        meta["slide"] = slide.info()
    if plan is not None:
        meta["plan"] = {k: v for k, v in plan.to_dict().items() if k != "patches"}
        meta["seed"] = plan.seed
    return meta


def write_metadata_json(path: str | os.PathLike[str], meta: Mapping[str, Any]) -> None:
    atomic_write_text(Path(path), json.dumps(meta, indent=2, default=str) + "\n")
