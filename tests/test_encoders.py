"""Foundation encoders and feature bags: the catalogue proven without its weights (meta-device
builds; strict loads of random weights of the same architecture in the published file
format), pooling, load errors, and feature h5 files read the way CLAM, TRIDENT and MIL code
read them."""

from __future__ import annotations

import base64
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import h5py
import httpx
import numpy as np
import pytest
import torch
from _cli import run_cli
from _servers import serve, slide_ids

from api.app import create_app
from api.config import Settings
from wsi_sampler import Extractor, PlanParams, open_slide
from wsi_sampler.errors import ModelLoadError, ModelNotFoundError
from wsi_sampler.features import read_features_h5
from wsi_sampler.models import ModelCard, catalogue_card, catalogue_names, load_model
from wsi_sampler.models.encoder import build_encoder, build_timm
from wsi_sampler.scoring import OutputOptions, score_slide
from wsi_sampler.worker import InProcessWorker

timm = pytest.importorskip("timm", reason="timm is installed by make test (extra 'timm')")
from safetensors.torch import save_file  # noqa: E402  (after the timm skip)

PATCHES = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)


def _arch(card: ModelCard) -> str:
    return card.architecture.removeprefix("timm:")


def _shrunk(card: ModelCard, **extra: Any) -> ModelCard:
    """The same architecture with one block: every layer kind and key name, little memory."""
    kwargs = dict(card.timm_kwargs)
    if "vit" in _arch(card) or card.architecture == "builtin:conch-v1":
        kwargs["depth"] = 1
    return ModelCard.model_validate(card.model_dump() | {"timm_kwargs": kwargs} | extra)


def _swin_original(module: torch.nn.Module) -> dict[str, object]:
    """What Swin's original code (and CTransPath's timm 0.5.4) saves: {"model": state} with
    each stage's downsample at the end of stage i (timm: start of i + 1) and the relative
    position index and attention mask buffers stored (timm recomputes them)."""
    import re

    state = {re.sub(r"^layers\.(\d+)\.downsample\.",
                    lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k): v
             for k, v in module.state_dict().items()}
    for name, buffer in module.named_buffers():
        if name.rsplit(".", 1)[-1] in ("relative_position_index", "attn_mask"):
            state[name] = buffer
    return {"model": state}


def _conch_coca(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CONCH's pytorch_model.bin: the whole CoCa model, the image encoder under visual.,
    beside the parts features do not use (text tower, caption decoder and pooler, the
    contrastive projection, the logit scale; one small tensor each stands for them)."""
    state = {f"visual.{k}": v for k, v in module.state_dict().items()}
    state |= {"visual.attn_pool_caption.query": torch.zeros(256, 768),
              "visual.ln_caption.weight": torch.ones(768),
              "visual.proj_contrast": torch.zeros(512, 512),
              "text.token_embedding.weight": torch.zeros(32007, 8),
              "text_decoder.resblocks.0.ln_1.weight": torch.ones(768),
              "logit_scale": torch.tensor(4.6)}
    return state


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    """In the format the publisher ships: safetensors, or a torch.save'd state dict."""
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, str(path))


def _patches(card: ModelCard) -> np.ndarray:
    size = card.patch_size_px
    return PATCHES if size == 224 else np.random.default_rng(0).integers(
        0, 256, (3, size, size, 3), dtype=np.uint8)


def _pooled(module: torch.nn.Module, card: ModelCard, patches: np.ndarray) -> np.ndarray:
    """What the model card says the embedding is, computed straight from the timm module."""
    mean = torch.tensor(card.normalization.mean).view(1, 3, 1, 1)
    std = torch.tensor(card.normalization.std).view(1, 3, 1, 1)
    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float()
    if card.input_size_px:  # the publisher's Resize (bicubic) to the model's input
        size = (card.input_size_px, card.input_size_px)
        x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", antialias=True)
        x = x.clamp(0, 255)
    x = (x / 255 - mean) / std
    with torch.inference_mode():
        if card.pooling == "model":
            return module(x).numpy()
        tokens = module.forward_features(x)
        post = getattr(module, "fc_norm", torch.nn.Identity())
        cls, rest = post(tokens[:, 0]), post(tokens[:, module.num_prefix_tokens:].mean(1))
        out = {"cls": cls, "mean": rest, "cls+mean": torch.cat([cls, rest], -1)}
        return out[card.pooling].numpy()


