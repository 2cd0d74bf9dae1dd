"""The parts finetune, evaluate and import-fixres share: processes and the entry writer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.errors import InvalidRequestError
from app.jobs.distributed import distributed_context
from app.jobs.model_writer import WEIGHTS_FILE, check_output, write_model_entry
from app.model_config import load_model_config
from app.repository import ModelRepository, load_network
from tests.helpers import make_tiny_model


def test_one_process_context_is_world_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed_context("cpu") as ctx:
        assert (ctx.rank, ctx.world, ctx.is_main, ctx.distributed) == (0, 1, True, False)
        assert ctx.device == torch.device("cpu")
        assert ctx.sum([1.0, 2.5]) == [1.0, 2.5]
        ctx.barrier()  # a no-op, not a hang


def test_check_output_refuses_bad_names_and_overwrites(tmp_path: Path) -> None:
    make_tiny_model(tmp_path, "tiny")
    assert check_output(tmp_path, "new", force=False, resume=False) == tmp_path / "new"
    with pytest.raises(InvalidRequestError, match="not a valid model name"):
        check_output(tmp_path, "../up", force=False, resume=False)
    with pytest.raises(InvalidRequestError, match="already exists"):
        check_output(tmp_path, "tiny", force=False, resume=False)
    assert check_output(tmp_path, "tiny", force=True, resume=False) == tmp_path / "tiny"


def test_written_entry_loads_with_the_same_weights(tmp_path: Path) -> None:
    make_tiny_model(tmp_path, "tiny")
    source = load_model_config(tmp_path / "tiny")
    network = load_network(source)
    cfg = source.with_changes(name="copy", parent="tiny")
    written = write_model_entry(network, cfg, source, tmp_path / "copy")
    assert written.folder == tmp_path / "copy" and (tmp_path / "copy" / WEIGHTS_FILE).is_file()
    assert not list((tmp_path / "copy").glob("*.tmp"))
    loaded = ModelRepository(tmp_path).load("copy", "cpu").network.state_dict()
    for key, value in network.state_dict().items():
        assert torch.equal(loaded[key], value), key
