"""Slide-level models: each architecture built on meta with its parameter count, random
weights saved in its training code's checkpoint layout and loaded strictly, outputs equal to
the published equations computed a second time here, bags in our, TRIDENT's and CLAM's
layouts, and the heatmap drawn where the attention is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from wsi_sampler.errors import InvalidRequestError, ModelLoadError
from wsi_sampler.slide_models import SlideModelCard, load_slide_model, predict_bag, read_bag
from wsi_sampler.slide_models.architectures import build_architecture
from wsi_sampler.slide_models.heatmap import colormap_rgb, percentiles

RNG = np.random.default_rng(7)
UNI_DIM = 1024  # the encoder of the cards below: UNI (1024-d)


def _card(tmp_path: Path, architecture: str, classes: tuple[str, ...] = ("normal", "tumor"),
          **kwargs: Any) -> Path:
    path = tmp_path / f"{architecture}.json"
    path.write_text(json.dumps({
        "kind": "slide", "name": f"task-{architecture}", "architecture": architecture,
        "architecture_kwargs": kwargs, "class_names": list(classes), "patch_encoder": "uni"}))
    return path


def _randomised(module: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for every tensor (not the architecture's own init, which zeroes biases)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in module.state_dict().items()}


def _bag(n: int = 37, dim: int = UNI_DIM) -> np.ndarray:
    return RNG.normal(size=(n, dim)).astype(np.float32)


# -- parameter counts on meta (the layer shapes of each publisher's code) ----------------------
def _linear(i: int, o: int) -> int:
    return i * o + o


def _clam_count(e: int, c: int, attn: int, branches: int, bag_heads: int) -> int:
    fc, gate = _linear(e, 512), 2 * _linear(512, attn) + _linear(attn, branches)
    return fc + gate + bag_heads + c * _linear(512, 2)


@pytest.mark.parametrize(("arch", "kwargs", "classes", "expected"), [
    ("clam_sb", {}, 2, _clam_count(UNI_DIM, 2, 256, 1, _linear(512, 2))),
    ("clam_sb", {"size_arg": "big"}, 3, _clam_count(UNI_DIM, 3, 384, 1, _linear(512, 3))),
    ("clam_mb", {}, 3, _clam_count(UNI_DIM, 3, 256, 3, 3 * _linear(512, 1))),
    ("mil_fc", {}, 2, _linear(UNI_DIM, 512) + _linear(512, 2)),
    ("abmil", {}, 2, _linear(UNI_DIM, 512) + 2 * _linear(512, 384) + _linear(384, 1)
     + _linear(512, 2)),
    ("trident_abmil", {"n_heads": 2}, 2, 2 * _linear(UNI_DIM, UNI_DIM)
     + 2 * (2 * _linear(UNI_DIM, 512) + _linear(512, 1)) + _linear(2 * UNI_DIM, UNI_DIM)
     + _linear(UNI_DIM, 256) + _linear(256, 1)),
    ("mean", {}, 4, _linear(UNI_DIM, 4)),
])
def test_parameter_counts_on_meta(arch: str, kwargs: dict[str, Any], classes: int,
                                  expected: int) -> None:
    with torch.device("meta"):
        module = build_architecture(arch, kwargs, in_dim=UNI_DIM,
                                    class_names=tuple(f"c{i}" for i in range(classes)))
    assert sum(p.numel() for p in module.parameters()) == expected


def test_transmil_has_the_published_size() -> None:
    """Shao et al. 2021 report 2.67 M parameters for TransMIL (1024-d input, 2 classes)."""
    pytest.importorskip("nystrom_attention")
    with torch.device("meta"):
        module = build_architecture("transmil", {}, in_dim=UNI_DIM, class_names=("a", "b"))
    assert round(sum(p.numel() for p in module.parameters()) / 1e6, 2) == 2.67
    assert {k for k in module.state_dict() if k.startswith("layer1.")} == {
        "layer1.norm.weight", "layer1.norm.bias", "layer1.attn.to_qkv.weight",
        "layer1.attn.to_out.0.weight", "layer1.attn.to_out.0.bias", "layer1.attn.res_conv.weight"}


# -- the published equations, written plainly ------------------------------------------------
def _gated(h: torch.Tensor, s: dict[str, torch.Tensor], p: str) -> torch.Tensor:
    """Ilse et al. eq. 9: w^T (tanh(V h) * sigm(U h)), raw (before the softmax)."""
    a = torch.tanh(h @ s[f"{p}attention_a.0.weight"].T + s[f"{p}attention_a.0.bias"])
    b = torch.sigmoid(h @ s[f"{p}attention_b.0.weight"].T + s[f"{p}attention_b.0.bias"])
    return (a * b) @ s[f"{p}attention_c.weight"].T + s[f"{p}attention_c.bias"]


def _clam_sb_by_hand(x: torch.Tensor, s: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    h = F.relu(x @ s["attention_net.0.weight"].T + s["attention_net.0.bias"])
    raw = _gated(h, s, "attention_net.3.")  # (N, 1)
    weights = torch.exp(raw[:, 0] - raw[:, 0].max())
    weights = weights / weights.sum()
    pooled = (weights[:, None] * h).sum(0)
    return pooled @ s["classifiers.weight"].T + s["classifiers.bias"], raw


def _clam_mb_by_hand(x: torch.Tensor, s: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    h = F.relu(x @ s["attention_net.0.weight"].T + s["attention_net.0.bias"])
    raw = _gated(h, s, "attention_net.3.")  # (N, C): one branch per class
    logits = []
    for c in range(raw.shape[1]):
        w = torch.softmax(raw[:, c], dim=0)
        logits.append((w @ h) @ s[f"classifiers.{c}.weight"][0] + s[f"classifiers.{c}.bias"][0])
    return torch.stack(logits), raw


def _abmil_by_hand(x: torch.Tensor, s: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    h = F.relu(x @ s["patch_embed.0.weight"].T + s["patch_embed.0.bias"])
    raw = _gated(h, s, "global_attn.")
    pooled = torch.softmax(raw[:, 0], dim=0) @ h
    return pooled @ s["classifier.weight"].T + s["classifier.bias"], raw


def _mil_fc_by_hand(x: torch.Tensor, s: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    h = F.relu(x @ s["fc.0.weight"].T + s["fc.0.bias"])
    per_patch = h @ s["classifier.weight"].T + s["classifier.bias"]
    top = int(torch.argmax(torch.softmax(per_patch, dim=1)[:, 1]))  # CLAM: top class-1 patch
    return per_patch[top], per_patch


def _trident_by_hand(x: torch.Tensor, s: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    p = "feature_encoder.model."
    h = F.gelu(x @ s[f"{p}pre_attention_layers.0.weight"].T
               + s[f"{p}pre_attention_layers.0.bias"])
    q = f"{p}image_pooler."
    a = torch.tanh(h @ s[f"{q}attention_heads.0.0.weight"].T + s[f"{q}attention_heads.0.0.bias"])
    g = torch.sigmoid(h @ s[f"{q}gating_layers.0.0.weight"].T + s[f"{q}gating_layers.0.0.bias"])
    raw = (a * g) @ s[f"{q}branching_layers.0.weight"].T + s[f"{q}branching_layers.0.bias"]
    pooled = torch.softmax(raw[:, 0], dim=0) @ h
    emb = F.gelu(pooled @ s[f"{p}post_attention_layers.0.weight"].T
                 + s[f"{p}post_attention_layers.0.bias"])
    hid = F.relu(emb @ s["classifier.0.weight"].T + s["classifier.0.bias"])
    return hid @ s["classifier.2.weight"].T + s["classifier.2.bias"], raw


def _mean_by_hand(x: torch.Tensor, s: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return x.mean(0) @ s["classifier.weight"].T + s["classifier.bias"], None  # type: ignore[return-value]


@pytest.mark.parametrize(("arch", "classes", "by_hand"), [
    ("clam_sb", ("normal", "tumor"), _clam_sb_by_hand),
    ("clam_mb", ("a", "b", "c"), _clam_mb_by_hand),
    ("mil_fc", ("normal", "tumor"), _mil_fc_by_hand),
    ("abmil", ("a", "b", "c"), _abmil_by_hand),
    ("trident_abmil", ("normal", "tumor"), _trident_by_hand),
    ("mean", ("a", "b", "c"), _mean_by_hand),
])
def test_outputs_equal_the_published_equations(tmp_path: Path, arch: str,
                                               classes: tuple[str, ...], by_hand: Any) -> None:
    with torch.device("meta"):
        shape = build_architecture(arch, {}, in_dim=UNI_DIM, class_names=classes)
    state = _randomised(shape)
    ckpt = tmp_path / "s_0_checkpoint.pt"
    torch.save(state, ckpt)
    model = load_slide_model(_card(tmp_path, arch, classes), weights=ckpt)
    x = _bag()
    pred = model.predict(x)
    logits, raw = by_hand(torch.from_numpy(x), state)
    np.testing.assert_allclose(pred.logits, logits.numpy().ravel(), atol=1e-5)
    if raw is None:
        assert pred.attention is None
    else:
        np.testing.assert_allclose(pred.attention, raw.numpy(), atol=1e-5)
        assert pred.attention.shape == (len(x), raw.shape[1])
    if arch == "trident_abmil":  # one logit over two classes: a sigmoid
        p = 1 / (1 + np.exp(-float(logits)))
        np.testing.assert_allclose(pred.probabilities, [1 - p, p], atol=1e-6)
    else:
        np.testing.assert_allclose(pred.probabilities, torch.softmax(logits.ravel(), 0), atol=1e-6)
    assert pred.predicted_class == classes[int(np.argmax(pred.probabilities))]


def test_clam_mb_heatmap_shows_the_predicted_class_branch(tmp_path: Path) -> None:
    ckpt = tmp_path / "mb.pt"
    with torch.device("meta"):
        shape = build_architecture("clam_mb", {}, in_dim=UNI_DIM, class_names=("a", "b", "c"))
    torch.save(_randomised(shape, seed=3), ckpt)
    pred = load_slide_model(_card(tmp_path, "clam_mb", ("a", "b", "c")), weights=ckpt
                            ).predict(_bag())
    assert pred.attention_columns == ("attention_a", "attention_b", "attention_c")
    assert pred.attention_columns[pred.display_column] == f"attention_{pred.predicted_class}"


# -- checkpoints in the layouts the training code writes ------------------------------------
def _clam_multi_gpu_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What CLAM writes after training on several GPUs with the SVM instance loss: the
    layout of CLAM's own heatmaps/demo/ckpts/s_0_checkpoint.pt."""
    out = {k.replace("attention_net.", "attention_net.module.", 1): v for k, v in state.items()}
    out["instance_loss_fn.labels"] = torch.tensor([0, 1])
    return out


