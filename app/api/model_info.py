"""What ``/v1/models`` says of a model: its config, how it runs, what tuning measured."""

from __future__ import annotations

import dataclasses

from app.api.params import top_k_limit
from app.errors import MidserveError
from app.runtime.tuning.report import TuningReport
from app.schemas import ModelOut, TuningOut, TuningTrialOut
from app.serving.models import ModelSlot
from app.serving.service import ClassifyService


def model_out(service: ClassifyService, slot: ModelSlot) -> ModelOut:
    engine = slot.engine
    cfg = service.repository.config(slot.name) if engine is None else engine.cfg
    s = service.settings
    state, why = slot.health()
    return ModelOut(
        name=slot.name,
        state=state,
        error=why or None,
        arch=cfg.arch,
        description=cfg.description,
        num_classes=cfg.num_classes,
        input_size=cfg.input_size,
        resize_size=cfg.resize_size,
        crop_pct=cfg.crop_pct,
        interpolation=cfg.interpolation,
        mean=list(cfg.mean),
        std=list(cfg.std),
        default_views=cfg.default_views,
        default_level=cfg.default_level,
        auto_views=cfg.auto_views or None,
        stage_models=[other.name for other in slot.stage_slots],
        parent=cfg.parent or None,
        weights=cfg.weights.describe(),
        device=str(engine.device) if engine else None,
        dtype=engine.dtype_name if engine else None,
        fusion=engine.fusion.describe() if engine and engine.fusion else None,
        bn_sets=engine.bn_sets if engine else sorted(cfg.bn_sets),
        plan=engine.plan.describe() if engine else None,
        tuning=tuning_out(engine.tuning) if engine and engine.tuning else None,
        limits={
            "max_views_per_request": s.max_views_per_request,
            "max_images_per_request": s.max_images_per_request,
            "max_body_bytes": s.max_body_bytes,
            "max_pixels": s.max_pixels,
            "max_aspect_ratio": s.max_aspect_ratio,
            "max_top_k": top_k_limit(cfg.num_classes, s),
            "request_timeout_s": s.request_timeout_s,
        },
    )


def safe_model_out(service: ClassifyService, slot: ModelSlot) -> ModelOut | None:
    try:
        return model_out(service, slot)
    except MidserveError:  # not in the repository at all (a typo in MIDSERVE_MODELS)
        return None


def tuning_out(report: TuningReport) -> TuningOut:
    return TuningOut(
        source=report.source,
        seconds=round(report.seconds, 3),
        budget_s=report.budget_s,
        chosen=report.chosen.describe(),
        default=report.default.describe(),
        candidates=[
            TuningTrialOut(
                plan=t.plan.describe(), **dataclasses.asdict(t.plan),
                views_per_s=t.views_per_s, max_prob_diff=t.max_prob_diff,
                top1_agreement=t.top1_agreement, status=t.status, default=t.default,
                chosen=t.plan == report.chosen,
            )
            for t in report.trials
        ],
    )  # fmt: skip
