"""Slide in, answer out: a slide (local, HTTP/S3, DICOMweb) goes through tissue detection,
a plan with the patch encoder's geometry and the encoder (its feature bag written as
``score`` writes it), then through each slide model; an existing feature bag goes straight
to the slide models. Several slide models share one encoder pass.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError
from ..extract import Extractor
from ..features import write_features_h5
from ..plan import PatchPlan, PlanParams
from ..scoring import SlideScore, score_slide
from ..slide import Slide, open_slide
from ..types import RGBImage
from ..worker import Worker
from .bags import BAG_SUFFIXES, Bag, check_bag, is_bag_path, read_bag
from .model import SlideModel
from .outputs import AttentionGeometry, HeatmapOptions, write_slide_outputs

__all__ = ["InputItem", "SlideAnswer", "answer_scored_slide", "expand_inputs", "output_prefix",
           "predict_bag", "predict_slide", "require_encoder"]

_NOT_BAGS = ("coords.h5",)
_OUR_OUTPUTS = (".attention.h5",)


@dataclass(frozen=True)
class InputItem:
    kind: str  # "slide" or "bag"
    location: str


def _bags_under(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*")
                  if p.suffix.lower() in BAG_SUFFIXES and p.is_file()
                  and p.name not in _NOT_BAGS and not p.name.endswith(_OUR_OUTPUTS)
                  and not any(part.startswith(".") for part in p.parts))


def expand_inputs(inputs: Sequence[str]) -> list[InputItem]:
    """Slide files, folders (their slides and feature bags), URLs and bag files."""
    from ..batch.discover import discover

    items: list[InputItem] = []
    for text in inputs:
        path = Path(text)
        if "://" not in text and path.is_dir():
            items += [InputItem("slide", t.location) for t in discover(path).slides]
            items += [InputItem("bag", b) for b in _bags_under(path)]
        elif "://" not in text and is_bag_path(text):
            items.append(InputItem("bag", text))
        else:
            items.append(InputItem("slide", text))
    if not items:
        raise InvalidRequestError(f"no slides or feature bags in {', '.join(inputs)}")
    return items


def require_encoder(models: Sequence[SlideModel], encoder: str | None = None, *,
                    given_as: str = "the encoder given") -> None:
    """Slide models on one pass read the same features, those of ``encoder`` when named
    (``given_as``: how the user named it, for the message)."""
    names = {m.encoder_card.name for m in models}
    if len(names) > 1:
        raise InvalidRequestError(
            "these slide models read features of different encoders "
            f"({', '.join(sorted(names))}): run them in separate commands")
    for model in models:
        if encoder is not None and model.encoder_card.name != encoder:
            raise InvalidRequestError(
                f"slide model {model.name!r} was trained on {model.encoder_card.name!r} "
                f"features, but {given_as} is {encoder!r}")


@dataclass
class SlideAnswer:
    """The answers of every slide model for one input, and where they were written."""

    name: str
    records: list[dict[str, Any]] = field(default_factory=list)
    features_path: str | None = None
    seconds: float = 0.0


def output_prefix(out: Path, name: str, model: SlideModel, several: bool) -> Path:
    """``OUT/<name>`` for one slide model, ``OUT/<name>.<model>`` for several."""
    return out / (f"{name}.{model.name}" if several else name)


def predict_bag(
    bag: Bag, models: Sequence[SlideModel], out: Path | None, *,
    options: HeatmapOptions | None = None, record: dict[str, Any] | None = None,
    thumbnail: RGBImage | None = None,
    read_patches: Callable[[list[int]], list[RGBImage]] | None = None,
    prefix: Callable[[SlideModel], Path] | None = None,
) -> list[dict[str, Any]]:
    """Each slide model's answer for ``bag``; with ``out``, its files (``prefix``: where)."""
    options = options or HeatmapOptions()
    results = []
    geometry = None
    if bag.coords is not None and bag.patch_size_level0 and bag.level0_size:
        geometry = AttentionGeometry(bag.coords, bag.patch_size_level0, bag.level0_size)
    for model in models:
        check_bag(bag, embedding_dim=model.embedding_dim, encoder=model.encoder_card.name,
                  model=model.name)
        pred = model.predict(bag.features)
        rec = {"input": {"name": bag.name, "kind": "bag", "file": Path(bag.source).name}
               } | (record or {})
        if out is None:
            results.append(pred.to_dict() | rec)
            continue
        where = prefix(model) if prefix else output_prefix(out, bag.name, model,
                                                            len(models) > 1)
        results.append(write_slide_outputs(where, pred, model, record=rec, geometry=geometry,
                                           thumbnail=thumbnail, read_patches=read_patches,
                                           options=options))
    return results


