from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from app.repository import ModelRepository
from app.runtime.engine import Engine
from tests.helpers import FLOAT32, SAMPLES_MISSING, make_tiny_model, sample_files

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
# Settings built in the suite (in-process apps, CLI subprocesses) load models untuned unless
# a test asks for tuning: start-up stays fast and results do not depend on timings.
os.environ.setdefault("MIDSERVE_TUNE", "false")


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

    return Engine(
        ModelRepository(default_models_dir()).load("tf_efficientnet_lite0", "cpu"), FLOAT32
    )


@pytest.fixture(scope="session")
def samples() -> list[Path]:
    files = sample_files()
    if not files:
        pytest.skip(SAMPLES_MISSING)
    return files
