"""The models a server holds and their lifecycle: each in a slot, loaded in the background
after start-up (so ``/healthz`` answers at once and readiness says which models are still
loading or failed; a model that fails to load does not stop the others), warmed, given its
batcher; health (loading | ready | recovering | failed, and past the recovery limit) as
every edge reports it; stopped. A model that a served model's policies run as a later
stage (a cascade) is served too, loaded before the models that need it, and their
readiness waits on it. Per-request execution is ``service.py``'s."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Literal

import torch

from app.config import Settings
from app.errors import (
    EvalResultsError,
    InvalidRequestError,
    MidserveError,
    ModelNotReadyError,
    UnknownModelError,
)
from app.eval_results import EVAL_FILE, read_eval_results
from app.metrics import Metrics
from app.pipeline import ImagePipeline, later_stage
from app.preparer import StageModel
from app.repository import ModelRepository
from app.runtime.engine import Engine, pick_device
from app.runtime.load import load_engine
from app.runtime.plan import EngineOptions
from app.serving.batching import ViewBatcher
from app.serving.faults import FaultInjector, injector_from_spec
from app.threads import name_os_thread
from app.tta.stages import parse_policy
from app.tta.views import view_pixels

log = logging.getLogger(__name__)
State = Literal["loading", "ready", "failed"]


@dataclass
class ModelSlot:
    name: str
    state: State = "loading"
    error: str = ""
    pipeline: ImagePipeline | None = None
    batcher: ViewBatcher | None = None
    faults: FaultInjector | None = None  # only when the fault_injection setting names some
    # the later-stage models its own policies (model.toml's views and auto) run on
    stage_slots: list[ModelSlot] = field(default_factory=list)

    @property
    def engine(self) -> Engine | None:
        return self.pipeline.engine if self.pipeline else None

    def own_health(self) -> tuple[str, str]:
        """(state, why) of this model alone: loading | ready | failed, or recovering while
        a stalled forward keeps a loaded model out of readiness."""
        if self.state == "ready" and self.batcher is not None and self.batcher.unready:
            return "recovering", self.batcher.unready
        return self.state, self.error

    def health(self) -> tuple[str, str]:
        """(state, why) as readiness reports it: its own, or while it is ready, that of a
        later-stage model its policies cannot answer without."""
        state, why = self.own_health()
        if state != "ready":
            return state, why
        for other in self.stage_slots:
            dep_state, dep_why = other.own_health()
            if dep_state != "ready":
                says = f": {dep_why}" if dep_why else ""
                return dep_state, f"later-stage model {other.name!r} is {dep_state}{says}"
        return state, why

    def ready(self) -> tuple[ImagePipeline, ViewBatcher]:
        """Its pipeline and batcher; a request that needs a later-stage model asks that
        model's slot (so a plain request still runs while a later-stage model is out)."""
        state, why = self.own_health()
        if state != "ready" or self.pipeline is None or self.batcher is None:
            raise ModelNotReadyError(f"model {self.name!r} is not ready: {why or 'still loading'}")
        return self.pipeline, self.batcher


