"""GeoJSON as QuPath imports it: the one writer of every GeoJSON file and answer.

Frame: coordinates are level-0 pixels, x right, y down, origin at the slide's top-left
corner (QuPath's image frame).

The rules, from QuPath's reader (qupath-core ``qupath.lib.io.GsonTools`` and
``PathObjectTypeAdapters``, v0.4 and later) and RFC 7946:

- a ``FeatureCollection`` of ``Feature`` objects with ``Polygon`` / ``MultiPolygon`` geometry;
- ``properties.objectType`` is one of QuPath's object types (``annotation``, ``detection``,
  ``tile``, ``cell``);
- a ``classification``, when present, has both ``name`` and ``color`` ``[r, g, b]``: QuPath's
  class adapter refuses one without a colour, and the error aborts the whole import;
- ``measurements`` map names to finite numbers (JSON has no NaN: a value that is not
  finite is left out, which QuPath reads as missing);
- a feature's ``id`` is kept by QuPath only if it is a UUID;
- exterior rings run counter-clockwise and holes clockwise (RFC 7946 §3.1.6: a positive
  signed area for the exterior in the coordinates as written).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry
from shapely.geometry.polygon import orient

__all__ = ["ObjectType", "box_geometry", "classification", "dumps", "feature",
           "feature_collection", "polygon_geometry"]

ObjectType = Literal["annotation", "detection", "tile", "cell"]
# Class colours in the order of a classifier's classes (then repeating).
_CLASS_COLOURS = ((200, 0, 0), (0, 150, 0), (0, 0, 200), (200, 150, 0), (150, 0, 150),
                  (0, 150, 150), (120, 120, 120), (255, 100, 0))
TISSUE_COLOUR = (80, 160, 80)


def classification(name: str, index: int | None = None,
                   colour: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """QuPath's ``{"name", "color"}``: ``colour`` given, or the ``index``-th class colour."""
    rgb = colour if colour is not None else _CLASS_COLOURS[(index or 0) % len(_CLASS_COLOURS)]
    return {"name": name, "color": [int(c) for c in rgb]}


def box_geometry(x0: int, y0: int, width0: int, height0: int) -> dict[str, Any]:
    """An axis-aligned box as a closed counter-clockwise Polygon ring."""
    x1, y1 = x0 + width0, y0 + height0
    return {"type": "Polygon",
            "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def polygon_geometry(geom: BaseGeometry) -> dict[str, Any]:
    """A shapely Polygon / MultiPolygon with RFC 7946 ring orientation."""
    if isinstance(geom, Polygon):
        oriented: BaseGeometry = orient(geom, sign=1.0)
    elif isinstance(geom, MultiPolygon):
        oriented = MultiPolygon([orient(p, sign=1.0) for p in geom.geoms])
    else:
        raise TypeError(f"expected a Polygon or MultiPolygon, got {geom.geom_type}")
    geometry: dict[str, Any] = json.loads(json.dumps(oriented.__geo_interface__))
    return geometry  # tuples -> lists: the same JSON whether serialised here or by a server


def _finite(measurements: Mapping[str, float]) -> dict[str, float]:
    return {str(k): float(v) for k, v in measurements.items() if math.isfinite(float(v))}


def feature(
    geometry: Mapping[str, Any], *, object_type: ObjectType, feature_id: str | None = None,
    name: str | None = None, cls: Mapping[str, Any] | None = None,
    measurements: Mapping[str, float] | None = None, locked: bool = False,
) -> dict[str, Any]:
    """One Feature with QuPath's properties (``cls``: from :func:`classification`)."""
    properties: dict[str, Any] = {"objectType": object_type}
    if name is not None:
        properties["name"] = name
    if cls is not None:
        if "name" not in cls or "color" not in cls:
            raise ValueError("a QuPath classification needs both 'name' and 'color'")
        properties["classification"] = dict(cls)
    if locked:
        properties["isLocked"] = True
    if measurements is not None:
        properties["measurements"] = _finite(measurements)
    out: dict[str, Any] = {"type": "Feature"}
    if feature_id is not None:
        out["id"] = feature_id
    out["geometry"] = dict(geometry)
    out["properties"] = properties
    return out


def feature_collection(features: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": list(features)}


def dumps(collection: Mapping[str, Any] | Sequence[Any]) -> str:
    """Strict JSON (no NaN / Infinity, which QuPath's and every strict parser refuse)."""
    return json.dumps(collection, allow_nan=False)
