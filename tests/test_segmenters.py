"""Deep tissue segmenters: HEST's card and architecture, its Lightning checkpoint layout
loaded strictly, tiled inference over slides, and the CLI's ``--method hest``."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _cli import run_cli as run  # in this process: torch is imported already
from torch import nn

from wsi_sampler import open_slide
from wsi_sampler.demo import DemoSlideSpec, render_tissue_mask, write_demo_slide
from wsi_sampler.errors import InvalidRequestError, ModelLoadError
from wsi_sampler.plan import compute_tissue_mask
from wsi_sampler.segmenters import (
    Segmenter,
    SegmenterCard,
    build_segmenter,
    load_segmenter,
    load_segmenter_card,
    segment_slide,
    segmenter_catalogue_names,
)
from wsi_sampler.tissue import TissueParams

SMALL_SPEC = DemoSlideSpec(width=4096, height=3072, mpp=0.5, seed=5, n_blobs=3, pen=False,
                           artefact=False)
TINY_SPEC = DemoSlideSpec(width=1024, height=768, mpp=0.5, seed=5, n_blobs=2, pen=False,
                          artefact=False)
"""One 512 µm tile: the real network on CPU takes about a second per tile."""


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_slide(tmp_path_factory.mktemp("seg") / "small.svs", SMALL_SPEC)


@pytest.fixture(scope="module")
def tiny_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_slide(tmp_path_factory.mktemp("seg") / "tiny.svs", TINY_SPEC)


def _hest_lightning_checkpoint(path: Path, *, drop: str | None = None,
                               extra: object = None) -> dict[str, torch.Tensor]:
    """What HEST's training writes: a Lightning file whose ``state_dict`` holds the
    LightningModule's ``model.`` (DeepLabV3 with its auxiliary head) and training counters.
    Random weights of the real architecture; returns the model's own state dict."""
    from torchvision.models.segmentation import deeplabv3_resnet50

    torch.manual_seed(0)
    trained = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=2,
                                 aux_loss=True)
    state = {f"model.{k}": v for k, v in trained.state_dict().items() if k != drop}
    checkpoint: dict[str, object] = {"epoch": 41, "global_step": 12000,
                                     "pytorch-lightning_version": "2.2.1", "state_dict": state}
    if extra is not None:
        checkpoint["hyper_parameters"] = extra
    torch.save(checkpoint, path)
    return {k: v for k, v in trained.state_dict().items() if not k.startswith("aux_")}


def test_hest_card_and_its_architecture_match_the_published_size() -> None:
    assert "hest" in segmenter_catalogue_names()
    card = load_segmenter_card("hest")
    assert (card.tile_px, card.tile_mpp, card.tissue_class) == (512, 1.0, 1)
    assert card.provenance is not None and card.provenance.parameters is not None
    with torch.device("meta"):
        module = build_segmenter(card)
    count = sum(p.numel() for p in module.parameters())
    published = card.provenance.parameters
    assert abs(count - published) / published <= card.provenance.parameters_tolerance
    assert not any(k.startswith("aux_") for k in module.state_dict())  # inference only


def test_the_publishers_lightning_checkpoint_loads_strictly(tmp_path: Path) -> None:
    ckpt = tmp_path / "deeplabv3_seg_v4.ckpt"
    expected = _hest_lightning_checkpoint(ckpt)
    segmenter = load_segmenter("hest", weights=ckpt, device="cpu")
    loaded = segmenter.module.state_dict()
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_a_checkpoint_that_does_not_fit_names_the_key(tmp_path: Path) -> None:
    ckpt = tmp_path / "short.ckpt"
    _hest_lightning_checkpoint(ckpt, drop="classifier.4.weight")
    with pytest.raises(ModelLoadError, match=r"classifier\.4\.weight"):
        load_segmenter("hest", weights=ckpt, device="cpu")


def test_a_checkpoint_with_pickled_objects_is_refused_with_the_way_out(tmp_path: Path) -> None:
    ckpt = tmp_path / "full.ckpt"
    _hest_lightning_checkpoint(ckpt, extra=argparse.Namespace(lr=1e-4))
    with pytest.raises(ModelLoadError, match=r"pickled Python objects.*torch\.save"):
        load_segmenter("hest", weights=ckpt, device="cpu")