# -- the catalogue, without its weights -----------------------------------------------------
@pytest.mark.parametrize("name", catalogue_names())
def test_catalogue_card_builds_with_its_published_dimensions_and_size(name: str) -> None:
    card = catalogue_card(name)
    prov = card.provenance
    assert prov is not None and prov.sources and prov.licence and prov.weights_url
    side = card.input_size_px or card.patch_size_px
    with torch.device("meta"):
        module = build_encoder(card)
        out = module(torch.empty(2, 3, side, side))
    assert tuple(out.shape) == (2, card.outputs[0].width)
    if prov.parameters is not None:
        params = sum(p.numel() for p in module.parameters())
        assert abs(params - prov.parameters) <= prov.parameters_tolerance * prov.parameters, (
            f"{name}: {params:,} parameters, published {prov.parameters:,}")


@pytest.mark.parametrize("name", catalogue_names())
def test_random_weights_in_the_published_format_load_strictly(name: str, tmp_path: Path) -> None:
    card = _shrunk(catalogue_card(name))
    torch.manual_seed(0)
    module = build_encoder(card).eval()
    backbone = getattr(module, "backbone", module)
    assert card.provenance is not None
    weights = tmp_path / card.provenance.weights_file
    if card.weights_layout == "swin-original":
        torch.save(_swin_original(backbone), weights)
    elif card.architecture == "builtin:conch-v1":
        torch.save(_conch_coca(backbone), weights)
    else:
        _save(backbone.state_dict(), weights)
    card_path = tmp_path / "card.json"
    card_path.write_text(card.model_dump_json())
    loaded = load_model(card_path, weights=weights, device="cpu")
    patches = _patches(card)
    got = loaded.predict(patches)["embedding"]
    np.testing.assert_allclose(got, _pooled(backbone, card, patches), rtol=1e-4, atol=1e-4)


def test_catalogue_names_load_directly_and_need_their_weights(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_sampler.models import loaders

    with monkeypatch.context() as mp:  # said before a ViT-H is built (~18 s on 2 cores)
        mp.setattr(loaders, "build_encoder", lambda *a, **k: pytest.fail("built first"))
        with pytest.raises(ModelLoadError, match=r"huggingface.co/MahmoodLab/UNI2-h.*--weights"):
            load_model("uni2-h", device="cpu")
        with pytest.raises(ModelNotFoundError, match="not found"):
            load_model("uni2-h", device="cpu", weights=tmp_path / "missing.bin")
    model = load_model("vit-s16", device="cpu", allow_random_weights=True)
    assert model.predict(PATCHES[:1])["embedding"].shape == (1, 384)


# -- load errors ----------------------------------------------------------------------------
def test_weights_that_do_not_fit_name_the_first_mismatching_key(tmp_path: Path) -> None:
    small = catalogue_card("vit-s16")
    _save(timm.create_model("vit_small_patch16_224", num_classes=0).state_dict(),
          tmp_path / "vits.bin")
    uni = tmp_path / "uni.json"
    uni.write_text(_shrunk(catalogue_card("uni")).model_dump_json())
    with pytest.raises(ModelLoadError, match=r"key 'cls_token' has shape \(1, 1, 384\) in the "
                                             r"file, \(1, 1, 1024\) in the model"):
        load_model(uni, weights=tmp_path / "vits.bin", device="cpu")
    def wrapped(num_classes: int) -> dict[str, Any]:
        module = timm.create_model("vit_small_patch16_224", num_classes=num_classes)
        return {"state_dict": {f"module.{k}": v for k, v in module.state_dict().items()}}

    torch.save(wrapped(0), tmp_path / "wrapped.pth")
    with pytest.raises(ModelLoadError, match="start with 'module.': set weights_key_prefix"):
        load_model("vit-s16", weights=tmp_path / "wrapped.pth", device="cpu")
    prefixed = tmp_path / "prefixed.json"
    prefixed.write_text(small.model_copy(update={"weights_key_prefix": "module."}
                                         ).model_dump_json())
    extra = wrapped(0)
    extra["state_dict"]["module.neck.weight"] = torch.zeros(3)
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ModelLoadError, match="'neck.weight' in the file is not in the model"):
        load_model(prefixed, weights=tmp_path / "extra.pth", device="cpu")
    assert load_model(prefixed, weights=tmp_path / "wrapped.pth", device="cpu").name == "vit-s16"
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ModelLoadError, match="not a readable .safetensors weights file"):
        load_model("vit-s16", weights=tmp_path / "junk.safetensors", device="cpu")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="expected one of .safetensors"):
        load_model("vit-s16", weights=tmp_path / "w.npz", device="cpu")


