from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from wsi_sampler.demo import _texture
from wsi_sampler.errors import ModelLoadError, ModelNotFoundError
from wsi_sampler.models import QC_THRESHOLDS, load_card, load_model, tissue_qc_card
from wsi_sampler.tissue import dark_artefact_mask, pen_ink_mask

BACKGROUND = (242, 241, 244)


def tissue_patch(seed: int = 0) -> np.ndarray:
    """224 px of the demo H&E texture at 0.5 µm/px (448 px of 0.25 µm/px, area-averaged)."""
    return cv2.resize(_texture(seed)[:448, :448], (224, 224), interpolation=cv2.INTER_AREA)


def qc_label(out: dict[str, np.ndarray], i: int) -> str:
    return tissue_qc_card().outputs[1].class_names[int(out["qc"][i].argmax())]  # type: ignore[index]


@pytest.fixture(scope="module")
def qc_model():  # type: ignore[no-untyped-def]
    return load_model("tissue-qc", device="cpu")


def test_tissue_qc_on_patches_with_known_content(qc_model) -> None:  # type: ignore[no-untyped-def]
    blank = np.empty((224, 224, 3), np.uint8)
    blank[:] = BACKGROUND
    tissue = tissue_patch()
    blurred = cv2.GaussianBlur(tissue, (0, 0), 4)
    inked = tissue.copy()
    inked[:, :70] = (40, 70, 200)  # blue marker over ~31 % of the patch
    dark = tissue.copy()
    dark[:60, :120] = (18, 16, 20)  # ~14 % near-black
    batch = np.stack([blank, tissue, blurred, inked, dark])
    out = qc_model.predict(batch)
    m = out["measurements"]
    assert m.shape == (5, 6) and out["qc"].shape == (5, 5)
    assert [qc_label(out, i) for i in range(5)] == ["qc_background", "qc_ok", "qc_blurry",
                                                    "qc_pen", "qc_artefact"]
    assert m[0, 0] < 0.01 and m[1, 0] > 0.95  # tissue fraction
    assert m[1, 1] > 10 * m[2, 1]  # blur: Laplacian variance collapses when out of focus
    assert m[2, 1] < QC_THRESHOLDS["min_blur_laplacian_var"] < m[1, 1]
    assert abs(m[3, 2] - 70 / 224) < 0.01  # pen fraction
    assert abs(m[4, 3] - 60 * 120 / 224**2) < 0.01  # dark fraction
    assert m[1, 5] > m[1, 4] > 0.02  # H&E optical density: pink stroma, fewer purple nuclei
    np.testing.assert_array_equal(out["qc"].sum(axis=1), 1.0)  # one-hot


def test_tissue_qc_agrees_with_the_slide_level_detectors(qc_model) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    m = qc_model.predict(img)["measurements"][0]
    # OpenCV rounds hue to 2° and saturation to 1/255: random colours near a boundary differ
    assert abs(m[2] - pen_ink_mask(img[0]).mean()) < 0.02
    assert abs(m[3] - dark_artefact_mask(img[0]).mean()) < 1e-6


def test_stain_optical_density_follows_the_stain(qc_model) -> None:  # type: ignore[no-untyped-def]
    purple = np.full((1, 224, 224, 3), (110, 60, 160), np.uint8)  # haematoxylin-like
    pink = np.full((1, 224, 224, 3), (235, 140, 190), np.uint8)  # eosin-like
    purple_he, pink_he = (qc_model.predict(x)["measurements"][0, 4:] for x in (purple, pink))
    assert purple_he[0] > purple_he[1] and pink_he[1] > pink_he[0]
    assert purple_he[0] > pink_he[0] + 0.3


def test_bad_input_is_rejected(qc_model) -> None:  # type: ignore[no-untyped-def]
    from wsi_sampler.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="224"):
        qc_model.predict(np.zeros((1, 100, 100, 3), np.uint8))
    with pytest.raises(InvalidRequestError, match="uint8"):
        qc_model.predict(np.zeros((1, 224, 224, 3), np.float32))


