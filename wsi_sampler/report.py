"""Whole-slide reports: a slide's MedGemma bag sent to a vision-language model, text back.

Frame: bag coordinates are level-0 pixels. The streaming form is a sequence of plain
dicts: one ``{"type": "bag", ...}`` (coordinates, magnification, how the bag was filled),
then ``{"type": "delta", "text": ...}`` as the model writes, then one
``{"type": "report", ...}`` (full text, usage, timings). Used by the API's report stream,
``wsi-sampler describe`` and batch scoring with ``--vlm-url``.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import Any

from .errors import EmptyPlanError, InvalidRequestError
from .extract import Extractor
from .plan import PatchPlan, PlanParams, make_plan
from .slide import Slide
from .worker.vlm import VlmReport, VlmRequest, VlmWorker, encode_data_uri

__all__ = ["bag_record", "bag_request_body", "describe_slide", "plan_bag", "prepare_bag",
           "report_events"]

_BAG_BATCH = 8


def plan_bag(slide: Slide, params: PlanParams) -> PatchPlan:
    """The slide's bag; a slide without tissue is an :class:`EmptyPlanError` saying so."""
    if params.strategy != "medgemma":
        raise InvalidRequestError("reports send the MedGemma bag: use strategy 'medgemma'")
    plan = make_plan(slide, params)
    if not len(plan):
        raise EmptyPlanError(f"{slide.name}: {plan.why_empty()}")
    return plan


def prepare_bag(slide: Slide, params: PlanParams, vlm: VlmRequest, prompt: str) -> PatchPlan:
    """Plan the bag and check that the endpoint can take it (nothing is read or sent)."""
    plan = plan_bag(slide, params)
    vlm.check_bag(len(plan), prompt)
    return plan


def bag_record(plan: PatchPlan) -> dict[str, Any]:
    return {"type": "bag", "n_patches": len(plan), "magnification": plan.magnification,
            "target_mpp": plan.target_mpp, "patch_size_px": plan.patch_size_px,
            "width0": plan.width0, "height0": plan.height0, "seed": plan.seed,
            "selection": plan.selection,
            "patches": plan.patch_records()}


def encode_bag(slide: Slide, plan: PatchPlan, vlm: VlmRequest) -> list[str]:
    """The bag's patches as data URIs, in bag order (encoded in parallel with reading)."""
    cfg = vlm.config
    uris: list[str] = []
    with ThreadPoolExecutor(2, thread_name_prefix="wsi-bag") as pool, \
            closing(Extractor(slide, plan, batch_size=_BAG_BATCH).iter_batches()) as batches:
        for batch in batches:
            uris += pool.map(lambda im: encode_data_uri(im, cfg.image_format, cfg.jpeg_quality),
                             batch.images)
    return uris


def bag_request_body(slide: Slide, params: PlanParams, vlm: VlmRequest, prompt: str
                     ) -> dict[str, Any]:
    """A ready-to-send ``/v1/chat/completions`` body for the slide's bag."""
    plan = prepare_bag(slide, params, vlm, prompt)
    return vlm.request_body(vlm.messages(encode_bag(slide, plan, vlm), prompt))


def report_events(slide: Slide, plan: PatchPlan, vlm: VlmWorker, prompt: str
                  ) -> Generator[dict[str, Any], None, None]:
    """Bag, text deltas as the model streams them, then the report (see the module doc).
    ``plan`` comes from :func:`prepare_bag`."""
    t0 = time.perf_counter()
    yield bag_record(plan)
    messages = vlm.messages(encode_bag(slide, plan, vlm), prompt)
    t_bag = time.perf_counter()
    for item in vlm.stream(messages):
        if isinstance(item, VlmReport):
            yield {"type": "report", **item.to_dict(), "prompt": prompt,
                   "timings_s": {"bag": round(t_bag - t0, 3),
                                 "model": round(time.perf_counter() - t_bag, 3)}}
        else:
            yield {"type": "delta", "text": item}


def describe_slide(slide: Slide, params: PlanParams, vlm: VlmWorker, prompt: str
                   ) -> dict[str, Any]:
    """The finished report with its bag (what ``report.json`` holds)."""
    bag: dict[str, Any] = {}
    report: dict[str, Any] = {}
    for event in report_events(slide, prepare_bag(slide, params, vlm, prompt), vlm, prompt):
        if event["type"] == "bag":
            bag = event
        elif event["type"] == "report":
            report = event
    return {"slide": slide.name, "fingerprint": slide.fingerprint,
            "model": report["model"], "prompt": prompt, "text": report["text"],
            "finish_reason": report["finish_reason"], "usage": report["usage"],
            "timings_s": report["timings_s"], "params": params.to_dict(),
            "bag": {k: v for k, v in bag.items() if k != "type"}}
