"""Every Prometheus metric midserve exposes, defined once.

Each app gets its own CollectorRegistry (no global state), so tests can build many apps in
one process. Names follow Prometheus conventions: ``midserve_`` prefix, base units
(seconds, bytes), ``_total`` for counters.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from app.answers import GateRecord
    from app.pipeline import Prediction
    from app.runtime.plan import ForwardPlan
    from app.runtime.tuning.report import TuningReport

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
SIGNAL_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
VIEW_BUCKETS = (1, 2, 4, 5, 8, 10, 16, 20, 30, 32, 40, 64, 128, 256, 512)
STAGES = ("decode", "preprocess", "queue_wait", "forward", "postprocess")


def _remember_children(metric: MetricWrapperBase) -> None:
    """``metric.labels(*values)`` looked up once per label set: prometheus_client checks
    the values and takes a lock on every call (~10 us; a classify request made ~14 such
    calls on the event loop). The children are the ones it keeps itself, and none is ever
    removed, so a remembered one stays the live one; label values come from bounded sets
    (models, stages, statuses, capped policies)."""
    setattr(metric, "labels", functools.lru_cache(maxsize=4096)(metric.labels))  # noqa: B010


class _CappedLabel:
    """Keeps a client-chosen label value (the view policy) from exploding cardinality."""

    def __init__(self, limit: int = 50) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return "other"


class _CudaMemoryCollector(Collector):
    """GPU memory read at scrape time; nothing is exported on a CPU-only host."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import torch

        if not torch.cuda.is_available():
            return
        allocated = GaugeMetricFamily(
            "midserve_gpu_memory_allocated_bytes", "Memory held by tensors", labels=["device"]
        )
        reserved = GaugeMetricFamily(
            "midserve_gpu_memory_reserved_bytes", "Memory reserved by torch", labels=["device"]
        )
        for i in range(torch.cuda.device_count()):
            allocated.add_metric([f"cuda:{i}"], float(torch.cuda.memory_allocated(i)))
            reserved.add_metric([f"cuda:{i}"], float(torch.cuda.memory_reserved(i)))
        yield allocated
        yield reserved