def test_clam_checkpoint_layouts_load_strictly(tmp_path: Path) -> None:
    card = _card(tmp_path, "clam_sb", dropout=0.25, gate=True, size_arg="small", k_sample=8,
                 subtyping=False)
    with torch.device("meta"):
        shape = build_architecture("clam_sb", {"dropout": 0.25}, in_dim=UNI_DIM,
                                   class_names=("normal", "tumor"))
    state = _randomised(shape, seed=1)
    plain, wrapped = tmp_path / "plain.pt", tmp_path / "s_0_checkpoint.pt"
    torch.save(state, plain)
    torch.save(_clam_multi_gpu_layout(state), wrapped)
    assert any(".module." in k for k in torch.load(wrapped))
    x = _bag()
    a = load_slide_model(card, weights=plain).predict(x)
    b = load_slide_model(card, weights=wrapped).predict(x)
    np.testing.assert_array_equal(a.logits, b.logits)


def test_mil_lab_safetensors_and_lightning_checkpoints(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    with torch.device("meta"):
        shape = build_architecture("abmil", {}, in_dim=UNI_DIM, class_names=("a", "b"))
    state = _randomised(shape, seed=2)
    hf = tmp_path / "model.safetensors"  # Hugging Face ABMILModel: everything under model.
    save_file({f"model.{k}": v.contiguous() for k, v in state.items()}, str(hf))
    lightning = tmp_path / "epoch=3.ckpt.pt"
    torch.save({"epoch": 3, "global_step": 120,
                "state_dict": {f"model.{k}": v for k, v in state.items()}}, lightning)
    card, x = _card(tmp_path, "abmil"), _bag()
    a = load_slide_model(card, weights=hf).predict(x)
    b = load_slide_model(card, weights=lightning).predict(x)
    np.testing.assert_array_equal(a.logits, b.logits)


def test_a_checkpoint_that_does_not_fit_names_the_first_mismatching_key(tmp_path: Path) -> None:
    with torch.device("meta"):
        small = build_architecture("clam_sb", {}, in_dim=UNI_DIM, class_names=("a", "b"))
    ckpt = tmp_path / "s_0_checkpoint.pt"
    torch.save(_randomised(small), ckpt)
    with pytest.raises(ModelLoadError, match=r"attention_net\.3\.attention_a\.0\.weight.*"
                                             r"\(256, 512\) in the file, \(384, 512\)"):
        load_slide_model(_card(tmp_path, "clam_sb", size_arg="big"), weights=ckpt)
    with pytest.raises(ModelLoadError, match="key 'patch_embed.0.weight' is missing from the file"):
        load_slide_model(_card(tmp_path, "abmil"), weights=ckpt)


def test_card_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="takes no argument 'gated'.*gate"):
        load_slide_model(_card(tmp_path, "clam_sb", gated=True), allow_random_weights=True)
    with pytest.raises(ModelLoadError, match="embed_dim is 768 but the embeddings it reads "
                                             "are 1024-d"):
        load_slide_model(_card(tmp_path, "clam_sb", embed_dim=768), allow_random_weights=True)
    with pytest.raises(ModelLoadError, match="n_classes is 3 but the card names 2 classes"):
        load_slide_model(_card(tmp_path, "clam_sb", n_classes=3), allow_random_weights=True)
    with pytest.raises(ModelLoadError, match="needs its checkpoint"):
        load_slide_model(_card(tmp_path, "clam_sb"))
    encoder_card = tmp_path / "enc.json"
    encoder_card.write_text(json.dumps({"name": "x", "architecture": "torchscript"}))
    with pytest.raises(ModelLoadError, match="not a slide model card"):
        load_slide_model(encoder_card)


