"""A pipeline outside the server (``midserve classify``, evaluation's timing, jobs): the
requested model loaded now, a cascade's later-stage models on first use, each costed in
the requested model's views as the server costs them."""

from __future__ import annotations

import threading

from app.errors import InvalidRequestError
from app.pipeline import ImagePipeline, later_stage
from app.preparer import StageModel
from app.repository import ModelRepository
from app.runtime.engine import Engine
from app.runtime.load import load_engine
from app.runtime.plan import EngineOptions


class LocalStageModels:
    """Later-stage models of one requested model, loaded from the repository when a stage
    first names them."""

    def __init__(self, repository: ModelRepository, options: EngineOptions) -> None:
        self.repository, self.options = repository, options
        self.requested: ImagePipeline | None = None
        self._loaded: dict[str, StageModel] = {}
        self._lock = threading.Lock()

    def __call__(self, name: str) -> StageModel:
        own = self.requested
        assert own is not None
        if name == own.name:  # refused by later_stage, without loading the model again
            return later_stage(own, own)
        with self._lock:
            if name not in self._loaded:
                if name not in self.repository.names():
                    raise InvalidRequestError(
                        f"a later stage names model {name!r}, which is not in the repository "
                        f"(models: {', '.join(self.repository.names())})"
                    )
                engine = load_engine(self.repository, name, self.options)
                self._loaded[name] = later_stage(own, ImagePipeline(engine))
            return self._loaded[name]


def local_pipeline(
    repository: ModelRepository, engine: Engine, options: EngineOptions, max_views: int = 0
) -> ImagePipeline:
    """``engine``'s pipeline, able to run cascades on the repository's other models."""
    stages = LocalStageModels(repository, options)
    pipeline = ImagePipeline(engine, max_views, stage_models=stages)
    stages.requested = pipeline
    return pipeline
