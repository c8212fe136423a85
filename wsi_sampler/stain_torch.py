"""Stain normalisation batched in torch, for a model on a GPU: Macenko, Vahadane, Reinhard.

The same equations as :mod:`wsi_sampler.stain` (its docstring states them), on a whole
batch at once: per-patch optical-density covariances and their eigenvectors by
``torch.linalg.eigh`` on (N, 3, 3), the robust angles by ``nanquantile`` over each patch's
stained pixels, the concentrations by the stain matrix's pseudo-inverse. Reinhard's
L*a*b* is OpenCV's (sRGB gamma, D65 white) written as formulas. Frame: (N, H, W, 3) uint8
RGB in and out, float32 arithmetic. A patch the numpy path would pass through unchanged
goes through unchanged here too. Vahadane's sparse NMF runs on all patches at once: the
exact two-stain lasso pixel by pixel and the dictionary step patch by patch, over the same
tissue pixels the NumPy path fits (its L* mask and seeded sample are taken on the CPU).
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt
import torch

from .errors import InvalidRequestError
from .stain import (
    ALPHA,
    BETA,
    I0,
    LAB_MIN_STD,
    LUMINANCE_TISSUE,
    MIN_STAINED_PX,
    VAHADANE_CODE_LAMBDA,
    VAHADANE_ITERATIONS,
    VAHADANE_LAMBDA,
    VAHADANE_MAX_FIT_PX,
    StainNormalizer,
)

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
        rebuilt, ok = (self._vahadane(x, flat) if self.method == "vahadane"
                       else self._macenko(flat))
        self.unchanged += int((~ok).sum())
        return torch.where(ok[:, None, None], rebuilt, x.reshape(flat.shape)).reshape(x.shape)

    def _macenko_matrix(self, flat: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each patch's optical density (N, P, 3), Macenko stain matrix (N, 3, 2,
        haematoxylin first) and whether it has one."""
        od = -torch.log((flat + 1) / I0)
        stained = (od >= BETA).all(dim=-1)
        count = stained.sum(dim=1)
        weight = stained.unsqueeze(-1).float()
        mean = (od * weight).sum(dim=1) / count.clamp(min=1).unsqueeze(-1)
        centred = (od - mean.unsqueeze(1)) * weight
        cov = centred.transpose(1, 2) @ centred / (count - 1).clamp(min=1)[:, None, None]
        plane = torch.linalg.eigh(cov.double()).eigenvectors[:, :, 1:3].float()
        plane = plane * torch.sign(plane.sum(dim=1, keepdim=True))  # OD vectors are positive
        projected = od @ plane
        angles = torch.where(stained, torch.atan2(projected[..., 1], projected[..., 0]),
                             torch.nan)
        lo = torch.nanquantile(angles, ALPHA / 100, dim=1)
        hi = torch.nanquantile(angles, 1 - ALPHA / 100, dim=1)
        v_lo = (plane @ torch.stack([lo.cos(), lo.sin()], dim=-1).unsqueeze(-1)).squeeze(-1)
        v_hi = (plane @ torch.stack([hi.cos(), hi.sin()], dim=-1).unsqueeze(-1)).squeeze(-1)
        first = (v_lo[:, 0] > v_hi[:, 0]).unsqueeze(-1)
        matrix = torch.stack([torch.where(first, v_lo, v_hi), torch.where(first, v_hi, v_lo)],
                             dim=2)
        gram_det = torch.linalg.det(matrix.transpose(1, 2) @ matrix)
        ok = (count >= MIN_STAINED_PX) & torch.isfinite(matrix).all(dim=(1, 2)) & (
            gram_det > 1e-10)
        return od, torch.where(ok[:, None, None], matrix, self._matrix.expand_as(matrix)), ok

    def _macenko(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        od, matrix, ok = self._macenko_matrix(flat)
        concentrations = torch.linalg.pinv(matrix) @ od.transpose(1, 2)  # (N, 2, P)
        return self._rebuilt(concentrations, ok, I0)

    def _rebuilt(self, concentrations: torch.Tensor, ok: torch.Tensor, white: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Concentrations scaled to the reference's percentiles, on the reference's stains;
        ``ok`` less the patches whose percentiles are degenerate."""
        maxima = torch.quantile(concentrations, 0.99, dim=2)
        ok = ok & torch.isfinite(maxima).all(dim=1) & (maxima.abs() > 1e-6).all(dim=1)
        scaled = concentrations * (self._maxima / torch.where(ok[:, None], maxima, 1.0)
                                   ).unsqueeze(-1)
        rebuilt = (white * torch.exp(-self._matrix @ scaled)).clamp(max=255)
        return rebuilt.transpose(1, 2).to(torch.uint8), ok

    def _vahadane(self, x: torch.Tensor, flat: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        _, start, started = self._macenko_matrix(flat)
        w = torch.where(started[:, None, None], start.abs(), self._matrix.expand_as(start))
        od = -torch.log(flat.clamp(min=1) / 255)  # (N, P, 3)
        fit = _vahadane_fit_mask(x.cpu().numpy()).to(od.device)
        data = (od * fit.unsqueeze(-1)).transpose(1, 2)  # (N, 3, P): 0 off the fit pixels
        for _ in range(VAHADANE_ITERATIONS):
            h = _two_unknowns(w.transpose(1, 2) @ w, w.transpose(1, 2) @ data, VAHADANE_LAMBDA)
            w = _dictionary_step(w, h @ h.transpose(1, 2), data @ h.transpose(1, 2))
        swap = (w[:, 0, 0] < w[:, 0, 1])[:, None, None]
        w = torch.where(swap, w.flip(2), w)
        ok = (fit.sum(dim=1) >= MIN_STAINED_PX) & (torch.linalg.det(
            w.transpose(1, 2) @ w) > 1e-10)
        everything = od.transpose(1, 2)
        concentrations = _two_unknowns(w.transpose(1, 2) @ w, w.transpose(1, 2) @ everything,
                                       VAHADANE_CODE_LAMBDA)
        return self._rebuilt(concentrations, ok, 255.0)

    def _reinhard(self, flat: torch.Tensor) -> torch.Tensor:
        lab = rgb_to_lab(flat / 255)
        mean = lab.mean(dim=1, keepdim=True)
        std = lab.std(dim=1, correction=0, keepdim=True)
        matched = (lab - mean) / std.clamp(min=LAB_MIN_STD) * self._lab_std + self._lab_mean
        return (lab_to_rgb(matched) * 255).round().clamp(0, 255).to(torch.uint8)


def _vahadane_fit_mask(patches: npt.NDArray[np.uint8]) -> torch.Tensor:
    """(N, P) bool: the pixels Vahadane's dictionary is learned on, exactly as the NumPy
    path picks them (L* < 80 and OD > 0, then a seeded sample of at most
    ``VAHADANE_MAX_FIT_PX``)."""
    masks = np.zeros((len(patches), patches.shape[1] * patches.shape[2]), bool)
    for i, patch in enumerate(patches):
        flat = patch.reshape(-1, 3)
        luminance = cv2.cvtColor(flat.reshape(-1, 1, 3), cv2.COLOR_RGB2LAB)[:, 0, 0]
        od_positive = (flat < 255).all(axis=1)  # -ln(max(I, 1) / 255) > 0
        tissue = np.flatnonzero((luminance.astype(np.float64) * 100 / 255 < LUMINANCE_TISSUE)
                                & od_positive)
        if len(tissue) > VAHADANE_MAX_FIT_PX:
            tissue = tissue[np.random.default_rng(0).choice(len(tissue), VAHADANE_MAX_FIT_PX,
                                                            replace=False)]
        masks[i, tissue] = True
    return torch.from_numpy(masks)


def _two_unknowns(gram: torch.Tensor, lin: torch.Tensor, lam: float) -> torch.Tensor:
    """Batched :func:`wsi_sampler.stain._two_unknowns`: gram (N, 2, 2), lin (N, 2, P) ->
    the exact argmin over h >= 0 of h' G h / 2 - lin' h + lam * sum(h), (N, 2, P)."""
    best = torch.zeros_like(lin)
    best_f = torch.zeros_like(lin[:, 0])
    for i in (0, 1):
        g = gram[:, i, i].unsqueeze(-1)
        h = ((lin[:, i] - lam) / g.clamp(min=1e-12)).clamp(min=0)
        f = 0.5 * g * h * h - lin[:, i] * h + lam * h
        better = (f < best_f) & (g > 0)
        alone = torch.zeros_like(best)
        alone[:, i] = h
        best = torch.where(better.unsqueeze(1), alone, best)
        best_f = torch.where(better, f, best_f)
    solvable = (torch.linalg.det(gram).abs() > 1e-12)[:, None]
    safe = torch.where(solvable[:, :, None], gram, torch.eye(2, device=gram.device))
    h2 = torch.linalg.solve(safe, lin - lam)
    f2 = 0.5 * (h2 * (gram @ h2)).sum(dim=1) - (lin * h2).sum(dim=1) + lam * h2.sum(dim=1)
    better = (h2 >= 0).all(dim=1) & (f2 < best_f) & solvable
    return torch.where(better.unsqueeze(1), h2, best)


def _dictionary_step(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sweeps: int = 10
                     ) -> torch.Tensor:
    """Batched :func:`wsi_sampler.stain._dictionary_step`: w (N, 3, 2), a = H H' (N, 2, 2),
    b = X H' (N, 3, 2); block coordinate descent, columns non-negative in the unit ball."""
    w = w.clone()
    for _ in range(sweeps):
        for j in (0, 1):
            ajj = a[:, j, j]
            column = ((b[:, :, j] - (w @ a[:, :, j:j + 1]).squeeze(-1))
                      / ajj.clamp(min=1e-12).unsqueeze(-1) + w[:, :, j]).clamp(min=0)
            column = column / column.norm(dim=1, keepdim=True).clamp(min=1.0)
            w[:, :, j] = torch.where((ajj > 1e-12).unsqueeze(-1), column, w[:, :, j])
    return w