def test_no_weights_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError, match="segmenter-weights"):
        load_segmenter("hest")
    with pytest.raises(InvalidRequestError, match="needs the segmenter's weights"):
        TissueParams(method="hest")


class _SaturationNet(nn.Module):
    """A stand-in network with the segmenter's interface (normalised NCHW in, ``{"out":
    2-class logits}`` out) that calls tissue where a pixel is coloured: it tests the tiling,
    the glass skip and the stitching against the slide's drawn ground truth."""

    def __init__(self, card_mean: tuple[float, ...], card_std: tuple[float, ...]) -> None:
        super().__init__()
        self.mean = torch.tensor(card_mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(card_std).view(1, 3, 1, 1) * 255
        self.tiles_seen = 0

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.tiles_seen += len(x)
        rgb = x * self.std + self.mean
        colour = rgb.amax(dim=1) - rgb.amin(dim=1)  # 0 on grey glass, high on stain
        tissue = colour - 20
        return {"out": torch.stack([-tissue, tissue], dim=1)}


def _stitched_iou(slide_path: Path, segmenter: Segmenter) -> tuple[float, list[tuple[int, int]]]:
    """IoU of ``segmenter``'s 8 µm/px mask of the small slide with its drawn tissue, and
    the progress calls it made."""
    seen: list[tuple[int, int]] = []
    with open_slide(slide_path) as slide:
        mask = segment_slide(slide, segmenter, mask_mpp=8.0,
                             progress=lambda done, total: seen.append((done, total)))
        assert mask.shape == slide.thumbnail(mpp=8.0).shape[:2]
    truth = render_tissue_mask(SMALL_SPEC, mask.shape)
    return float((mask & truth).sum() / (mask | truth).sum()), seen


def test_tiles_are_stitched_where_the_tissue_is(small_slide: Path) -> None:
    card = load_segmenter_card("hest")
    net = _SaturationNet(card.normalization.mean, card.normalization.std)
    iou, seen = _stitched_iou(small_slide, Segmenter(net, card, device="cpu"))
    assert iou > 0.9
    # 4096 x 3072 px at 0.5 µm/px = 2048 x 1536 µm: 4 x 3 tiles of 512 µm
    assert seen[-1] == (12, 12)
    assert 0 < net.tiles_seen < 12  # tiles of bare glass were not run


def test_compute_tissue_mask_with_hest_runs_the_real_network(tiny_slide: Path,
                                                             tmp_path: Path) -> None:
    ckpt = tmp_path / "hest.ckpt"
    _hest_lightning_checkpoint(ckpt)
    params = TissueParams(method="hest", segmenter_weights=str(ckpt))
    with open_slide(tiny_slide) as slide:
        tm = compute_tissue_mask(slide, tissue_mpp=8.0, params=params)
        assert tm.mask.shape == slide.thumbnail(mpp=8.0).shape[:2]
    assert tm.mask.dtype == np.bool_  # random weights: the mask's content means nothing


def test_cli_tissue_with_hest(tiny_slide: Path, tmp_path: Path) -> None:
    done = run("tissue", tiny_slide, "--method", "hest", "--out", tmp_path / "m.png")
    assert done.returncode == 2
    assert "segmenter's weights" in done.stderr and "Traceback" not in done.stderr
    done = run("tissue", tiny_slide, "--segmenter-weights", tmp_path / "x.ckpt",
               "--out", tmp_path / "m.png")
    assert done.returncode == 2 and "--method hest" in done.stderr
    ckpt = tmp_path / "hest.ckpt"
    _hest_lightning_checkpoint(ckpt)
    done = run("tissue", tiny_slide, "--method", "hest", "--segmenter-weights", ckpt,
               "--out", tmp_path / "m.png")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "m.png").stat().st_size > 0


