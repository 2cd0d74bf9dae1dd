"""The one way a served, evaluated or benchmarked model becomes an engine."""

from __future__ import annotations

from app.repository import ModelRepository
from app.runtime.engine import Engine, pick_device
from app.runtime.plan import EngineOptions
from app.runtime.tuning.tuner import tuned_engine


def load_engine(repository: ModelRepository, name: str, options: EngineOptions) -> Engine:
    """The model on its device, run by the plan tuned for this machine when
    ``options.tune`` (app/runtime/tuning/), else by the options' defaults."""
    model = repository.load(name, pick_device(options.device))
    if options.tune:
        return tuned_engine(model, options)
    return Engine(model, options)
