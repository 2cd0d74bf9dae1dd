"""Tuning at load: the fastest plan that agrees with float32, measured on this machine.

The CPU speed levers (bf16 autocast, two single-threaded forwards, 8 views a forward) were
measured on one Xeon; on another CPU each can be wrong (bf16 has been slower than float32
there). So when a model loads, candidate plans are timed for a bounded time on the real
machine, with the concurrency they would serve with (N workers = N threads forwarding at
once; aggregate views/s), and the fastest plan whose outputs agree with the plain float32
network is served. The current defaults are always a candidate, and a candidate must beat
them by more than noise to replace them.

Two stages keep a few seconds enough: first each numeric path (backend x dtype x compile)
is checked for agreement and timed at the default shape; then the fastest path's shapes
(views per forward, workers x threads) are timed against the default plan. Measurements
are interleaved in rounds and scored by their best round: a noisy neighbour only ever
slows a run down, and the first round pays one-off set-up. Building and checking the paths
(and a one-off conversion to another runtime, cached on disk) is not timed against the
budget; the timing itself is.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import torch

from app.repository import LoadedModel
from app.runtime.backends import backend_missing
from app.runtime.engine import Engine
from app.runtime.int8 import int8_not_offered, load_int8, read_int8_meta
from app.runtime.machine import cores, cpu_has_int8, cpu_has_native_bf16
from app.runtime.plan import EngineOptions, ForwardPlan
from app.runtime.tuning.agreement import (
    PROBES,
    agreement,
    probe_batch,
    real_outputs,
    real_view_agreement,
    reference_outputs,
)
from app.runtime.tuning.cache import (
    cache_key,
    cache_root,
    machine_identity,
    model_fingerprint,
    read_entry,
    write_entry,
)
from app.runtime.tuning.report import Trial, TuningReport

log = logging.getLogger(__name__)

CPU_CHUNKS = (4, 8, 16)
GPU_CHUNKS = (32, 64, 128)
NOISE = 0.05  # a candidate must beat the default plan by more than this to replace it
CHOICE_RULE = 2  # 2: of plans as fast within NOISE, the most views per forward (chosen_plan)
ROUNDS = 2
STAGE1_SHARE = 0.4  # of the budget, for timing the numeric paths
COMPILE_MIN_BUDGET_S = 120.0  # torch.compile's warm-up is 15-30 s a shape on a small CPU

EngineFactory = Callable[[ForwardPlan], Engine]


def numeric_paths(
    options: EngineOptions,
    device: torch.device,
    default: ForwardPlan,
    budget_s: float,
    int8: bool = False,
) -> list[tuple[str, str, bool]]:
    """(backend, dtype, compile) candidates, the default's first; forced ones only.
    ``int8``: the model has a quantized network this CPU runs natively (OpenVINO only)."""
    fixed = options.fixed()
    if device.type == "cpu":
        dtypes = ["float32"] + (["bfloat16"] if cpu_has_native_bf16() else [])
        dtypes += ["int8"] if int8 else []
        backends = ["torch", "openvino"]
    else:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtypes = ["float32", *(["bfloat16"] if bf16 else []), "float16"]
        backends = ["torch"]
    compiles = [False, True] if budget_s >= COMPILE_MIN_BUDGET_S else [False]
    dtypes = [fixed["dtype"]] if "dtype" in fixed else dtypes
    backends = [fixed["backend"]] if "backend" in fixed else backends
    compiles = [fixed["compile"]] if "compile" in fixed else compiles
    paths = [(default.backend, default.dtype, default.compile)]
    for backend in backends:
        for dtype in dtypes:
            if dtype == "int8" and backend != "openvino":
                continue
            for compiled in compiles if backend == "torch" else [False]:
                if (backend, dtype, compiled) not in paths:
                    paths.append((backend, dtype, compiled))
    return paths


def shapes(options: EngineOptions, device: torch.device) -> list[tuple[int, int, int]]:
    """(workers, threads, chunk_views) candidates; forced ones only."""
    fixed, n = options.fixed(), cores()
    chunks = [fixed["chunk_views"]] if "chunk_views" in fixed else None
    if device.type != "cpu":
        return [(fixed.get("workers", 1), fixed.get("threads", 0), c) for c in chunks or GPU_CHUNKS]
    if "workers" in fixed:
        teams = [(fixed["workers"], fixed.get("threads") or max(1, n // fixed["workers"]))]
    elif "threads" in fixed:
        teams = [(1, fixed["threads"]), (2, fixed["threads"])]
    else:
        teams = list(dict.fromkeys([(1, n), (2, max(1, n // 2))] if n >= 2 else [(1, 1)]))
    return [(w, t, c) for w, t in teams for c in chunks or CPU_CHUNKS]


def measure(engine: Engine, plan: ForwardPlan, seconds: float) -> float:
    """Aggregate views/s of ``plan.workers`` threads forwarding at once for ``seconds``
    (each runs at least one timed forward, after an untimed one)."""
    engine.apply(plan)
    size = engine.cfg.input_size
    g = torch.Generator().manual_seed(1)
    # uint8 channels_last, as served views arrive: the normalisation is part of the forward
    pixels = torch.randint(
        0, 256, (plan.chunk_views, size, size, 3), dtype=torch.uint8, generator=g
    )
    x = pixels.permute(0, 3, 1, 2)
    counts = [0] * plan.workers
    start = threading.Barrier(plan.workers + 1)
    stop_at = [0.0]

    def work(i: int) -> None:
        if engine.device.type == "cpu" and plan.threads:
            torch.set_num_threads(plan.threads)
        engine.run_views(x)  # untimed: a new shape or team pays its set-up here
        start.wait()
        while True:
            engine.run_views(x)
            counts[i] += plan.chunk_views
            if time.perf_counter() >= stop_at[0]:
                return

    workers = [threading.Thread(target=work, args=(i,)) for i in range(plan.workers)]
    for w in workers:
        w.start()
    stop_at[0] = float("inf")
    start.wait()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - t0)


class Tuner:
    """One model's tuning run: build and check each path, then time in two stages."""

    def __init__(self, model: LoadedModel, options: EngineOptions, factory: EngineFactory):
        self.model, self.options, self.factory = model, options, factory
        self.default = options.forward_plan(model.device.type)
        self.engines: dict[tuple[str, str, bool], Engine] = {}
        self.trials: list[Trial] = []

    def _trial(self, plan: ForwardPlan) -> Trial:
        for t in self.trials:
            if t.plan == plan:
                return t
        trial = Trial(plan, default=plan == self.default)
        self.trials.append(trial)
        return trial

    def check_paths(self, paths: list[tuple[str, str, bool]]) -> None:
        probes = probe_batch(self.model.cfg.input_size)
        reference = reference_outputs(self.model, probes)
        for backend, dtype, compiled in paths:
            plan = dataclasses.replace(self.default, backend=backend, dtype=dtype, compile=compiled)
            trial = self._trial(plan)
            missing = backend_missing(backend)
            if missing:
                log.info("tuning %s: skipping %s: %s", self.model.cfg.name, backend, missing)
                trial.status = f"skipped: {missing}"
                continue
            try:
                engine = self.factory(plan)
            except Exception as exc:  # a path this machine cannot build is not a candidate
                trial.status = f"skipped: {type(exc).__name__}: {exc}"
                continue
            if engine.plan.backend != backend:
                trial.status = f"skipped: {backend} could not run this model (see log)"
                continue
            engine.apply(dataclasses.replace(plan, chunk_views=PROBES))
            if dtype == "int8":  # on real held-out views: synthetic probes are outside the
                # ranges int8 was calibrated for, and its rounding shows on photos, not there
                batches = load_int8(self.model).check_views()
                trial.max_prob_diff, trial.top1_agreement, ok = real_view_agreement(
                    *real_outputs(self.model, engine.run_views, batches)
                )
                verdict = "rejected: disagrees with float32 on real views"
            else:
                trial.max_prob_diff, trial.top1_agreement, ok = agreement(
                    reference, engine.run_views(probes)
                )
                verdict = "rejected: disagrees with float32"
            if not ok:
                trial.status = verdict
                continue
            self.engines[(backend, dtype, compiled)] = engine

    def time_all(self, plans: list[ForwardPlan], seconds: float, deadline: float) -> None:
        """Interleaved rounds (A, B, A, B), each plan's score its best round."""
        for plan in plans:
            self._trial(plan)  # listed even if the budget runs out before its turn
        slice_s = seconds / max(1, ROUNDS * len(plans))
        for _ in range(ROUNDS):
            for plan in plans:
                if time.perf_counter() >= deadline:
                    return
                engine = self.engines[(plan.backend, plan.dtype, plan.compile)]
                rate = measure(engine, plan, slice_s)
                trial = self._trial(plan)
                trial.views_per_s = max(trial.views_per_s or 0.0, rate)
                trial.status = "measured"

    def run(self, budget_s: float) -> ForwardPlan:
        device = self.model.device
        why_not = why_no_int8(self.model, self.options)
        if why_not and cpu_has_int8():
            log.info("tuning %s: no int8 candidate: %s", self.model.cfg.name, why_not)
        int8 = why_not is None
        self.check_paths(numeric_paths(self.options, device, self.default, budget_s, int8))
        if not self.engines:
            return self.fallback()
        start = time.perf_counter()
        deadline = start + budget_s
        stage1 = [
            dataclasses.replace(self.default, backend=b, dtype=d, compile=c)
            for b, d, c in self.engines
        ]
        self.time_all(stage1, budget_s * STAGE1_SHARE, deadline)
        best = max(stage1, key=lambda p: self._trial(p).views_per_s or 0.0)
        stage2 = [dataclasses.replace(best, workers=w, threads=t, chunk_views=c)
                  for w, t, c in shapes(self.options, device)]  # fmt: skip
        if self.default in stage1 and self.default not in stage2:
            stage2.insert(0, self.default)
        checked = self._trial(best)
        for plan in stage2:  # same numeric path: the same agreement
            trial = self._trial(plan)
            trial.max_prob_diff, trial.top1_agreement = (
                checked.max_prob_diff,
                checked.top1_agreement,
            )
        self.time_all(stage2, deadline - time.perf_counter(), deadline)
        for trial in self.trials:
            if trial.status == "pending":
                trial.status = "skipped: budget"
        return self.choose()

    def fallback(self) -> ForwardPlan:
        """The default plan, unless its numeric path disagreed: then torch float32."""
        if not self._trial(self.default).status.startswith("rejected"):
            return self.default
        if "dtype" in self.options.fixed():
            log.warning("tuning %s: the forced dtype disagrees with float32", self.model.cfg.name)
            return self.default
        return dataclasses.replace(self.default, backend="torch", dtype="float32", compile=False)

    def choose(self) -> ForwardPlan:
        measured = [t for t in self.trials if t.views_per_s]
        return chosen_plan(measured) if measured else self.fallback()