def test_tiled_inference_equals_a_plain_whole_tile_reference(small_slide: Path) -> None:
    # The reference: every tile read at level 0 and resized to 512 px, run, stitched at
    # 1 µm/px, then averaged down to the mask's size; no glass skip, no banding.
    import cv2

    card = load_segmenter_card("hest")
    net = _SaturationNet(card.normalization.mean, card.normalization.std)
    segmenter = Segmenter(net, card, device="cpu")
    with open_slide(small_slide) as slide:
        mask = segment_slide(slide, segmenter, mask_mpp=8.0)
        w, h = slide.dimensions
        side0 = round(card.tile_px * card.tile_mpp / slide.mpp[0])  # 1024 level-0 px
        cols, rows = -(-w // side0), -(-h // side0)
        stitched = np.zeros((rows * card.tile_px, cols * card.tile_px), np.uint8)
        for row in range(rows):
            for col in range(cols):
                region = slide.read_region((col * side0, row * side0), 0, (side0, side0))
                tile = cv2.resize(region, (card.tile_px, card.tile_px),
                                  interpolation=cv2.INTER_AREA)
                stitched[row * card.tile_px:(row + 1) * card.tile_px,
                         col * card.tile_px:(col + 1) * card.tile_px] = segmenter.tissue(
                             tile[None])[0]
    um_w, um_h = round(w * slide.mpp[0]), round(h * slide.mpp[1])  # 1 µm/px
    reference = cv2.resize(stitched[:um_h, :um_w] * 255, mask.shape[::-1],
                           interpolation=cv2.INTER_AREA) >= 128
    iou = (mask & reference).sum() / (mask | reference).sum()
    assert iou >= 0.99


def test_the_cli_options_check_the_tissue_method(tmp_path: Path) -> None:
    # what score, plan, patches and tissue build their detection from (each CLI error is
    # its one line and exit 2, tested with the commands)
    from wsi_sampler.cli.options import ExclusionArgs, MethodOpt, tissue_params

    with pytest.raises(InvalidRequestError, match="--tissue-method"):
        tissue_params(MethodOpt.auto, tmp_path / "x.ckpt")
    with pytest.raises(InvalidRequestError, match="segmenter's weights"):
        tissue_params(MethodOpt.hest, None)
    with pytest.raises(InvalidRequestError, match="no such file"):
        tissue_params(MethodOpt.auto, None, ExclusionArgs(weights=tmp_path / "missing.pth"))
    fast = tissue_params(MethodOpt.hest_fast, tmp_path / "w.ckpt",
                         ExclusionArgs(exclude="pen,dark", max_share=0.3, strict=True))
    assert (fast.method, fast.exclude_artifacts, fast.max_excluded_share,
            fast.strict_exclusion) == ("hest-fast", ("pen", "dark"), 0.3, True)


# -- GrandQC ------------------------------------------------------------------------------
def _grandqc_state_dict(path: Path, *, drop: str | None = None, winner: int | None = None
                        ) -> dict[str, torch.Tensor]:
    """What GrandQC's Tissue_Detection_MPP10.pth holds: the smp UNet++ state dict, plain
    (random weights of the real architecture; ``winner``: that class wins every pixel)."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(1)
    with warnings.catch_warnings():  # smp deprecates the "timm-" name GrandQC trained with
        warnings.simplefilter("ignore", DeprecationWarning)
        model = smp.UnetPlusPlus(encoder_name="timm-efficientnet-b0", encoder_weights=None,
                                 classes=2, activation=None)
    _make_win(model, winner)
    state = {k: v for k, v in model.state_dict().items() if k != drop}
    torch.save(state, path)
    return model.state_dict()


def test_grandqc_card_architecture_and_checkpoint(tmp_path: Path) -> None:
    card = load_segmenter_card("grandqc")
    assert (card.tile_px, card.tile_mpp, card.tissue_class, card.jpeg_quality) == (
        512, 10.0, 0, 80)
    _published_size_and_strict_load(card, tmp_path / "Tissue_Detection_MPP10.pth",
                                    _grandqc_state_dict, "segmentation_head.0.weight")


def _published_size_and_strict_load(card: SegmenterCard, pth: Path, save: Any, key: str
                                    ) -> None:
    """The card's architecture has its published size on meta; random weights saved by
    ``save`` (the publisher's layout) load strictly and equal; without ``key`` the load
    fails naming it."""
    assert card.provenance is not None and card.provenance.parameters is not None
    with torch.device("meta"):
        count = sum(p.numel() for p in build_segmenter(card).parameters())
    assert abs(count - card.provenance.parameters) <= card.provenance.parameters_tolerance * count
    expected = save(pth)
    loaded = load_segmenter(card.name, weights=pth, device="cpu").module.state_dict()
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    save(pth, drop=key)
    with pytest.raises(ModelLoadError, match=key.replace(".", r"\.")):
        load_segmenter(card.name, weights=pth, device="cpu")


def test_grandqc_tiles_the_thumbnail_and_keeps_only_the_edge_overhang(
    small_slide: Path
) -> None:
    # 4096 x 3072 px at 0.5 µm/px, at 2 µm/px: 1024 x 768, two tiles across and two down,
    # the lower row shifted up to end at the edge. A stand-in that calls tissue where the
    # pixel is coloured must give the drawn tissue.
    card = load_segmenter_card("grandqc").model_copy(update={"tile_mpp": 2.0})
    net = _SaturationNet(card.normalization.mean, card.normalization.std)
    flipped = _Flipped(net)  # class 0 = tissue for GrandQC
    iou, seen = _stitched_iou(small_slide, Segmenter(flipped, card, device="cpu"))
    assert iou > 0.9
    assert seen[-1] == (4, 4) and net.tiles_seen == 4


class _Flipped(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)["out"].flip(1)  # a bare tensor, as smp models return


def test_cli_tissue_with_grandqc_runs_the_real_network(small_slide: Path,
                                                       tmp_path: Path) -> None:
    pth = tmp_path / "Tissue_Detection_MPP10.pth"
    _grandqc_state_dict(pth)
    done = run("tissue", small_slide, "--method", "grandqc", "--segmenter-weights", pth,
               "--out", tmp_path / "m.png")
    assert done.returncode == 0, done.stderr
    done = run("tissue", small_slide, "--method", "grandqc", "--out", tmp_path / "m.png")
    assert done.returncode == 2 and "Tissue_Detection_MPP10.pth" in done.stderr


# -- GrandQC artefacts ----------------------------------------------------------------------
def _make_win(model: nn.Module, winner: int | None) -> None:
    """Bias the segmentation head so that class ``winner`` wins every pixel."""
    if winner is not None:
        with torch.no_grad():
            bias = model.segmentation_head[0].bias
            bias.fill_(-100.0)
            bias[winner] = 100.0


def _grandqc_artifact_state_dict(path: Path, *, drop: str | None = None,
                                 winner: int | None = None) -> dict[str, torch.Tensor]:
    """What TRIDENT's GrandQC_MPP1_state_dict.pth holds: the smp U-Net (EfficientNet-B0,
    8 classes) state dict, plain (random weights of the real architecture; ``winner``: that
    class wins every pixel)."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = smp.Unet(encoder_name="timm-efficientnet-b0", encoder_weights=None,
                         classes=8, activation=None)
    _make_win(model, winner)
    torch.save({k: v for k, v in model.state_dict().items() if k != drop}, path)
    return model.state_dict()


