"""The card of ``tissue-qc``, the built-in default model (:mod:`.tissue_qc` holds the model;
this module needs no torch, so listing and planning stay light)."""

from __future__ import annotations

from .card import ModelCard, Normalization, OutputSpec

__all__ = ["MEASUREMENTS", "QC_CLASSES", "QC_THRESHOLDS", "tissue_qc_card"]

MEASUREMENTS = (
    "tissue_fraction", "blur_laplacian_var", "pen_fraction", "dark_fraction",
    "haematoxylin_od", "eosin_od",
)
QC_CLASSES = ("qc_ok", "qc_background", "qc_blurry", "qc_pen", "qc_artefact")
QC_THRESHOLDS = {
    "min_tissue_fraction": 0.25,
    "max_dark_fraction": 0.10,
    "max_pen_fraction": 0.05,
    "min_blur_laplacian_var": 40.0,
}

def tissue_qc_card() -> ModelCard:
    return ModelCard(
        name="tissue-qc",
        version="1",
        architecture="builtin:tissue-qc",
        patch_size_px=224,
        target_mpp=0.5,
        normalization=Normalization(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
        outputs=(
            OutputSpec(name="measurements", class_names=MEASUREMENTS),
            OutputSpec(name="qc", class_names=QC_CLASSES),
        ),
        max_batch=64,
        description="Built-in tissue quality control of bright-field (H&E) slides: measured "
                    "values, not a trained model (on fluorescence slides its values mean "
                    "nothing, and results say so).",
    )