# -- bags in our, TRIDENT's and CLAM's layouts ----------------------------------------------
def _grid(n_side: int, step: int) -> np.ndarray:
    return np.array([(x * step, y * step) for y in range(n_side) for x in range(n_side)],
                    np.int64)


def test_bags_of_every_layout_give_the_same_answer(tmp_path: Path) -> None:
    import torch as t

    feats, coords = _bag(36), _grid(6, 512)
    trident = tmp_path / "features_uni_v1" / "slide-a.h5"
    trident.parent.mkdir()
    with h5py.File(trident, "w") as f:  # TRIDENT: (1, N, D) in some versions
        f["features"] = feats[None]
        c = f.create_dataset("coords", data=coords)
        c.attrs.update({"patch_size_level0": 512, "level0_width": 3072,
                        "level0_height": 3072, "target_magnification": 20})
    clam = tmp_path / "h5_files" / "slide-a.h5"
    clam.parent.mkdir()
    with h5py.File(clam, "w") as f:  # CLAM: patch_size at patch_level, times downsample
        f["features"] = feats
        c = f.create_dataset("coords", data=coords)
        c.attrs.update({"patch_size": 256, "patch_level": 1, "downsample": [2.0, 2.0],
                        "level_dim": [1536, 1536]})
    pt = tmp_path / "pt_files" / "slide-a.pt"
    pt.parent.mkdir()
    t.save(t.from_numpy(feats), pt)
    bags = [read_bag(p) for p in (trident, clam, pt)]
    assert [b.name for b in bags] == ["slide-a"] * 3
    assert bags[0].patch_size_level0 == bags[1].patch_size_level0 == 512
    assert bags[0].level0_size == bags[1].level0_size == (3072, 3072)
    assert bags[2].coords is None
    model = load_slide_model(_card(tmp_path, "clam_sb"), allow_random_weights=True)
    answers = [predict_bag(b, [model], None)[0] for b in bags]
    assert answers[0]["probabilities"] == answers[1]["probabilities"] == answers[2][
        "probabilities"]