def test_grandqc_artifact_cards_architecture_and_checkpoint(tmp_path: Path) -> None:
    names = segmenter_catalogue_names()
    assert {"grandqc-artifacts", "grandqc-artifacts-mpp15", "grandqc-artifacts-mpp2"} <= set(names)
    card = load_segmenter_card("grandqc-artifacts")
    assert (card.role, card.tile_px, card.tile_mpp, card.tissue_class,
            card.background_class) == ("artifacts", 512, 1.0, 1, 7)
    assert card.artifact_classes == {"fold": 2, "dark_spot": 3, "pen": 4, "air_bubble": 5,
                                     "out_of_focus": 6}
    assert [load_segmenter_card(f"grandqc-artifacts-{v}").tile_mpp
            for v in ("mpp15", "mpp2")] == [1.5, 2.0]
    _published_size_and_strict_load(card, tmp_path / "GrandQC_MPP1_state_dict.pth",
                                    _grandqc_artifact_state_dict,
                                    "decoder.blocks.0.conv1.0.weight")
    # GrandQC's own Zenodo files are pickled whole models: refused, with the way out
    torch.save(torch.nn.Linear(2, 2), tmp_path / "GrandQC_MPP15.pth")
    with pytest.raises(ModelLoadError, match=r"state_dict\(\)"):
        load_segmenter("grandqc-artifacts-mpp15", weights=tmp_path / "GrandQC_MPP15.pth")


