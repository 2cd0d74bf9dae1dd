from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from app.repository import ModelRepository
from app.runtime.engine import Engine
from tests.helpers import DEFAULT_MODEL, FLOAT32, SAMPLES_MISSING, make_tiny_model, sample_files

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
# In-process apps and CLI jobs (classify, evaluate, finetune) load models untuned unless a
# test asks for tuning: their results are compared exactly and do not depend on timings.
# Servers started by tests/server.py override this: they run the production default, tuned.
os.environ.setdefault("MIDSERVE_TUNE", "false")


@pytest.fixture(scope="session", autouse=True)
def tune_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One tuning cache for the session (MIDSERVE_TUNE_CACHE_DIR): the first server to load
    a model tunes it, later servers of the session read the cached plan."""
    path = tmp_path_factory.mktemp("tuning-cache")
    before = os.environ.get("MIDSERVE_TUNE_CACHE_DIR")
    os.environ["MIDSERVE_TUNE_CACHE_DIR"] = str(path)
    yield path
    if before is None:
        os.environ.pop("MIDSERVE_TUNE_CACHE_DIR", None)
    else:
        os.environ["MIDSERVE_TUNE_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with one tiny real network (10 classes, 64 px views)."""
    root = tmp_path_factory.mktemp("models")
    make_tiny_model(root, "tiny")
    return root


@pytest.fixture(scope="session")
def tiny_engine(tiny_repo: Path) -> Engine:
    return Engine(ModelRepository(tiny_repo).load("tiny", "cpu"), FLOAT32)


@pytest.fixture(scope="session")
def lite0_engine() -> Engine:
    """The embedded default model with its real ImageNet weights."""
    from app.config import default_models_dir

    return Engine(ModelRepository(default_models_dir()).load(DEFAULT_MODEL, "cpu"), FLOAT32)


@pytest.fixture(scope="session")
def samples() -> list[Path]:
    files = sample_files()
    if not files:
        pytest.skip(SAMPLES_MISSING)
    return files