# -- loaders --------------------------------------------------------------------------------------
class Tiny(nn.Module):
    """Mean colour -> 2 logits: small enough to create in a test."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def write_card(path: Path, **fields: object) -> Path:
    card = {"name": "tiny", "architecture": "torchscript", "file": "tiny.pt", "patch_size_px": 32,
            "target_mpp": 1.0, "outputs": [{"name": "logits", "class_names": ["a", "b"],
                                            "activation": "softmax"}], "max_batch": 4}
    card.update(fields)
    path.write_text(json.dumps(card))
    return path


def expected(module: nn.Module, patches: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        return torch.softmax(module((x - mean) / std), dim=1).numpy()


PATCHES = np.random.default_rng(1).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)


def save_torchscript(module: nn.Module, path: Path) -> None:
    with warnings.catch_warnings():  # torch 2.14 deprecates scripting; labs still ship .pt files
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(module).save(str(path))


def test_torchscript_model_with_its_card(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = Tiny().eval()
    save_torchscript(module, tmp_path / "tiny.pt")
    model = load_model(write_card(tmp_path / "tiny.json"), device="cpu")
    out = model.predict(PATCHES)  # 9 patches, max batch 4: three chunks
    np.testing.assert_allclose(out["logits"], expected(module, PATCHES), rtol=1e-5, atol=1e-6)
    # a model file with its card beside it loads the same
    assert load_model(tmp_path / "tiny.pt", device="cpu").card.name == "tiny"


def test_torch_export_archive(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = Tiny().eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(module, (torch.zeros(2, 3, 32, 32),),
                                   dynamic_shapes={"x": {0: batch}})
    torch.export.save(exported, str(tmp_path / "tiny.pt2"))
    card = write_card(tmp_path / "tiny.json", architecture="torch-export", file="tiny.pt2")
    out = load_model(card, device="cpu").predict(PATCHES)
    np.testing.assert_allclose(out["logits"], expected(module, PATCHES), rtol=1e-5, atol=1e-6)


def test_timm_architecture_with_safetensors_weights(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm", reason="timm is installed by make test (extra 'timm')")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    module = timm.create_model("resnet18", pretrained=False, num_classes=2).eval()
    save_file(module.state_dict(), str(tmp_path / "r18.safetensors"))
    card = write_card(tmp_path / "r18.json", architecture="timm:resnet18", file="r18.safetensors")
    out = load_model(card, device="cpu").predict(PATCHES)
    np.testing.assert_allclose(out["logits"], expected(module, PATCHES), rtol=1e-4, atol=1e-5)
    wrong = write_card(tmp_path / "r18-3.json", architecture="timm:resnet18",
                       file="r18.safetensors",
                       outputs=[{"name": "logits", "class_names": ["a", "b", "c"]}])
    with pytest.raises(ModelLoadError, match="weights do not fit"):
        load_model(wrong, device="cpu")
    no_weights = write_card(tmp_path / "r18-nw.json", architecture="timm:resnet18", file=None)
    with pytest.raises(ModelLoadError, match="random weights"):
        load_model(no_weights, device="cpu")
    assert load_model(no_weights, device="cpu", allow_random_weights=True).card.name == "tiny"


def test_card_that_does_not_match_the_model(tmp_path: Path) -> None:
    save_torchscript(Tiny(), tmp_path / "tiny.pt")
    card = write_card(tmp_path / "tiny.json", outputs=[{"name": "f", "dim": 5}])
    with pytest.raises(ModelLoadError, match=r"shape \(1, 2\).*\(1, 5\)"):
        load_model(card, device="cpu")
    two = write_card(tmp_path / "two.json", outputs=[{"name": "a", "dim": 2},
                                                     {"name": "b", "dim": 2}])
    with pytest.raises(ModelLoadError, match="returned 1 outputs, its card lists 2"):
        load_model(two, device="cpu")


def test_missing_and_invalid_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no such model"):
        load_model(tmp_path / "nothing.pt")
    with pytest.raises(ModelNotFoundError, match="model file"):
        load_model(write_card(tmp_path / "tiny.json"))  # tiny.pt was never written
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="not a TorchScript"):
        load_model(write_card(tmp_path / "junk.json", file="junk.pt"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_card(tmp_path / "bad.json")
    write_card(tmp_path / "neg.json", patch_size_px=-3)
    with pytest.raises(ModelLoadError, match="patch_size_px"):
        load_card(tmp_path / "neg.json")
    write_card(tmp_path / "arch.json", architecture="keras")
    with pytest.raises(ModelLoadError, match="unknown architecture"):
        load_model(tmp_path / "arch.json")