class _ArtifactColourNet(nn.Module):
    """A stand-in with the artefact model's interface (normalised NCHW in, 8-class logits
    out) that calls blue ink pen (4), near-black dark spot (3), grey glass background (7) and
    other colour tissue (1): it tests the tiling, the class map and the exclusion against a
    slide where each is drawn."""

    def __init__(self, card_mean: tuple[float, ...], card_std: tuple[float, ...]) -> None:
        super().__init__()
        self.mean = torch.tensor(card_mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(card_std).view(1, 3, 1, 1) * 255
        self.tiles_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.tiles_seen += len(x)
        rgb = x * self.std + self.mean
        r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
        cls = torch.full_like(r, 1, dtype=torch.long)
        cls[(rgb.amax(dim=1) - rgb.amin(dim=1)) < 20] = 7
        cls[(b > r + 40) & (b > g + 40)] = 4
        cls[rgb.amax(dim=1) < 60] = 3
        return torch.nn.functional.one_hot(cls, 8).permute(0, 3, 1, 2).float() * 10


def _artefact_slide(path: Path) -> dict[str, np.ndarray]:
    """A 4096 x 3072 slide at 0.5 µm/px: a pink tissue ellipse crossed by a blue pen
    stroke, with a black spot on it; returns each drawn region at full resolution."""
    import cv2
    import tifffile

    img = np.full((3072, 4096, 3), 240, np.uint8)
    tissue = np.zeros(img.shape[:2], np.uint8)
    cv2.ellipse(tissue, (1700, 1500), (1300, 1100), 0, 0, 360, 1, -1)
    img[tissue > 0] = (215, 120, 170)
    pen = np.zeros_like(tissue)
    cv2.line(pen, (500, 900), (3000, 1100), 1, 120)
    img[pen > 0] = (40, 60, 200)
    dark = np.zeros_like(tissue)
    cv2.circle(dark, (1500, 2000), 220, 1, -1)
    img[dark > 0] = (50, 15, 55)  # saturated: the tissue detector keeps it
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb")
    return {"tissue": tissue > 0, "pen": (pen > 0) & (tissue > 0), "dark_spot": dark > 0}


def test_artifact_map_lands_where_the_artefacts_are_and_plans_drop_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cv2

    import wsi_sampler.segmenters as segmenters
    from wsi_sampler.plan import PlanParams, make_plan

    drawn = _artefact_slide(tmp_path / "artefacts.tif")
    card = load_segmenter_card("grandqc-artifacts")
    net = _ArtifactColourNet(card.normalization.mean, card.normalization.std)
    monkeypatch.setattr(segmenters, "cached_segmenter",
                        lambda name, weights: Segmenter(net, load_segmenter_card(name),
                                                        device="cpu"))
    params = TissueParams(artifact_weights="stand-in.pth", exclude_artifacts=("pen",))
    with open_slide(tmp_path / "artefacts.tif", mpp_override=0.5) as slide:
        tm = compute_tissue_mask(slide, tissue_mpp=8.0, params=params)
        dropped = make_plan(slide, PlanParams(tissue=params), tissue=tm)
        kept = make_plan(slide, PlanParams(tissue=TissueParams(
            artifact_weights="x", exclude_artifacts=("pen",), max_excluded_share=0.0)),
            tissue=tm)
    assert tm.exclusion is not None and tm.exclusion.detector == "grandqc-artifacts"
    # 2048 x 1536 µm in 512 µm tiles: 4 x 3, all touched by tissue but the glass corners
    assert 0 < net.tiles_seen <= 12
    seen = net.tiles_seen
    with open_slide(tmp_path / "artefacts.tif", mpp_override=0.5) as slide:
        assert compute_tissue_mask(slide, tissue_mpp=8.0, params=params) is tm
        assert compute_tissue_mask(slide, tissue_mpp=16.0, params=params) is not tm
    assert net.tiles_seen > seen  # the model ran once for 8 µm/px, again only for 16

    def at_mask(region: np.ndarray) -> np.ndarray:
        small = cv2.resize(region.astype(np.uint8), tm.mask.shape[::-1],
                           interpolation=cv2.INTER_AREA)
        return small > 0

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        return float((a & b).sum() / (a | b).sum())

    found = tm.exclusion.found
    assert iou(found["pen"], at_mask(drawn["pen"])) > 0.8
    assert iou(found["dark_spot"], at_mask(drawn["dark_spot"])) > 0.8
    assert not found["fold"].any() and not found["out_of_focus"].any()
    # only pen was asked to go: the dark spot stays in the tissue, the stroke does not
    assert not (tm.mask & found["pen"]).any() and (tm.mask & found["dark_spot"]).any()
    report = dropped.selection["exclusion"]
    drawn_pen_mm2 = drawn["pen"].sum() * 0.5 * 0.5 / 1e6
    assert report["classes"] == ["pen"]
    assert abs(report["excluded_mm2"]["pen"] / drawn_pen_mm2 - 1) < 0.25
    assert 0 < report["excluded_share"] < 0.5 and dropped.excluded is None
    assert set(report["found_mm2"]) == set(card.artifact_classes)
    assert kept.excluded is not None and 0 < kept.excluded.sum() < len(kept)
    # the QC overlay and the class map show each class where it is
    from wsi_sampler.qc import ARTIFACT_COLOURS, artifact_map, draw_qc_overlay, qc_masks

    with open_slide(tmp_path / "artefacts.tif", mpp_override=0.5) as slide:
        masks = qc_masks(slide, tm)
        overlay = draw_qc_overlay(slide.thumbnail(mpp=8.0), masks)
    image, areas = artifact_map(tm)
    inside_pen = found["pen"] & ~cv2.dilate(found["pen"].view(np.uint8) ^ 1,
                                            np.ones((3, 3), np.uint8)).view(bool)
    assert (image[found["pen"]] == ARTIFACT_COLOURS["pen"]).all()
    assert (image[found["dark_spot"]] == ARTIFACT_COLOURS["dark_spot"]).all()
    assert areas["classes"]["pen"]["mm2"] == report["found_mm2"]["pen"]
    assert 0 < areas["classes"]["pen"]["percent_of_tissue"] < 50
    pen_px = overlay[inside_pen].astype(int)  # magenta over blue ink: red and blue high
    assert (pen_px[:, 0] > pen_px[:, 1] + 40).mean() > 0.9


def test_score_excludes_artifacts_with_the_publishers_layouts_end_to_end(
    tiny_slide: Path, tmp_path: Path
) -> None:
    # The issue's command with both publishers' layouts (random weights, the head's bias set
    # so that GrandQC's tissue class and the artefact model's pen win everywhere), the real
    # networks on CPU: all the tissue is pen, so the plan keeps its patches, marked, warns,
    # and the QC files say what went.
    import json

    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "tiny.svs").write_bytes(tiny_slide.read_bytes())
    tissue_w = tmp_path / "Tissue_Detection_MPP10.pth"
    artefact_w = tmp_path / "GrandQC_MPP1_state_dict.pth"
    _grandqc_state_dict(tissue_w, winner=0)
    _grandqc_artifact_state_dict(artefact_w, winner=4)
    done = run("score", slides, "--out", tmp_path / "out", "--quiet", "--tissue-method",
               "grandqc", "--segmenter-weights", tissue_w, "--exclude-artifacts", "pen,fold",
               "--artifact-weights", artefact_w, "--qc")
    assert done.returncode == 0, done.stderr
    (result,) = (tmp_path / "out" / "slides").iterdir()
    summary = json.loads((result / "summary.json").read_text())
    exclusion = summary["exclusion"]
    assert exclusion["detector"] == "grandqc-artifacts"
    assert exclusion["classes"] == ["pen", "fold"] and exclusion["excluded_share"] == 1.0
    assert exclusion["kept_marked"] and exclusion["n_marked"] == summary["patches"] > 0
    assert "marked excluded" in summary["message"]
    header = (result / "predictions.csv").read_text().splitlines()[0].split(",")
    assert header[5] == "excluded"
    qc = json.loads((result / "qc.json").read_text())
    assert qc["artifact_detector"] == "grandqc-artifacts" and qc["excluded_share"] == 1.0
    assert qc["artifact_mm2"]["pen"] == qc["tissue_area_before_exclusion_mm2"] > 0
    assert qc["excluded_mm2"] == {"pen": qc["artifact_mm2"]["pen"], "fold": 0.0}
    assert any("grandqc-artifacts exclusion removed 100%" in w for w in qc["warnings"])
    assert (result / "qc.png").read_bytes()[:4] == b"\x89PNG"
    assert "artifact_pen_mm2" in (tmp_path / "out" / "qc.csv").read_text()
    done = run("score", slides, "--out", tmp_path / "out2", "--exclude-artifacts", "fold")
    assert done.returncode == 2 and "--artifact-weights" in done.stderr


