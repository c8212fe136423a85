"""Stain normalisation batched in torch, for a model on a GPU: Macenko and Reinhard.

The same equations as :mod:`wsi_sampler.stain` (its docstring states them), on a whole
batch at once: per-patch optical-density covariances and their eigenvectors by
``torch.linalg.eigh`` on (N, 3, 3), the robust angles by ``nanquantile`` over each patch's
stained pixels, the concentrations by the stain matrix's pseudo-inverse. Reinhard's
L*a*b* is OpenCV's (sRGB gamma, D65 white) written as formulas. Frame: (N, H, W, 3) uint8
RGB in and out, float32 arithmetic. A patch the numpy path would pass through unchanged
goes through unchanged here too. Vahadane's dictionary learning stays on the CPU
(:class:`wsi_sampler.stain.StainNormalizer`).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from .errors import InvalidRequestError
from .stain import ALPHA, BETA, I0, LAB_MIN_STD, MIN_STAINED_PX, StainNormalizer

__all__ = ["TorchStainNormalizer", "lab_to_rgb", "rgb_to_lab"]

# sRGB (D65) <-> XYZ, and the D65 white, as OpenCV's colour conversions use them
_RGB_TO_XYZ = torch.tensor([[0.412453, 0.357580, 0.180423],
                            [0.212671, 0.715160, 0.072169],
                            [0.019334, 0.119193, 0.950227]], dtype=torch.float64)
_WHITE = (0.950456, 1.0, 1.088754)
_EPS = 0.008856
_KAPPA = 903.3


def _linear(c: torch.Tensor) -> torch.Tensor:
    return torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _gamma(c: torch.Tensor) -> torch.Tensor:
    c = c.clamp(min=0)
    return torch.where(c <= 0.0031308, 12.92 * c, 1.055 * c ** (1 / 2.4) - 0.055)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3) RGB in [0, 1] -> CIE L*a*b* (L 0..100), as ``cv2.COLOR_RGB2LAB`` on float."""
    xyz = _linear(rgb) @ _RGB_TO_XYZ.to(rgb).T
    xyz = xyz / torch.tensor(_WHITE, device=rgb.device, dtype=rgb.dtype)
    f = torch.where(xyz > _EPS, xyz.clamp(min=1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    y = xyz[..., 1]
    lum = torch.where(y > _EPS, 116 * f[..., 1] - 16, _KAPPA * y)
    return torch.stack([lum, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])],
                       dim=-1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rgb_to_lab` (RGB not clipped)."""
    lum, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    y = torch.where(lum > _KAPPA * _EPS, ((lum + 16) / 116) ** 3, lum / _KAPPA)
    fy = torch.where(y > _EPS, (lum + 16) / 116, 7.787 * y + 16 / 116)
    fx, fz = fy + a / 500, fy - b / 200

    def inverse_f(f: torch.Tensor) -> torch.Tensor:
        return torch.where(f ** 3 > _EPS, f ** 3, (f - 16 / 116) / 7.787)

    xyz = torch.stack([inverse_f(fx), y, inverse_f(fz)], dim=-1)
    xyz = xyz * torch.tensor(_WHITE, device=lab.device, dtype=lab.dtype)
    return _gamma(xyz @ torch.linalg.inv(_RGB_TO_XYZ).to(lab).T)


class TorchStainNormalizer:
    """``normalizer``'s method and reference (a fitted :class:`StainNormalizer`), run on
    whole batches on ``device``. Thread-safe (no state changes but ``unchanged``)."""

    def __init__(self, normalizer: StainNormalizer, device: torch.device | str) -> None:
        if normalizer.method not in ("macenko", "reinhard"):
            raise InvalidRequestError(f"{normalizer.method} runs on the CPU only")
        self.method = normalizer.method
        self.device = torch.device(device)
        matrix, maxima = normalizer.reference_stains
        self._matrix = torch.tensor(matrix, dtype=torch.float32, device=self.device)
        self._maxima = torch.tensor(maxima, dtype=torch.float32, device=self.device)
        mean, std = normalizer.reference_lab
        self._lab_mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self._lab_std = torch.tensor(std, dtype=torch.float32, device=self.device)
        self.unchanged = 0

    def __call__(self, patches: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """The normalised copy of (N, H, W, 3) uint8 ``patches``."""
        if patches.ndim != 4 or patches.shape[3] != 3 or patches.dtype != np.uint8:
            raise InvalidRequestError(f"expected (N, H, W, 3) uint8 patches, got "
                                      f"{patches.shape} {patches.dtype}")
        if not len(patches):
            return patches.copy()
        x = torch.from_numpy(np.ascontiguousarray(patches)).to(self.device)
        with torch.inference_mode():
            out = self.normalise(x)
        result: npt.NDArray[np.uint8] = out.cpu().numpy()
        return result

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 tensor -> the normalised (N, H, W, 3) uint8 tensor."""
        flat = x.reshape(len(x), -1, 3).float()
        if self.method == "reinhard":
            return self._reinhard(flat).reshape(x.shape)
        rebuilt, ok = self._macenko(flat)
        self.unchanged += int((~ok).sum())
        return torch.where(ok[:, None, None], rebuilt, x.reshape(flat.shape)).reshape(x.shape)

    def _macenko(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        od = -torch.log((flat + 1) / I0)  # (N, P, 3)
        stained = (od >= BETA).all(dim=-1)
        count = stained.sum(dim=1)
        weight = stained.unsqueeze(-1).float()
        mean = (od * weight).sum(dim=1) / count.clamp(min=1).unsqueeze(-1)
        centred = (od - mean.unsqueeze(1)) * weight
        cov = centred.transpose(1, 2) @ centred / (count - 1).clamp(min=1)[:, None, None]
        plane = torch.linalg.eigh(cov.double()).eigenvectors[:, :, 1:3].float()
        plane = plane * torch.sign(plane.sum(dim=1, keepdim=True))  # OD vectors are positive
        projected = od @ plane
        angles = torch.atan2(projected[..., 1], projected[..., 0])
        angles = torch.where(stained, angles, torch.nan)
        lo = torch.nanquantile(angles, ALPHA / 100, dim=1)
        hi = torch.nanquantile(angles, 1 - ALPHA / 100, dim=1)
        v_lo = (plane @ torch.stack([lo.cos(), lo.sin()], dim=-1).unsqueeze(-1)).squeeze(-1)
        v_hi = (plane @ torch.stack([hi.cos(), hi.sin()], dim=-1).unsqueeze(-1)).squeeze(-1)
        first = (v_lo[:, 0] > v_hi[:, 0]).unsqueeze(-1)
        matrix = torch.stack([torch.where(first, v_lo, v_hi), torch.where(first, v_hi, v_lo)],
                             dim=2)  # (N, 3, 2), haematoxylin first
        gram_det = torch.linalg.det(matrix.transpose(1, 2) @ matrix)
        ok = (count >= MIN_STAINED_PX) & torch.isfinite(matrix).all(dim=(1, 2)) & (
            gram_det > 1e-10)
        safe = torch.where(ok[:, None, None], matrix, self._matrix.expand_as(matrix))
        concentrations = torch.linalg.pinv(safe) @ od.transpose(1, 2)  # (N, 2, P)
        maxima = torch.quantile(concentrations, 0.99, dim=2)
        ok &= torch.isfinite(maxima).all(dim=1) & (maxima.abs() > 1e-6).all(dim=1)
        scaled = concentrations * (self._maxima / torch.where(ok[:, None], maxima, 1.0)
                                   ).unsqueeze(-1)
        rebuilt = (I0 * torch.exp(-self._matrix @ scaled)).clamp(max=255)
        return rebuilt.transpose(1, 2).to(torch.uint8), ok

    def _reinhard(self, flat: torch.Tensor) -> torch.Tensor:
        lab = rgb_to_lab(flat / 255)
        mean = lab.mean(dim=1, keepdim=True)
        std = lab.std(dim=1, correction=0, keepdim=True)
        matched = (lab - mean) / std.clamp(min=LAB_MIN_STD) * self._lab_std + self._lab_mean
        return (lab_to_rgb(matched) * 255).round().clamp(0, 255).to(torch.uint8)
