"""Shared type aliases. Coordinates are level-0 pixels everywhere in this package."""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = ["Backend", "BackendChoice", "BoolMask", "RGBImage", "Strategy", "TissueMethod"]

Backend = Literal["openslide", "tiffslide", "wsidicom"]
BackendChoice = Literal["auto", "openslide", "tiffslide"]
Strategy = Literal["grid", "random", "stratified", "medgemma"]
TissueMethod = Literal["auto", "brightfield", "fluorescence", "hest", "hest-fast", "grandqc"]

RGBImage = npt.NDArray[np.uint8]
"""An (H, W, 3) uint8 RGB image, or (N, H, W, 3) for a batch."""

BoolMask = npt.NDArray[np.bool_]
"""An (H, W) boolean mask."""