def test_hest_fast_mode_is_hest_at_2_um_per_px(tiny_slide: Path, tmp_path: Path) -> None:
    fast, full = load_segmenter_card("hest-fast"), load_segmenter_card("hest")
    assert (fast.tile_px, fast.tile_mpp) == (512, 2.0)
    assert fast.architecture_kwargs == full.architecture_kwargs  # the same checkpoint
    ckpt = tmp_path / "deeplabv3_seg_v4.ckpt"
    _hest_lightning_checkpoint(ckpt)
    assert TissueParams(method="hest-fast", segmenter_weights=str(ckpt)).method == "hest-fast"
    seen: list[tuple[int, int]] = []
    with open_slide(tiny_slide) as slide:
        mask = segment_slide(slide, load_segmenter("hest-fast", weights=ckpt, device="cpu"),
                             mask_mpp=8.0, progress=lambda d, t: seen.append((d, t)))
        assert mask.shape == slide.thumbnail(mpp=8.0).shape[:2]
    assert seen[-1] == (1, 1)  # 512 x 384 µm: one 1024 µm tile (four at 1 µm/px)


def test_the_service_excludes_with_its_configured_artefact_model(tiny_slide: Path,
                                                                 tmp_path: Path) -> None:
    # A real uvicorn whose config names GrandQC's tissue and artefact models (random
    # weights of their layouts, tissue and pen winning everywhere): a plan request names
    # the classes, the plan keeps the
    # patches marked and says so, and the QC route shows what went.
    import httpx

    from api.app import create_app
    from tests._servers import folder_settings, serve, slide_ids

    weights = tmp_path / "GrandQC_MPP1_state_dict.pth"
    _grandqc_artifact_state_dict(weights, winner=4)
    tissue = tmp_path / "Tissue_Detection_MPP10.pth"
    _grandqc_state_dict(tissue, winner=0)  # the tiny slide is all tissue to it
    settings = folder_settings(tmp_path, {"tiny.svs": tiny_slide}, tissue_method="grandqc",
                               segmenter_weights=str(tissue), artifact_weights=str(weights))
    with serve(create_app(settings), ready_path="/readyz") as url:
        sid = slide_ids(url)["tiny.svs"]
        plan = httpx.post(f"{url}/v1/slides/{sid}/plan", timeout=120,
                          json={"exclude_artifacts": ["pen", "fold"], "patch_size_px": 64}
                          ).json()
        exclusion = plan["selection"]["exclusion"]
        assert exclusion["detector"] == "grandqc-artifacts" and exclusion["kept_marked"]
        assert plan["n_patches"] > 0 and all(p["excluded"] for p in plan["patches"])
        assert "marked excluded" in plan["message"]
        strict = httpx.post(f"{url}/v1/slides/{sid}/plan", timeout=120, json={
            "exclude_artifacts": ["fold"], "strict_exclusion": True, "patch_size_px": 64})
        assert strict.json()["selection"]["exclusion"]["excluded_share"] == 0.0
        qc = httpx.get(f"{url}/v1/slides/{sid}/qc", timeout=120).json()
        assert qc["artifact_detector"] == "grandqc-artifacts"
        assert qc["artifact_mm2"]["pen"] > 0 and qc["excluded_share"] == 1.0
        png = httpx.get(f"{url}/v1/slides/{sid}/qc.png", timeout=120)
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
        # a request may detect classically instead; HEST's segmenter needs HEST's weights
        classical = httpx.post(f"{url}/v1/slides/{sid}/plan", timeout=120, json={
            "tissue_method": "brightfield", "patch_size_px": 64}).json()
        assert classical["n_patches"] < plan["n_patches"]  # the random GrandQC: all tissue
        refused = httpx.post(f"{url}/v1/slides/{sid}/plan", json={"tissue_method": "hest"})
        assert refused.status_code == 422
        assert "its tissue_method is 'grandqc'" in refused.json()["error"]
    # a weights file that is not there stops the service at startup, naming the key
    from types import SimpleNamespace

    from api.app import _checked_tissue_params

    bad = settings.model_copy(update={"artifact_weights": str(tmp_path / "missing.pth")})
    with pytest.raises(ValueError, match="artifact_weights: .*missing.pth: no such file"):
        _checked_tissue_params(SimpleNamespace(settings=bad))  # type: ignore[arg-type]