class Metrics:
    """The service's metrics; one instance per app."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            "midserve_request_duration_seconds",
            "Classify request latency, end to end inside the server",
            ["model", "level", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "midserve_stage_duration_seconds",
            "Time per pipeline stage (decode, preprocess, queue_wait, forward, postprocess)",
            ["model", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.views_per_request = Histogram(
            "midserve_views_per_request", "Views classified per image", ["model"],
            buckets=VIEW_BUCKETS, registry=r,
        )  # fmt: skip
        self.compute_per_request = Histogram(
            "midserve_view_equivalents_per_request",
            "Compute per image: pixels of its views over one view at the model's input size",
            ["model"], buckets=VIEW_BUCKETS, registry=r,
        )  # fmt: skip
        self.escalated = Counter(
            "midserve_images_escalated_total",
            "Images a staged policy's gate sent on to a later stage, by stage",
            ["model", "stage"], registry=r,
        )  # fmt: skip
        self.stage_compute = Counter(
            "midserve_stage_view_equivalents_total",
            "Compute each stage of a staged policy ran, in the requested model's "
            "view-equivalents, by requested model, stage and the model the stage ran on",
            ["model", "stage", "stage_model"], registry=r,
        )  # fmt: skip
        self.answered_by = Counter(
            "midserve_answers_by_model_total",
            "Images answered, by requested model and the models whose views the answer "
            "averaged ('+'-joined; a cascade's later model when it answered)",
            ["model", "answered_by"], registry=r,
        )  # fmt: skip
        self.gate_signal = Histogram(
            "midserve_gate_signal",
            "Gate signal of staged policies (top-1 prob, margin or view agreement)",
            ["model", "signal"], buckets=SIGNAL_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_views = Histogram(
            "midserve_batch_views", "Views per forward pass (batch fill)", ["model"],
            buckets=VIEW_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_requests = Histogram(
            "midserve_batch_requests", "Distinct requests sharing one forward pass", ["model"],
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r,
        )  # fmt: skip
        self.queue_views = Gauge(
            "midserve_queue_views",
            "View-equivalents waiting for a forward pass",
            ["model"],
            registry=r,
        )
        self.in_flight = Gauge(
            "midserve_in_flight_requests", "Classify requests being processed", registry=r
        )
        # the bound MIDSERVE_MAX_INFLIGHT_BODY_BYTES (app/api/middleware.py)
        self.body_bytes_in_flight = Gauge(
            "midserve_body_bytes_in_flight",
            "Request-body bytes held by requests in flight (a declared Content-Length is "
            "reserved whole at admission, a chunked body counted as it arrives)",
            registry=r,
        )
        self.body_bytes_refused = Counter(
            "midserve_body_bytes_refused_requests_total",
            "Requests refused with 503 because their body would take the body bytes in flight "
            "over the bound, by when (declared: before reading, chunked: mid-body)",
            ["when"], registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "midserve_requests_total", "HTTP requests by route and status code",
            ["route", "status"], registry=r,
        )  # fmt: skip
        self.images = Counter(
            "midserve_images_total", "Images classified or refused, by outcome",
            ["model", "outcome"], registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "midserve_errors_total", "Errors answered, by model and error type",
            ["model", "type"], registry=r,
        )  # fmt: skip
        self.labelled = Counter(
            "midserve_labelled_images_total", "Images that came with a ground-truth label",
            ["model", "level", "policy"], registry=r,
        )  # fmt: skip
        self.top1_hits = Counter(
            "midserve_top1_hits_total", "Labelled images whose top-1 class was right",
            ["model", "level", "policy"], registry=r,
        )  # fmt: skip
        self.top5_hits = Counter(
            "midserve_top5_hits_total", "Labelled images whose label was in the top 5",
            ["model", "level", "policy"], registry=r,
        )  # fmt: skip
        self.model_info = Gauge(
            "midserve_model_info", "Served model (value 1) with its architecture and weights",
            ["model", "arch", "input_size", "crop_pct", "weights", "device", "dtype"],
            registry=r,
        )  # fmt: skip
        self.model_ready = Gauge(
            "midserve_model_ready", "1 when the model is loaded and warmed up", ["model"],
            registry=r,
        )  # fmt: skip
        self.eval_top1 = Gauge(
            "midserve_eval_top1", "Offline evaluation top-1 accuracy (0-1)",
            ["model", "config", "dataset"], registry=r,
        )  # fmt: skip
        self.eval_top5 = Gauge(
            "midserve_eval_top5", "Offline evaluation top-5 accuracy (0-1)",
            ["model", "config", "dataset"], registry=r,
        )  # fmt: skip
        self.eval_images = Gauge(
            "midserve_eval_images", "Images in the offline evaluation",
            ["model", "config", "dataset"], registry=r,
        )  # fmt: skip
        self.forward_plan = Gauge(
            "midserve_forward_plan_info",
            "How the model's forwards run (value 1); tuned at load unless settings force it",
            ["model", "backend", "dtype", "compile", "workers", "threads", "chunk_views",
             "source"], registry=r,
        )  # fmt: skip
        self.tuning_views_per_s = Gauge(
            "midserve_tuning_views_per_second",
            "Raw forward throughput of each plan timed at load (the chosen one: chosen=1)",
            ["model", "plan", "chosen"], registry=r,
        )  # fmt: skip
        # faults survived (docs/reliability.md): each one counted where it happens
        self.forward_faults = Counter(
            "midserve_forward_faults_total",
            "Forward passes that failed, by kind (raised, out_of_memory, stalled, worker_died)",
            ["model", "kind"], registry=r,
        )  # fmt: skip
        self.forward_retries = Counter(
            "midserve_forward_retries_total",
            "Forwards run again: split in halves after out of memory, rerun after a worker died",
            ["model", "reason"], registry=r,
        )  # fmt: skip
        self.worker_restarts = Counter(
            "midserve_forward_worker_restarts_total",
            "Forward workers replaced, by reason (died, stalled)", ["model", "reason"],
            registry=r,
        )  # fmt: skip
        self.stuck_workers = Gauge(
            "midserve_forward_workers_stuck",
            "Forward threads the watchdog gave up on whose forward has not returned yet",
            ["model"], registry=r,
        )  # fmt: skip
        self.model_unready = Counter(
            "midserve_model_unready_total",
            "Times a loaded model was taken out of readiness (a stalled forward)",
            ["model", "reason"], registry=r,
        )  # fmt: skip
        self.model_recoveries = Counter(
            "midserve_model_recoveries_total",
            "Times a model taken out of readiness answered a probe forward and came back",
            ["model"], registry=r,
        )  # fmt: skip
        self.model_unrecovered = Gauge(
            "midserve_model_unrecovered",
            "1 while a model has been out of readiness longer than recovery_limit_s: "
            "liveness (/healthz) fails so an orchestrator restarts the process",
            ["model"], registry=r,
        )  # fmt: skip
        # slow and abusive clients at the HTTP layer (app/api/http_protocol.py)
        self.header_timeouts = Counter(
            "midserve_header_timeouts_total",
            "Connections closed for not sending a request's headers within "
            "HEADER_READ_TIMEOUT_S (state: partial, answered 408; idle, nothing sent)",
            ["state"], registry=r,
        )  # fmt: skip
        self.connections_refused = Counter(
            "midserve_connections_refused_total",
            "Requests answered 503 too_many_connections (over MAX_CONNECTIONS)", registry=r,
        )  # fmt: skip
        r.register(_CudaMemoryCollector())
        self.policy_label = _CappedLabel()
        for metric in vars(self).values():
            if isinstance(metric, MetricWrapperBase) and metric._labelnames:
                _remember_children(metric)

    def observe_plan(self, model: str, p: ForwardPlan, t: TuningReport | None) -> None:
        """The served plan, and what tuning measured."""
        source = t.source if t is not None else "settings"
        self.forward_plan.labels(model, p.backend, p.dtype, str(p.compile).lower(),
                                 str(p.workers), str(p.threads), str(p.chunk_views),
                                 source).set(1)  # fmt: skip
        if t is None:
            return
        for trial in t.trials:
            if trial.views_per_s:
                chosen = "1" if trial.plan == t.chosen else "0"
                self.tuning_views_per_s.labels(model, trial.plan.describe(), chosen).set(
                    trial.views_per_s
                )

    def observe_prediction(
        self, model: str, pred: Prediction, gates: Iterable[GateRecord] = ()
    ) -> None:
        """One answered image: its stage timings, views, compute and gate signals."""
        for stage, seconds in pred.timings.items():
            self.stage_duration.labels(model, stage).observe(seconds)
        self.views_per_request.labels(model).observe(len(pred.views))
        self.compute_per_request.labels(model).observe(pred.view_equivalents)
        self.answered_by.labels(model, "+".join(pred.answered_by or [model])).inc()
        for k, report in enumerate(pred.stages or ()):
            if report.ran:
                self.stage_compute.labels(model, str(k + 1), report.model).inc(
                    report.view_equivalents
                )
        for record in gates:
            self.gate_signal.labels(model, record.gate.signal).observe(record.value)

    def observe_accuracy(
        self, model: str, level: str, policy: str, label: int, ranked: Iterable[int]
    ) -> None:
        """Count one labelled image; ``ranked`` are class indices, best first (at least 5)."""
        top5 = list(ranked)[:5]
        policy = self.policy_label(policy)
        self.labelled.labels(model, level, policy).inc()
        if top5 and top5[0] == label:
            self.top1_hits.labels(model, level, policy).inc()
        if label in top5:
            self.top5_hits.labels(model, level, policy).inc()