def test_a_bag_of_another_encoder_is_refused(tmp_path: Path) -> None:
    model = load_slide_model(_card(tmp_path, "clam_sb"), allow_random_weights=True)
    small = tmp_path / "vit.h5"
    with h5py.File(small, "w") as f:
        f["features"] = _bag(5, 384)
        f["coords"] = _grid(1, 256).repeat(5, axis=0)[:5]
    with pytest.raises(InvalidRequestError, match="384-d but slide model 'task-clam_sb' reads "
                                                  "1024-d uni features"):
        predict_bag(read_bag(small), [model], None)
    named = tmp_path / "conch.h5"
    with h5py.File(named, "w") as f:
        f["features"] = _bag(5)
        f.attrs["encoder"] = "conch_v15"
    with pytest.raises(InvalidRequestError, match="encoded by 'conch_v15'.*trained on 'uni'"):
        predict_bag(read_bag(named), [model], None)
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"not hdf5")
    with pytest.raises(InvalidRequestError, match="not a readable HDF5 feature bag"):
        read_bag(broken)


# -- normalised attention and the heatmap ------------------------------------------------------
def test_percentiles_are_clams_average_ranks() -> None:
    scores = np.array([0.3, -1.0, 0.3, 2.0])
    # ranks 2.5, 1, 2.5, 4 (ties share their mean rank), over N = 4
    np.testing.assert_allclose(percentiles(scores), [0.625, 0.25, 0.625, 1.0])