class ServedModels:
    """Every served model's slot, from load to stop."""

    def __init__(
        self, settings: Settings, metrics: Metrics, options: EngineOptions | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.options = options or EngineOptions.from_settings(settings)
        self.repository = ModelRepository(settings.models_dir)
        self.slots: dict[str, ModelSlot] = {}
        self.device = pick_device(settings.device)
        self.forward_plan = self.options.forward_plan(self.device.type)
        self._load_task: asyncio.Task[None] | None = None
        self._eval_mtimes: dict[str, float] = {}
        self._stages: dict[tuple[str, str], StageModel] = {}  # (requested, later) -> it

    def served_names(self) -> list[str]:
        wanted = self.settings.models
        if wanted == ["all"]:
            return [n for n in self.repository.names() if self.repository.available(n)[0]]
        return list(dict.fromkeys(wanted))

    async def start(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(self.forward_plan.threads)
        for name in self.with_stage_models(self.served_names()):
            self.slots[name] = ModelSlot(name)
            self.metrics.model_ready.labels(name).set(0)
        for name, slot in self.slots.items():
            slot.stage_slots = [self.slots[m] for m in self.policy_stage_models(name)]
        self.refresh_eval_metrics()
        self._load_task = asyncio.get_running_loop().create_task(self._load_all())

    def policy_stage_models(self, name: str) -> list[str]:
        """The other models ``name``'s own policies (model.toml views and auto) run later
        stages on; none when its config cannot be read (its load reports that)."""
        try:
            cfg = self.repository.config(name)
        except MidserveError:
            return []
        texts = [t for t in (cfg.default_views, cfg.auto_views) if t]
        models = [m for t in texts for m in parse_policy(t).models]
        return [m for m in dict.fromkeys(models) if m != name]

    def with_stage_models(self, names: list[str]) -> list[str]:
        """``names`` and the later-stage models their policies need, those first: a model
        is loaded and warmed before any model that runs a stage on it."""
        ordered: list[str] = []

        def visit(name: str, path: tuple[str, ...]) -> None:
            if name in ordered or name in path:
                return
            for m in self.policy_stage_models(name):
                visit(m, (*path, name))
            ordered.append(name)

        for name in names:
            visit(name, ())
        return ordered

    def stage_model(self, requested: ModelSlot, name: str) -> StageModel:
        """``name`` as a later stage of ``requested``'s request: served and ready now, and
        (checked once per pair) another model of the same classes, with its view cost."""
        if name not in self.slots:
            raise InvalidRequestError(
                f"a later stage names model {name!r}, which this server does not serve "
                f"(served: {', '.join(self.slots)})"
            )
        other, _ = self.slots[name].ready()
        key = (requested.name, name)
        if key not in self._stages:
            own, _ = requested.ready()
            self._stages[key] = later_stage(own, other)
        return self._stages[key]

    async def _load_all(self) -> None:
        for slot in self.slots.values():
            slot.faults = injector_from_spec(self.settings.fault_injection)
            try:
                pipeline = await asyncio.to_thread(self._load_and_warm, slot)
            except Exception as exc:  # any loading failure: report it, keep the others
                log.exception("model %s failed to load", slot.name)
                slot.state, slot.error = "failed", str(exc) or type(exc).__name__
                continue
            s, engine = self.settings, pipeline.engine
            size = engine.cfg.input_size
            batcher = ViewBatcher(
                slot.name,
                slot.faults.wrap(engine.run_views) if slot.faults else engine.run_views,
                max_batch_views=s.max_batch_views or engine.chunk_views,
                max_wait_s=s.max_wait_ms / 1000.0,
                max_queue_views=max(s.max_queue_views, 1),
                metrics=self.metrics,
                workers=engine.plan.workers,
                threads=engine.plan.threads if engine.device.type == "cpu" else 0,
                view_pixels=view_pixels(engine.cfg.input_size),
                forward_timeout_s=s.forward_timeout_s,
                probe=torch.zeros(1, 3, size, size),
                recovery_limit_s=s.recovery_limit_s,
            )
            batcher.start()
            slot.pipeline, slot.batcher, slot.state = pipeline, batcher, "ready"
            cfg = engine.cfg
            self.metrics.model_info.labels(
                slot.name, cfg.arch, str(cfg.input_size), str(cfg.crop_pct),
                cfg.weights.describe(), str(engine.device), engine.dtype_name,
            ).set(1)  # fmt: skip
            self.metrics.observe_plan(slot.name, engine.plan, engine.tuning)
            self.metrics.model_ready.labels(slot.name).set(1)
            self.metrics.model_unrecovered.labels(slot.name).set(0)
            log.info("model %s ready on %s: %s", slot.name, engine.device, engine.plan.describe())

    def _load_and_warm(self, slot: ModelSlot) -> ImagePipeline:
        name_os_thread(f"net-{slot.name}")  # OpenVINO's inference threads, born here, inherit it
        if slot.faults is not None:
            slot.faults.before_load()
        engine = load_engine(self.repository, slot.name, self.options)
        if self.options.warmup:
            engine.warm_up()
        pipeline = ImagePipeline(
            engine,
            self.settings.max_views_per_request,
            stage_models=lambda name: self.stage_model(slot, name),
        )
        for other in slot.stage_slots:  # its policies' later stages, known before requests
            if other.state == "ready" and other.pipeline is not None:
                self._stages[(slot.name, other.name)] = later_stage(pipeline, other.pipeline)
        return pipeline

    def refresh_eval_metrics(self) -> None:
        """Offline evaluation results (models/<name>/eval.json) as gauges, re-read when the
        file changes, so an evaluation that finishes while the server runs shows up."""
        for name in self.slots:
            path = self.repository.root / name / EVAL_FILE
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            if self._eval_mtimes.get(name) == mtime:
                continue
            self._eval_mtimes[name] = mtime
            try:
                results = read_eval_results(path.parent)
            except EvalResultsError as exc:
                log.warning("ignoring evaluation results of %s: %s", name, exc)
                continue
            for r in results:
                labels = (name, r.config, r.dataset)
                self.metrics.eval_top1.labels(*labels).set(r.top1)
                self.metrics.eval_top5.labels(*labels).set(r.top5)
                self.metrics.eval_images.labels(*labels).set(r.images)

    async def wait_loaded(self) -> None:
        if self._load_task is not None:
            await asyncio.shield(self._load_task)

    async def stop(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        for slot in self.slots.values():
            if slot.batcher is not None:
                await slot.batcher.stop()

    def readiness(self) -> dict[str, dict[str, str]]:
        """Every served model's state (and why, when it is not ready): what /readyz and any
        other readiness route answer from."""
        out = {}
        for name, slot in self.slots.items():
            state, why = slot.health()
            out[name] = {"state": state, **({"error": why} if why else {})}
        return out

    def unrecovered(self) -> dict[str, str]:
        """Models past their recovery limit, and why: what liveness answers from. A model
        still loading or that failed to load does not fail it (a restart changes neither)."""
        return {
            name: why
            for name, slot in self.slots.items()
            if slot.batcher is not None and (why := slot.batcher.unrecovered)
        }

    def slot(self, name: str) -> ModelSlot:
        if name not in self.slots:
            raise UnknownModelError(name, list(self.slots))
        return self.slots[name]

    # -- one request ----------------------------------------------------------------