def test_a_checkpoint_with_a_classifier_head_loads_into_an_embedding_card(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # timm's ``*_ft_in1k`` files carry the 1000-class head: the card names its keys, drops
    # them and says so; the backbone is loaded strictly and gives the same embedding.
    torch.manual_seed(1)
    classifier = timm.create_model("vit_small_patch16_224", num_classes=1000).eval()
    _save(classifier.state_dict(), tmp_path / "model.safetensors")
    with caplog.at_level(logging.INFO, logger="wsi_sampler.models.loaders"):
        model = load_model("vit-s16", weights=tmp_path / "model.safetensors", device="cpu")
    assert "dropped the classifier head head.weight, head.bias" in caplog.text
    with torch.inference_mode():
        x = torch.from_numpy(PATCHES).permute(0, 3, 1, 2).float() / 255
        expected = classifier.forward_head(classifier.forward_features((x - 0.5) / 0.5),
                                           pre_logits=True)
    np.testing.assert_allclose(model.predict(PATCHES)["embedding"], expected.numpy(),
                               rtol=1e-4, atol=1e-4)
    resnet = timm.create_model("resnet50", num_classes=1000)
    _save(resnet.state_dict(), tmp_path / "resnet.safetensors")
    assert load_model("resnet50", weights=tmp_path / "resnet.safetensors",
                      device="cpu").name == "resnet50"


def test_card_validation_of_timm_arguments(tmp_path: Path) -> None:
    base = catalogue_card("vit-s16").model_dump()
    with pytest.raises(ValueError, match="must not set num_classes"):
        ModelCard.model_validate(base | {"timm_kwargs": {"num_classes": 3}})
    with pytest.raises(ValueError, match="timm:<arch> models only"):
        ModelCard.model_validate(base | {"architecture": "torchscript"})
    bad = ModelCard.model_validate(base | {"timm_kwargs": {"mlp_layer": "Transformer"}})
    with pytest.raises(ModelLoadError, match="unknown layer 'Transformer'.*SwiGLUPacked"):
        build_timm(bad, "vit_small_patch16_224", 0)
    cnn = ModelCard.model_validate(catalogue_card("resnet50").model_dump() | {"pooling": "cls"})
    with pytest.raises(ModelLoadError, match="needs a ViT"):
        build_timm(cnn, "resnet50", 0)


@pytest.mark.parametrize(("pooling", "width"), [("model", 192), ("cls", 192), ("mean", 192),
                                                ("cls+mean", 384)])
def test_pooling_of_a_tiny_vit_with_register_tokens(pooling: str, width: int,
                                                    tmp_path: Path) -> None:
    card = ModelCard.model_validate({
        "name": "tiny-vit", "architecture": "timm:vit_tiny_patch16_224", "patch_size_px": 224,
        "target_mpp": 0.5, "pooling": pooling, "outputs": [{"name": "embedding", "dim": width}],
        "timm_kwargs": {"depth": 2, "reg_tokens": 2, "global_pool": "avg"}})
    torch.manual_seed(1)
    backbone = timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=2, reg_tokens=2,
                                 global_pool="avg").eval()
    assert backbone.num_prefix_tokens == 3  # class token + 2 registers, all skipped by "mean"
    save_file(backbone.state_dict(), str(tmp_path / "w.safetensors"))
    (tmp_path / "card.json").write_text(card.model_dump_json())
    got = load_model(tmp_path / "card.json", weights=tmp_path / "w.safetensors",
                     device="cpu").predict(PATCHES)["embedding"]
    np.testing.assert_allclose(got, _pooled(backbone, card, PATCHES), rtol=1e-4, atol=1e-5)
    if pooling == "mean":  # timm's own "avg" pool skips the same prefix tokens
        np.testing.assert_allclose(got, _pooled(backbone, card.model_copy(
            update={"pooling": "model"}), PATCHES), rtol=1e-4, atol=1e-5)


