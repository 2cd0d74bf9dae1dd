"""Response bodies: the one model that is both the JSON the server and CLI write and the
OpenAPI schema that documents it. No torch in here."""

from __future__ import annotations

from pydantic import BaseModel, Field


class TopClass(BaseModel):
    index: int
    synset: str
    label: str
    prob: float


class ViewBox(BaseModel):
    kind: str
    flip: bool
    box: list[float] = Field(description="[x0, y0, x1, y1] in the uploaded image's pixels")


class ErrorDetail(BaseModel):
    type: str
    message: str


class StageOut(BaseModel):
    spec: str
    views: int
    ran: bool
    gate: str | None = Field(default=None, description="went on while SIGNAL < THRESHOLD")
    signal: float | None = Field(default=None, description="the gate signal it saw")
    model: str = Field(description="the model it ran on (a cascade: another model)")
    view_equivalents: float = Field(
        description="its compute, in the requested model's view-equivalents"
    )


class ImageResult(BaseModel):
    index: int = Field(description="position of the image in the request")
    file: str | None = None
    top: list[TopClass] | None = None
    level: str | None = None
    views: int | None = None
    view_equivalents: float | None = Field(
        default=None,
        description="compute: the views' pixels over one view at the input size (a cascade's "
        "other models' views counted in the requested model's views by measured cost)",
    )
    answered_by: list[str] | None = Field(
        default=None, description="the models whose views the answer averages"
    )
    agreement: float | None = Field(
        default=None, description="share of the views whose own top-1 is the answer"
    )
    temperature: float | None = Field(
        default=None, description="calibration temperature applied (1: none)"
    )
    spec: str | None = None
    policy: str | None = None
    stages: list[StageOut] | None = Field(
        default=None, description="staged policies: each stage, whether it ran, its gate"
    )
    seed: int | None = None
    label: int | None = None
    view_boxes: list[ViewBox] | None = None
    view_top1: list[TopClass] | None = None
    timings_ms: dict[str, float] | None = None
    error: ErrorDetail | None = None


class ClassifyResponse(BaseModel):
    model: str
    results: list[ImageResult]
    timings_ms: dict[str, float]


class ErrorResponse(BaseModel):
    error: ErrorDetail
    results: list[ImageResult] | None = None


class TuningTrialOut(BaseModel):
    plan: str
    backend: str
    dtype: str
    compile: bool
    workers: int
    threads: int
    chunk_views: int
    views_per_s: float | None = None
    max_prob_diff: float | None = Field(default=None, description="vs the plain float32 network")
    top1_agreement: float | None = None
    status: str
    default: bool = False
    chosen: bool = False


class TuningOut(BaseModel):
    source: str = Field(description="tuned (measured at this load) or cached (on disk)")
    seconds: float
    budget_s: float
    chosen: str
    default: str = Field(description="the plan served without tuning")
    candidates: list[TuningTrialOut]


class ModelOut(BaseModel):
    name: str
    state: str = Field(
        description="as readiness reports it: loading | ready | recovering | "
        "failed, a later-stage model's included"
    )
    error: str | None = None
    arch: str
    description: str
    num_classes: int
    input_size: int
    resize_size: int
    crop_pct: float
    interpolation: str
    mean: list[float]
    std: list[float]
    default_views: str
    default_level: str
    auto_views: str | None = Field(
        default=None, description="the measured policy a request without views gets"
    )
    stage_models: list[str] = Field(
        default_factory=list,
        description="the other models its own policies run later stages on (a cascade)",
    )
    parent: str | None = None
    weights: str
    device: str | None = None
    dtype: str | None = None
    fusion: str | None = None  # inference rewrites applied at load (app/runtime/fusion.py)
    bn_sets: list[int] = Field(
        default_factory=list, description="resolutions with their own batch-norm statistics"
    )
    plan: str | None = Field(
        default=None, description="how forwards run (app/runtime/tuning/tuner.py)"
    )
    tuning: TuningOut | None = None
    limits: dict[str, float]


class ModelList(BaseModel):
    models: list[ModelOut]


class Readiness(BaseModel):
    ready: bool
    models: dict[str, dict[str, str]]