def _bag_of_score(slide: Slide, result: SlideScore) -> Bag:
    if result.features is None:
        raise InvalidRequestError(f"{slide.name}: its model returns no embedding: a slide "
                                  "model needs the features of a patch encoder")
    plan = result.plan
    return Bag(name=slide.stem, features=result.features, coords=plan.coords,
               patch_size_level0=plan.width0, level0_size=slide.dimensions,
               encoder=None, source=slide.name)


def _patch_reader(slide: Slide, plan: PatchPlan) -> Callable[[list[int]], list[RGBImage]]:
    """Reads plan rows as the encoder saw them (its patch size and resolution)."""
    def read(rows: list[int]) -> list[RGBImage]:
        extractor = Extractor(slide, plan, threads=1)
        return [extractor.read_patch(i) for i in rows]
    return read


def answer_scored_slide(
    slide: Slide, result: SlideScore, models: Sequence[SlideModel], out: Path | None, *,
    prefix: Callable[[SlideModel], Path] | None = None, options: HeatmapOptions | None = None,
    record: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Each slide model's answer from the features ``score_slide`` just computed for the
    open ``slide``, with every file (heatmap over its thumbnail, its patches); batch runs,
    jobs and :func:`predict_slide` all answer this way (``out`` None: the answers alone)."""
    options = options or HeatmapOptions()
    rec = {"input": {"name": slide.name, "kind": "slide", "fingerprint": slide.fingerprint}
           } | (record or {})
    if out is None:  # the answers alone: no thumbnail or patches to read
        return predict_bag(_bag_of_score(slide, result), models, None, record=rec)
    return predict_bag(_bag_of_score(slide, result), models, out, options=options,
                       record=rec, thumbnail=slide.thumbnail(max_size=options.max_size),
                       read_patches=_patch_reader(slide, result.plan), prefix=prefix)


def predict_slide(
    source: str | Path | Bag, models: Sequence[SlideModel], out: Path | None = None, *,
    encoder: Worker | None = None, params: PlanParams | None = None,
    options: HeatmapOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None, mpp_override: float | None = None,
) -> SlideAnswer:
    """The answers of ``models`` for one slide or feature bag (see the module docstring).

    A slide needs ``encoder`` (the slide models' patch encoder, in process or remote); its
    ``features.h5`` goes to ``out/<name>.features.h5`` when ``out`` is given."""
    t0 = time.perf_counter()
    options = options or HeatmapOptions()
    if not models:
        raise InvalidRequestError("give at least one slide model")
    require_encoder(models)
    if isinstance(source, Bag) or is_bag_path(source) and "://" not in str(source):
        bag = source if isinstance(source, Bag) else read_bag(source)
        answer = SlideAnswer(bag.name, predict_bag(bag, models, out, options=options))
        answer.seconds = time.perf_counter() - t0
        return answer
    if encoder is None:
        raise InvalidRequestError("a slide needs the patch encoder (--model, --weights)")
    require_encoder(models, encoder.card.name)
    with open_slide(str(source), mpp_override=mpp_override) as slide:
        answer = _predict_open_slide(slide, models, out, encoder, params or PlanParams(),
                                     options, progress, cancel)
    answer.seconds = time.perf_counter() - t0
    return answer


def _predict_open_slide(
    slide: Slide, models: Sequence[SlideModel], out: Path | None, encoder: Worker,
    params: PlanParams, options: HeatmapOptions,
    progress: Callable[[int, int], None] | None, cancel: threading.Event | None,
) -> SlideAnswer:
    name = slide.stem
    result = score_slide(slide, params, encoder, None, cancel=cancel, progress=progress)
    answer = SlideAnswer(name)
    if out is not None and result.features is not None:
        out.mkdir(parents=True, exist_ok=True)
        answer.features_path = str(out / f"{name}.features.h5")
        write_features_h5(answer.features_path, result.plan, slide, result.features,
                          encoder.card)
    encoding = {"patches": len(result.plan), "seconds": result.summary["seconds"],
                "encoder": encoder.card.name, "patch_size_px": result.plan.patch_size_px,
                "target_mpp": result.plan.target_mpp}
    answer.records = answer_scored_slide(slide, result, models, out, options=options,
                                         record={"encoding": encoding})
    return answer