# -- feature bags ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vits_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("vits") / "model.safetensors"
    save_file(timm.create_model("vit_small_patch16_224", num_classes=0).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def vits(vits_weights: Path) -> InProcessWorker:
    return InProcessWorker(load_model("vit-s16", weights=vits_weights, device="cpu"))


def test_feature_bag_reads_the_way_clam_and_trident_read_it(
        demo_slide: Path, vits: InProcessWorker, tmp_path: Path) -> None:
    import openslide

    params = PlanParams(strategy="random", n_patches=12, seed=4)
    with open_slide(demo_slide) as slide:
        result = score_slide(slide, params, vits, tmp_path,
                             options=OutputOptions(clam_pt=True))
        patches = np.concatenate([b.images for b in Extractor(slide, result.plan).iter_batches()])
    # MIL code (CLAM's Generic_MIL_Dataset with use_h5, TRIDENT's feature loaders)
    with h5py.File(tmp_path / "features.h5", "r") as f:
        features = torch.from_numpy(f["features"][:])
        coords = f["coords"][:]
        attrs = dict(f["coords"].attrs)
    assert features.shape == (12, 384) and coords.shape == (12, 2) and coords.dtype == np.int64
    np.testing.assert_array_equal(coords, result.plan.coords)
    np.testing.assert_allclose(features.numpy(), vits.infer(patches)["embedding"], atol=1e-5)
    pt = torch.load(tmp_path / "features.pt", weights_only=True)
    assert torch.equal(pt, features)
    # TRIDENT: read_coords -> patcher(patch_size, src_mag=level0_mag, dst_mag=target_mag)
    w0 = result.plan.width0
    assert attrs["patch_size"] * attrs["level0_magnification"] / attrs[
        "target_magnification"] == w0 == attrs["patch_size_level0"]
    assert (attrs["level0_width"], attrs["level0_height"]) == result.plan.slide_dimensions
    # CLAM: Whole_Slide_Bag_FP reads patch_size px at patch_level; same region, same pixels
    wsi = openslide.OpenSlide(str(demo_slide))
    ds = wsi.level_downsamples[int(attrs["patch_level"])]
    assert attrs["patch_size"] * ds == pytest.approx(w0)
    import cv2

    for i in (0, 7):
        region = wsi.read_region(tuple(int(v) for v in coords[i]), int(attrs["patch_level"]),
                                 (int(attrs["patch_size"]),) * 2).convert("RGB")
        resized = cv2.resize(np.asarray(region), (224, 224), interpolation=cv2.INTER_AREA)
        assert np.abs(resized.astype(int) - patches[i].astype(int)).mean() < 1.0
    bag = read_features_h5(tmp_path / "features.h5")
    assert bag.card.name == "vit-s16" and bag.attrs["slide_fingerprint"] == slide.fingerprint
    header = (tmp_path / "predictions.csv").read_text().splitlines()[0]
    assert header == "minx,miny,width,height,tissue_fraction"  # no 384 text columns


def test_float16_bags_and_the_patch_size_frames(demo_slide: Path, vits: InProcessWorker,
                                                tmp_path: Path) -> None:
    with open_slide(demo_slide) as slide:  # 0.25 µm/px scan, 0.5 µm/px encoder
        result = score_slide(slide, PlanParams(strategy="random", n_patches=3), vits, tmp_path,
                             options=OutputOptions(features_dtype="float16", clam_pt=True))
    bag = read_features_h5(tmp_path / "features.h5")
    assert bag.features.dtype == np.float16
    pt = torch.load(tmp_path / "features.pt", weights_only=True)  # one dtype for both files
    assert pt.dtype == torch.float16 and torch.equal(pt, torch.from_numpy(bag.features))
    np.testing.assert_allclose(bag.features, result.features, rtol=2e-3, atol=2e-3)
    a = bag.coords_attrs
    assert (a["patch_size_px"], a["target_mpp"], a["model_magnification"]) == (224, 0.5, 20)
    assert (a["patch_level"], a["patch_size"], a["target_magnification"]) == (0, 448, 40)


def test_score_cli_writes_feature_bags_for_a_catalogue_encoder(
        demo_slide: Path, vits_weights: Path, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(demo_slide, slides / "a.svs")
    cmd = ["score", str(slides), "-o", str(tmp_path / "out"), "--model", "vit-s16",
           "--weights", str(vits_weights), "--strategy", "random", "-n", "5", "-q"]
    done = run_cli(*cmd)  # in this process: torch and timm are imported already
    assert done.returncode == 0, done.stderr
    (bag,) = (tmp_path / "out" / "slides").glob("*/features.h5")
    assert read_features_h5(bag).features.shape == (5, 384)
    missing = run_cli(*cmd[:4], "--model", "uni2-h")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "needs its weights file" in missing.stderr


def _decode(rec: dict[str, Any]) -> np.ndarray:
    emb = rec["embedding"]
    return np.frombuffer(base64.b64decode(emb["data"]), "<f2" if emb["dtype"] == "float16"
                         else "<f4").reshape(emb["shape"])


def test_api_streams_embeddings_in_binary_and_jobs_return_the_bag(
        demo_slide: Path, vits: InProcessWorker, tmp_path: Path) -> None:
    root = tmp_path / "slides"
    root.mkdir()
    shutil.copy(demo_slide, root / "demo.svs")
    settings = Settings(slide_roots=[root], data_dir=tmp_path / "data", demo_slide=False)
    with serve(create_app(settings, worker_factory=lambda: vits), ready_path="/readyz") as url:
        sid = slide_ids(url)["demo.svs"]
        body = {"strategy": "random", "n_patches": 4, "seed": 1}
        lines = httpx.post(f"{url}/v1/slides/{sid}/predictions", json=body, timeout=60).text
        records = [json.loads(x) for x in lines.splitlines()]
        patches = [r for r in records if r["type"] == "patch"]
        assert len(patches) == 4 and records[-1]["type"] == "summary"
        got = np.stack([_decode(r) for r in patches]).astype(np.float32)
        with open_slide(demo_slide) as slide:
            from wsi_sampler import make_plan
            from wsi_sampler.scoring import model_plan_params

            plan = make_plan(slide, model_plan_params(vits.card, PlanParams(
                strategy="random", n_patches=4, seed=1)))
            images = np.concatenate([b.images for b in Extractor(slide, plan).iter_batches()])
        np.testing.assert_allclose(got, vits.infer(images)["embedding"], rtol=2e-3, atol=2e-3)
        assert len(lines) < 4 * 2000  # 384 float16 in base64, not 384 JSON numbers
        full = httpx.post(f"{url}/v1/slides/{sid}/predictions", json=body, timeout=60,
                          params={"embedding_format": "base64-float32"}).text
        first = json.loads(full.splitlines()[0])
        np.testing.assert_allclose(_decode(first), vits.infer(images[:1])["embedding"][0],
                                   atol=1e-5)
        none = httpx.post(f"{url}/v1/slides/{sid}/predictions", json=body, timeout=60,
                          params={"embedding_format": "none"}).text
        assert "embedding" not in json.loads(none.splitlines()[0])
        job = httpx.post(f"{url}/v1/jobs", json={"slides": [sid], "sampling": body}).json()
        deadline = time.monotonic() + 120
        while (st := httpx.get(f"{url}/v1/jobs/{job['id']}").json())["state"] in (
                "queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert st["state"] == "succeeded", st
        (h5,) = [r for r in st["results"] if r["name"].endswith("features.h5")]
        assert h5["media_type"] == "application/x-hdf5"
        (tmp_path / "job.h5").write_bytes(httpx.get(url + h5["url"]).content)
        np.testing.assert_allclose(read_features_h5(tmp_path / "job.h5").features, got,
                                   rtol=2e-3, atol=2e-3)


def test_a_batch_that_does_not_fit_is_split_and_the_size_remembered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model("tissue-qc", device="cpu")
    patches = np.random.default_rng(3).integers(0, 256, (10, 224, 224, 3), dtype=np.uint8)
    expected = model.predict(patches)
    forward = model._forward
    sizes: list[int] = []

    def small_memory(x: torch.Tensor) -> list[torch.Tensor]:
        sizes.append(len(x))
        if len(x) > 4:  # as a GPU does when the batch does not fit
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(x)

    monkeypatch.setattr(model, "_forward", small_memory)
    got = model.predict(patches)
    assert model.batch_limit == 2 and sizes == [10, 5, 2, 2, 2, 2, 2]
    for name, values in expected.items():
        np.testing.assert_allclose(got[name], values, rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(model, "_forward", lambda x: (_ for _ in ()).throw(
        torch.OutOfMemoryError("simulated")))
    with pytest.raises(ModelLoadError, match="does not fit .* even for one patch"):
        model.predict(patches[:2])


def test_ctranspath_reads_the_publishers_swin_layout() -> None:
    # CHIEF_CTransPath.pth's layout (timm_ctp 0.5.4): downsample keys at the end of stages
    # 0-2 and the attention masks of the shifted blocks TRIDENT filters out.
    card = catalogue_card("ctranspath")
    torch.manual_seed(0)
    module = build_encoder(card).eval()
    stored = _swin_original(module)["model"]
    assert isinstance(stored, dict)
    assert "layers.0.downsample.reduction.weight" in stored
    assert "layers.3.downsample.reduction.weight" not in stored
    masks = sorted(k.removesuffix(".attn_mask") for k in stored if k.endswith("attn_mask"))
    assert masks == ["layers.0.blocks.1", "layers.1.blocks.1", "layers.2.blocks.1",
                     "layers.2.blocks.3", "layers.2.blocks.5"]
    from wsi_sampler.models.loaders import swin_original_to_timm

    assert swin_original_to_timm(stored).keys() == module.state_dict().keys()
