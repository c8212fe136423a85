"""``wsi-sampler models``: the built-in models and encoder catalogue, and a check that a
downloaded weights file fits its card. Registered onto the main app by
:mod:`wsi_sampler.cli.main`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from .options import DeviceO, DeviceOpt, RandomWeightsO, WeightsO

__all__ = ["register"]

log = logging.getLogger("wsi_sampler")
models_app = typer.Typer(name="models", no_args_is_help=True, rich_markup_mode=None,
                         help="Built-in models and encoders; check downloaded weights.")
NameArg = Annotated[str, typer.Argument(help="A built-in name (models list) or a card .json.")]


@models_app.command("list")
def list_models() -> None:
    """The built-in models: name, output, input, licence and where to get the weights."""
    from ..models import BUILTIN_MODELS, catalogue_names, resolve_card

    rows: list[tuple[str, ...]] = [("name", "output", "input", "licence", "weights")]
    for name in (*BUILTIN_MODELS, *catalogue_names()):
        card = resolve_card(name)[0]
        out = card.embedding_output
        kind = f"{out.width}-d embedding" if out else f"{len(card.outputs)} output(s)"
        prov = card.provenance
        rows.append((name, kind, f"{card.patch_size_px} px @ {card.target_mpp} µm/px",
                     prov.licence.split(" (")[0] if prov else "built in",
                     prov.weights_url if prov else "-"))
    _table(rows)
    sys.stdout.write("\nslide models (a card with \"kind\": \"slide\" and your checkpoint: "
                     "wsi-sampler predict-slide --slide-model CARD --slide-weights CKPT)\n")
    _table(_slide_architecture_rows())
    sys.stdout.write("\nslide encoders (--slide-model NAME --slide-weights their file)\n")
    _table(_slide_encoder_rows())
    sys.stdout.write("\ntissue segmenters (--method NAME --segmenter-weights their file)\n")
    _table(_segmenter_rows())


def _segmenter_rows() -> list[tuple[str, ...]]:
    from ..segmenters.card import load_segmenter_card, segmenter_catalogue_names

    rows: list[tuple[str, ...]] = [("name", "input", "licence", "weights")]
    for name in segmenter_catalogue_names():
        card = load_segmenter_card(name)
        prov = card.provenance
        rows.append((name, f"{card.tile_px} px tiles @ {card.tile_mpp} µm/px",
                     prov.licence.split(" (")[0] if prov else "-",
                     f"{prov.weights_url} ({prov.weights_file})" if prov else "-"))
    return rows


def _slide_architecture_rows() -> list[tuple[str, ...]]:
    from ..slide_models.card import ARCHITECTURE_SUMMARY  # no torch: a table, kept in step

    rows: list[tuple[str, ...]] = [("architecture", "training code", "architecture_kwargs")]
    rows += [(name, original, args) for name, (original, args) in ARCHITECTURE_SUMMARY.items()]
    return rows


def _slide_encoder_rows() -> list[tuple[str, ...]]:
    from ..slide_models.card import slide_catalogue_card, slide_catalogue_names

    rows: list[tuple[str, ...]] = [("name", "output", "patch encoder", "licence", "weights")]
    for name in slide_catalogue_names():
        card = slide_catalogue_card(name)
        prov = card.provenance
        rows.append((name, f"{card.embedding_dim}-d slide embedding", str(card.patch_encoder),
                     prov.licence.split(" (")[0] if prov else "-",
                     prov.weights_url if prov else "-"))
    return rows


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                         + "\n")


@models_app.command("show")
def show(name: NameArg) -> None:
    """Print a model's card (JSON): copy it to describe a variant of your own."""
    from ..models import resolve_card

    sys.stdout.write(resolve_card(name)[0].to_json() + "\n")


@models_app.command("check")
def check(
    name: NameArg, weights: WeightsO = None, device: DeviceO = DeviceOpt.cpu,
    random_weights: RandomWeightsO = False,
) -> None:
    """Load a model strictly (every weight present, none extra, every shape equal) and run
    one patch through it: the way to know a downloaded file fits before a long run."""
    if _is_slide_card(name):
        _check_slide_model(name, weights, random_weights)
        return
    from ..models import load_model

    model = load_model(name, weights=weights, device=device.value,
                       allow_random_weights=random_weights)
    params = sum(p.numel() for p in model.module.parameters())
    widths = ", ".join(f"{o.name}: {o.width}" for o in model.card.outputs)
    log.info("%s: OK - %.1f M parameters, outputs %s, %d px at %.3f µm/px, on %s",
             model.name, params / 1e6, widths, model.card.patch_size_px, model.card.target_mpp,
             model.device)


def _is_slide_card(name: str) -> bool:
    import json
    from pathlib import Path

    path = Path(name)
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        return bool(json.loads(path.read_text(encoding="utf-8")).get("kind") == "slide")
    except (ValueError, AttributeError):
        return False


def _check_slide_model(name: str, weights: Path | None, random_weights: bool) -> None:
    """Load a slide model strictly and answer one random bag."""
    import numpy as np

    from ..slide_models import load_slide_model

    model = load_slide_model(name, weights=weights, allow_random_weights=random_weights)
    pred = model.predict(np.random.default_rng(0).normal(size=(16, model.embedding_dim)))
    params = sum(p.numel() for p in model.module.parameters())
    log.info("%s: OK - %s, %.2f M parameters, %d-d %s features -> %s; attention %s",
             model.name, model.card.architecture, params / 1e6, model.embedding_dim,
             model.encoder_card.name, ", ".join(model.card.class_names),
             ", ".join(pred.attention_columns) or "none")


def register(app: typer.Typer) -> None:
    app.add_typer(models_app)