def test_jet_is_matplotlibs() -> None:
    matplotlib = pytest.importorskip("matplotlib")
    levels = np.arange(256, dtype=np.uint8)
    theirs = (matplotlib.colormaps["jet"](levels / 256)[:, :3] * 255).astype(np.uint8)
    np.testing.assert_array_equal(colormap_rgb(levels, "jet"), theirs)


def _hot_corner_model(tmp_path: Path) -> Any:
    """CLAM-SB whose attention grows with feature 0: raw = tanh(relu(x0)) (gate open)."""
    with torch.device("meta"):
        shape = build_architecture("clam_sb", {}, in_dim=UNI_DIM, class_names=("a", "b"))
    state = {k: torch.zeros(v.shape) for k, v in shape.state_dict().items()}
    state["attention_net.0.weight"][0, 0] = 1.0
    state["attention_net.3.attention_a.0.weight"][0, 0] = 1.0
    state["attention_net.3.attention_b.0.bias"][:] = 20.0  # sigmoid ~ 1
    state["attention_net.3.attention_c.weight"][0, 0] = 1.0
    ckpt = tmp_path / "hot.pt"
    torch.save(state, ckpt)
    return load_slide_model(_card(tmp_path, "clam_sb"), weights=ckpt)


def test_the_heatmap_is_hot_where_the_attention_is(tmp_path: Path) -> None:
    """A bag whose top-left quarter has high attention: that quarter is red, the rest blue."""
    import cv2

    coords = _grid(8, 512)  # 8 x 8 patches of 512 px on a 4096 px slide
    feats = np.zeros((64, UNI_DIM), np.float32)
    hot = (coords[:, 0] < 2048) & (coords[:, 1] < 2048)
    feats[hot, 0] = 2.0 + RNG.random(hot.sum())
    feats[~hot, 0] = RNG.random((~hot).sum()) * 0.1
    bag_path = tmp_path / "hot-slide.h5"
    with h5py.File(bag_path, "w") as f:
        f["features"] = feats
        c = f.create_dataset("coords", data=coords)
        c.attrs.update({"patch_size_level0": 512, "level0_width": 4096, "level0_height": 4096})
    model = _hot_corner_model(tmp_path)
    (answer,) = predict_bag(read_bag(bag_path), [model], tmp_path / "out")
    assert answer["files"]["heatmap"] == "hot-slide.heatmap.png"
    png = cv2.cvtColor(cv2.imread(str(tmp_path / "out" / "hot-slide.heatmap.png")),
                       cv2.COLOR_BGR2RGB).astype(float)
    side = png.shape[1]  # the canvas is square; a legend strip lies below it
    hot_px = png[: side // 2 - 4, : side // 2 - 4].reshape(-1, 3).mean(0)
    cold_px = png[side // 2 + 4: side, side // 2 + 4:].reshape(-1, 3).mean(0)
    # jet at the top percentiles is red; the cold patches spread over blue .. yellow
    assert hot_px[0] - hot_px[2] > 60 and cold_px[2] > cold_px[0]
    assert (hot_px[0] - hot_px[2]) - (cold_px[0] - cold_px[2]) > 80
    with h5py.File(tmp_path / "out" / "hot-slide.attention.h5") as f:
        raw, pct = f["attention"][:, 0], f["attention_percentile"][:, 0]
        np.testing.assert_array_equal(f["coords"][:], coords)
        np.testing.assert_allclose(f["attention_softmax"][:, 0].sum(), 1.0, rtol=1e-5)
    assert raw[hot].min() > raw[~hot].max() and pct[hot].min() > pct[~hot].max()
    geo = json.loads((tmp_path / "out" / "hot-slide.attention.geojson").read_text())
    assert len(geo["features"]) == 64
    assert geo["features"][0]["properties"]["measurements"]["attention"] == pytest.approx(
        float(raw[0]), rel=1e-6)
    assert "no patch images" in " ".join(answer["notes"])


def test_slide_card_round_trips_and_refuses_duplicates() -> None:
    card = SlideModelCard(name="t", architecture="clam_sb", class_names=("a", "b"),
                          patch_encoder="uni")
    assert SlideModelCard.model_validate_json(card.to_json()) == card
    with pytest.raises(ValueError, match="unique"):
        SlideModelCard(name="t", architecture="clam_sb", class_names=("a", "a"),
                       patch_encoder="uni")


# -- slide encoders (FEATHER): an embedding per slide, no head ------------------------------
@pytest.mark.parametrize("name", ["feather-uni", "feather-uni2"])
def test_builtin_slide_encoders_match_their_publishers(tmp_path: Path, name: str) -> None:
    from safetensors.torch import save_file

    from wsi_sampler.slide_models import embedding_dim_of
    from wsi_sampler.slide_models.card import slide_catalogue_card, slide_catalogue_names

    assert name in slide_catalogue_names()
    card = slide_catalogue_card(name)
    assert card.is_encoder and card.provenance is not None and card.provenance.sources
    dim = embedding_dim_of(card)
    with torch.device("meta"):
        shape = build_architecture(card.architecture, card.architecture_kwargs, in_dim=dim,
                                   class_names=card.class_names)
    assert not any(k.startswith("classifier") for k in shape.state_dict())  # no head
    if card.provenance.parameters:
        count = sum(p.numel() for p in shape.parameters())
        assert abs(count - card.provenance.parameters) <= (
            card.provenance.parameters * card.provenance.parameters_tolerance)
    weights = tmp_path / "model.safetensors"  # Hugging Face ABMILModel: keys under model.
    save_file({f"model.{k}": v.contiguous() for k, v in _randomised(shape).items()},
              str(weights))
    model = load_slide_model(name, weights=weights)
    answer = model.predict(_bag(23, dim)).to_dict()
    assert answer["predicted_class"] is None and answer["probabilities"] == {}
    assert answer["embedding_dim"] == card.embedding_dim == len(answer["embedding"]) == 512
    assert answer["attention"] == {"columns": ["attention"], "display_column": "attention"}


def _catalogue_encoder(name: str, patch_encoder: str, dim: int) -> torch.nn.Module:
    """The built-in slide encoder ``name``, built on meta: a slide encoder over
    ``patch_encoder``'s ``dim``-d features, with its card's parameter count."""
    from wsi_sampler.slide_models.card import slide_catalogue_card

    card = slide_catalogue_card(name)
    assert card.is_encoder and card.patch_encoder == patch_encoder
    with torch.device("meta"):
        shape = build_architecture(name, card.architecture_kwargs, in_dim=dim,
                                   class_names=())
    assert card.provenance is not None
    assert sum(p.numel() for p in shape.parameters()) == card.provenance.parameters
    return shape


def test_chief_loads_its_pretraining_checkpoint_and_pools_the_input_features(
    tmp_path: Path
) -> None:
    # CHIEF_pretraining.pth: a plain state dict of CHIEF(size_arg="small", dropout=True,
    # n_classes=2), with its pretraining heads and the organ_embedding buffer. Its answer,
    # WSI_feature, is softmax(A_raw) times the *input* CTransPath features (768-d).
    shape = _catalogue_encoder("chief", "ctranspath", 768)
    assert {"organ_embedding", "att_head.fc1.weight", "text_to_vision.0.weight",
            "instance_classifiers.1.bias", "classifiers.weight",
            "attention_net.3.attention_c.weight"} <= set(shape.state_dict())
    state = _randomised(shape)
    ckpt = tmp_path / "CHIEF_pretraining.pth"
    torch.save(state, ckpt)
    model = load_slide_model("chief", weights=ckpt)
    x = _bag(31, 768)
    answer = model.predict(x)
    features = torch.from_numpy(x)
    h = F.relu(features @ state["attention_net.0.weight"].T + state["attention_net.0.bias"])
    raw = _gated(h, state, "attention_net.3.")
    by_hand = torch.softmax(raw[:, 0], dim=0) @ features
    np.testing.assert_allclose(answer.attention, raw.numpy(), atol=1e-5)
    np.testing.assert_allclose(answer.embedding, by_hand.numpy(), atol=1e-5)
    assert answer.to_dict()["embedding_dim"] == 768 and answer.predicted_class is None
    del state["att_head.fc2.bias"]
    torch.save(state, ckpt)
    with pytest.raises(ModelLoadError, match=r"att_head\.fc2\.bias"):
        load_slide_model("chief", weights=ckpt)


def _layer_norm(x: torch.Tensor, s: dict[str, torch.Tensor], p: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], s[f"{p}.weight"], s[f"{p}.bias"])


def test_madeleine_loads_its_checkpoint_and_pools_four_heads(tmp_path: Path) -> None:
    # MADELEINE's model.pt: the MADELEINE module's state dict (H&E, no stain encoding),
    # saved through DataParallel ("module." on every key, which its loader strips).
    shape = _catalogue_encoder("madeleine", "conch-v1", 512)
    state = _randomised(shape)
    ckpt = tmp_path / "model.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, ckpt)
    model = load_slide_model("madeleine", weights=ckpt)
    x = _bag(29, 512)
    answer = model.predict(x)
    # the equations, written plainly: three Linear-LayerNorm-GELU blocks, heads split as
    # 'b t (e c) -> b t e c', gated attention per head, softmax over the patches, the
    # pooled (e, c) flattened e-major and projected
    h = torch.from_numpy(x)
    for i in (0, 4, 8):
        p = f"wsi_embedders.pre_attn.{i}"
        h = h @ state[f"{p}.weight"].T + state[f"{p}.bias"]
        h = F.gelu(_layer_norm(h, state, f"wsi_embedders.pre_attn.{i + 1}"))
    heads = h.reshape(len(x), 512, 4)
    raws, pooled = [], []
    for c in range(4):
        raw = _gated(heads[:, :, c], state, f"wsi_embedders.attn.{c}.")
        raws.append(raw)
        pooled.append(torch.softmax(raw[:, 0], dim=0) @ heads[:, :, c])
    flat = torch.stack(pooled, dim=1).reshape(-1)
    by_hand = flat @ state["projector.weight"].T + state["projector.bias"]
    np.testing.assert_allclose(answer.attention, torch.cat(raws, 1).numpy(), atol=1e-5)
    np.testing.assert_allclose(answer.embedding, by_hand.numpy(), atol=1e-4)
    assert answer.to_dict()["embedding_dim"] == 512 and answer.predicted_class is None
    torch.save({k: v for k, v in state.items() if k != "token_projector.weight"}, ckpt)
    with pytest.raises(ModelLoadError, match=r"token_projector\.weight"):
        load_slide_model("madeleine", weights=ckpt)


def test_a_slide_encoder_card_states_its_embedding_size(tmp_path: Path) -> None:
    path = tmp_path / "enc.json"
    path.write_text(json.dumps({"kind": "slide", "name": "enc", "architecture": "abmil",
                                "architecture_kwargs": {"num_classes": 0, "embed_dim": 256},
                                "class_names": [], "embedding_dim": 512,
                                "patch_encoder": "uni"}))
    with pytest.raises(ModelLoadError, match="embedding_dim is 512 but abmil with these "
                                             "arguments gives 256"):
        load_slide_model(path, allow_random_weights=True)
    path.write_text(json.dumps({"kind": "slide", "name": "enc", "architecture": "clam_sb",
                                "class_names": [], "patch_encoder": "uni"}))
    with pytest.raises(ModelLoadError, match="clam_sb needs class_names"):
        load_slide_model(path, allow_random_weights=True)


@pytest.mark.parametrize("arch", ["linear", "mlp"])
def test_a_head_over_a_slide_encoder(tmp_path: Path, arch: str) -> None:
    """A linear probe / MLP trained on FEATHER embeddings: both files load strictly and the
    answer is the head applied to the encoder's embedding."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        encoder = build_architecture("abmil", {"num_classes": 0}, in_dim=UNI_DIM,
                                     class_names=())
        head = build_architecture(arch, {}, in_dim=512, class_names=("a", "b", "c"))
    enc_state, head_state = _randomised(encoder, 1), _randomised(head, 2)
    save_file({f"model.{k}": v.contiguous() for k, v in enc_state.items()},
              str(tmp_path / "model.safetensors"))
    torch.save(head_state, tmp_path / "probe.pt")
    card = tmp_path / "probe.json"
    card.write_text(json.dumps({
        "kind": "slide", "name": f"subtype-{arch}", "architecture": arch,
        "class_names": ["a", "b", "c"], "slide_encoder": "feather-uni",
        "slide_encoder_file": "model.safetensors", "file": "probe.pt"}))
    model = load_slide_model(card)
    assert model.embedding_dim == UNI_DIM and model.encoder_card.name == "uni"
    x = _bag()
    pred = model.predict(x)
    h = F.relu(torch.from_numpy(x) @ enc_state["patch_embed.0.weight"].T
               + enc_state["patch_embed.0.bias"])
    raw = _gated(h, enc_state, "global_attn.")
    emb = torch.softmax(raw[:, 0], dim=0) @ h
    if arch == "linear":
        logits = emb @ head_state["weight"].T + head_state["bias"]
    else:
        hid = F.relu(emb @ head_state["0.weight"].T + head_state["0.bias"])
        logits = hid @ head_state["3.weight"].T + head_state["3.bias"]
    np.testing.assert_allclose(pred.logits, logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(pred.attention, raw.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="give slide_encoder with them"):
        SlideModelCard(name="x", architecture=arch, class_names=("a", "b"), patch_encoder="uni")


def test_the_architecture_table_of_models_list_is_the_modules() -> None:
    import inspect

    from wsi_sampler.slide_models.architectures import ARCHITECTURES
    from wsi_sampler.slide_models.card import ARCHITECTURE_SUMMARY

    for name, arch in ARCHITECTURES.items():
        params = [p for p in inspect.signature(arch.cls.__init__).parameters.values()
                  if p.name not in ("self", "unused")]
        assert ARCHITECTURE_SUMMARY[name] == (
            arch.original, ", ".join(f"{p.name}={p.default!r}" for p in params))
    assert set(ARCHITECTURE_SUMMARY) == set(ARCHITECTURES)