def chosen_plan(measured: list[Trial]) -> ForwardPlan:
    """The default plan unless the fastest measured one beats it by more than NOISE; then,
    of the plans on the fastest one's path and team that are as fast within NOISE, the one
    with the most views per forward.

    Serving pays per forward what the raw timing does not (assembling the batch, handing it
    to a forward thread and back, all under the GIL), so at equal raw speed more views per
    forward serve faster: the default model in int8 2x1 on a 2-vCPU EPYC timed 678 views/s
    at 4 views a forward and 672 at 8, yet over HTTP (10 views) 8 served 1.22x the views/s
    of 4 at concurrency 1 and 1.07x at 8 (docs/benchmarks.md)."""

    def rate(trial: Trial) -> float:
        return trial.views_per_s or 0.0

    fastest = max(measured, key=rate)
    default = next((t for t in measured if t.default), None)
    if default is not None and rate(fastest) < rate(default) * (1 + NOISE):
        return default.plan  # not faster than the defaults by more than noise

    def path_and_team(plan: ForwardPlan) -> ForwardPlan:
        return dataclasses.replace(plan, chunk_views=0)

    as_fast = [
        t for t in measured
        if path_and_team(t.plan) == path_and_team(fastest.plan)
        and rate(t) >= rate(fastest) * (1 - NOISE)
    ]  # fmt: skip
    return max(as_fast, key=lambda t: (t.plan.chunk_views, rate(t))).plan


