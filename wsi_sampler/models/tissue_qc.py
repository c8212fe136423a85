"""``tissue-qc``: the built-in default model. Measurement, not a trained classifier.

Per patch (224 px at 0.5 µm/px) it measures, in torch, on the raw 0..255 RGB values:

- ``tissue_fraction``: pixels with HSV saturation >= 20/255 that are neither ink nor dark
  (the same rule as the slide-level tissue detector);
- ``blur_laplacian_var``: variance of the 3x3 Laplacian of the grey image (0..255 units);
  low means out of focus (or empty);
- ``pen_fraction``: blue/green marker ink (saturation >= 60/255, hue 70-180° or 190-250°);
- ``dark_fraction``: near-black pixels (max(R, G, B) < 50): folds, dirt, black marker;
- ``haematoxylin_od``, ``eosin_od``: mean optical density of each stain over tissue pixels,
  by colour deconvolution with Ruifrok & Johnston's H&E-DAB vectors (as scikit-image's
  ``rgb2hed``, but in base-10 OD units).

Then a QC label, one-hot, by these documented thresholds, in this order:
``background`` if tissue_fraction < 0.25; ``artefact`` if dark_fraction >= 0.10; ``pen`` if
pen_fraction >= 0.05; ``blurry`` if blur_laplacian_var < 40; else ``ok``.
"""

from __future__ import annotations

import torch
from torch import nn

from .tissue_qc_card import QC_THRESHOLDS, tissue_qc_card

__all__ = ["QC_THRESHOLDS", "TissueQC", "tissue_qc_card"]

_MIN_SATURATION = 20.0
_INK_MIN_SATURATION = 60.0
_DARK_VALUE = 50.0
_GREEN_HUE_DEG = (70.0, 180.0)
_BLUE_HUE_DEG = (190.0, 250.0)
_RGB_FROM_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))


def _hue_degrees(x: torch.Tensor, mx: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    d = delta.clamp(min=1e-6)
    hue = torch.where(
        mx == r, torch.remainder((g - b) / d, 6.0),
        torch.where(mx == g, (b - r) / d + 2.0, (r - g) / d + 4.0),
    )
    return hue * 60.0


class TissueQC(nn.Module):
    """(N, 3, H, W) float RGB in 0..255 -> (measurements (N, 6), qc one-hot (N, 5))."""

    laplacian: torch.Tensor
    grey: torch.Tensor
    hed_from_rgb: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
        self.register_buffer("laplacian", lap.view(1, 1, 3, 3))
        self.register_buffer("grey", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1))
        hed_from_rgb = torch.linalg.inv(torch.tensor(_RGB_FROM_HED, dtype=torch.float64))
        self.register_buffer("hed_from_rgb", hed_from_rgb.float())

    def masks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Boolean (N, H, W) tissue, pen and dark masks."""
        mx, mn = x.amax(dim=1), x.amin(dim=1)
        delta = mx - mn
        sat = delta / mx.clamp(min=1.0) * 255.0
        hue = _hue_degrees(x, mx, delta)
        ink_hue = ((hue >= _GREEN_HUE_DEG[0]) & (hue <= _GREEN_HUE_DEG[1])) | (
            (hue >= _BLUE_HUE_DEG[0]) & (hue <= _BLUE_HUE_DEG[1])
        )
        pen = (sat >= _INK_MIN_SATURATION) & ink_hue
        dark = mx < _DARK_VALUE
        tissue = (sat >= _MIN_SATURATION) & ~pen & ~dark
        return tissue, pen, dark

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        tissue, pen, dark = self.masks(x)
        grey = (x * self.grey).sum(dim=1, keepdim=True)
        lap = nn.functional.conv2d(grey, self.laplacian)
        blur = lap.flatten(1).var(dim=1)
        od = -torch.log10((x / 255.0).clamp(min=1.0 / 255.0))
        stains = torch.einsum("nchw,cs->nshw", od, self.hed_from_rgb)
        t = tissue.float()
        n_tissue = t.sum(dim=(1, 2)).clamp(min=1.0)
        h_od = (stains[:, 0] * t).sum(dim=(1, 2)) / n_tissue
        e_od = (stains[:, 1] * t).sum(dim=(1, 2)) / n_tissue
        measurements = torch.stack(
            [t.mean(dim=(1, 2)), blur, pen.float().mean(dim=(1, 2)),
             dark.float().mean(dim=(1, 2)), h_od, e_od], dim=1,
        )
        return measurements, self.qc(measurements)

    @staticmethod
    def qc(m: torch.Tensor) -> torch.Tensor:
        th = QC_THRESHOLDS
        background = m[:, 0] < th["min_tissue_fraction"]
        artefact = ~background & (m[:, 3] >= th["max_dark_fraction"])
        pen = ~background & ~artefact & (m[:, 2] >= th["max_pen_fraction"])
        blurry = ~background & ~artefact & ~pen & (m[:, 1] < th["min_blur_laplacian_var"])
        ok = ~(background | artefact | pen | blurry)
        return torch.stack([ok, background, blurry, pen, artefact], dim=1).float()
