"""Stain augmentation for exported training patches: HED colour jitter (Tellez et al.,
"Whole-slide mitosis detection in H&E breast histology using PHH3 as a reference to train
distilled stain-invariant convolutional networks", IEEE TMI 2018).

Each patch is deconvolved into haematoxylin, eosin and DAB concentrations with Ruifrok and
Johnston's stain matrix (Analytical and Quantitative Cytology and Histology 2001: OD
vectors H (0.65, 0.70, 0.29), E (0.07, 0.99, 0.11), DAB (0.27, 0.57, 0.78), unit length);
each stain's concentration c becomes c * alpha + beta with alpha uniform in
[1 - sigma, 1 + sigma] and beta uniform in [-bias, bias], drawn once per patch; the patch
is rebuilt. Tellez's "HED-light" is sigma = bias = 0.05, "HED-strong" 0.2. Draws are
seeded by (seed, patch index): the same export gives the same patches. Frame: (N, H, W, 3)
uint8 RGB in and out; optical density OD = -ln((I + 1) / 256).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from .errors import InvalidRequestError

__all__ = ["RUIFROK_HED", "StainAugmenter", "hed_concentrations"]

_RAW = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RUIFROK_HED: npt.NDArray[np.float64] = _RAW / np.linalg.norm(_RAW, axis=1, keepdims=True)
"""Rows: the haematoxylin, eosin and DAB optical-density vectors (RGB)."""
_UNMIX = np.linalg.inv(RUIFROK_HED)
MAX_SIGMA = 1.0


def hed_concentrations(patch: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
    """(pixels, 3) haematoxylin, eosin and DAB concentrations of an (H, W, 3) patch."""
    od = -np.log((patch.reshape(-1, 3).astype(np.float64) + 1) / 256)
    concentrations: npt.NDArray[np.float64] = od @ _UNMIX
    return concentrations


class StainAugmenter:
    """HED jitter of strength ``sigma`` (scale) and ``bias`` (shift), seeded by ``seed``."""

    def __init__(self, sigma: float = 0.05, bias: float | None = None, seed: int = 0) -> None:
        bias = sigma if bias is None else bias
        for name, value in (("sigma", sigma), ("bias", bias)):
            if not (np.isfinite(value) and 0 <= value <= MAX_SIGMA):
                raise InvalidRequestError(f"stain augmentation {name} must be in "
                                          f"[0, {MAX_SIGMA:g}], got {value}")
        self.sigma, self.bias, self.seed = sigma, bias, seed

    def draw(self, index: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """The (alpha, beta) of patch ``index``: three of each, H, E, DAB."""
        rng = np.random.default_rng([self.seed, index])
        alpha = rng.uniform(1 - self.sigma, 1 + self.sigma, 3)
        beta = rng.uniform(-self.bias, self.bias, 3)
        return alpha, beta

    def __call__(self, patches: npt.NDArray[np.uint8],
                 indices: Sequence[int] | npt.NDArray[np.int64] | None = None
                 ) -> npt.NDArray[np.uint8]:
        """The augmented copy of (N, H, W, 3) uint8 ``patches``, patch i drawn as
        ``indices[i]`` (default: i), so the batches of one export get one run's draws."""
        if patches.ndim != 4 or patches.shape[3] != 3 or patches.dtype != np.uint8:
            raise InvalidRequestError(f"expected (N, H, W, 3) uint8 patches, got "
                                      f"{patches.shape} {patches.dtype}")
        where = range(len(patches)) if indices is None else indices
        if len(where) != len(patches):
            raise InvalidRequestError(f"{len(where)} indices for {len(patches)} patches")
        out = np.empty_like(patches)
        for i, (patch, index) in enumerate(zip(patches, where, strict=True)):
            alpha, beta = self.draw(int(index))
            jittered = hed_concentrations(patch) * alpha + beta
            rgb = 256 * np.exp(-jittered @ RUIFROK_HED) - 1
            out[i] = np.clip(np.rint(rgb), 0, 255).reshape(patch.shape).astype(np.uint8)
        return out