def why_no_int8(model: LoadedModel, options: EngineOptions) -> str | None:
    """Why int8 is not a candidate for ``model`` under ``options``; None: it is."""
    return int8_not_offered(model) if options.int8 else "MIDSERVE_INT8=false"


def tuning_key(model: LoadedModel, options: EngineOptions, budget_s: float) -> str:
    device = model.device
    default = options.forward_plan(device.type)
    int8 = why_no_int8(model, options) is None
    space = {
        "rule": CHOICE_RULE,  # a plan chosen by an older rule is chosen again
        "paths": numeric_paths(options, device, default, budget_s, int8),
        "int8": read_int8_meta(model) if int8 else None,  # a new quantization re-tunes
        "shapes": shapes(options, device),
        "default": dataclasses.asdict(default),
        "openvino": backend_missing("openvino") is None,
    }
    return cache_key(machine_identity(device), model_fingerprint(model), str(device), space)


def tuned_engine(
    model: LoadedModel, options: EngineOptions, factory: EngineFactory | None = None
) -> Engine:
    """The engine for ``model`` with the plan tuned for this machine (cached on disk)."""
    make = factory or (lambda plan: Engine(model, options, plan))
    budget = max(0.0, options.tune_seconds)
    key = tuning_key(model, options, budget)
    path = cache_root(options.tune_cache_dir) / f"{key}.json"
    cached = read_entry(path)
    report = TuningReport.from_json(cached, key) if cached else None
    if report is not None:
        engine = make(report.chosen)
        engine.apply(report.chosen)
    else:
        t0 = time.perf_counter()
        threads_before = torch.get_num_threads()
        tuner = Tuner(model, options, make)
        try:
            chosen = tuner.run(budget)
        finally:
            torch.set_num_threads(threads_before)
        engine = tuner.engines.get((chosen.backend, chosen.dtype, chosen.compile)) or make(chosen)
        engine.apply(chosen)
        report = TuningReport(key, "tuned", time.perf_counter() - t0, budget, chosen,
                              tuner.default, tuner.trials)  # fmt: skip
        write_entry(path, report.to_json())
    engine.tuning = report
    log.info("tuning %s (%s):\n%s", model.cfg.name, report.source, report.table())
    return engine
