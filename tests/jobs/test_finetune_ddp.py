"""torchrun with two processes (gloo) computes what one process computes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.jobs.finetune.options import FinetuneOptions
from app.jobs.finetune.run import run_finetune
from tests.helpers import PROJECT_ROOT, make_image_folder, make_tiny_model, read_weights


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    make_tiny_model(repo, "tiny")
    data = make_image_folder(tmp_path / "train", classes=4, per_class=6)
    common = ["--test-size", "96", "--epochs", "2", "--batch-size", "8", "--lr", "0.05"]
    env = {
        "PYTHONPATH": str(PROJECT_ROOT),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "OMP_NUM_THREADS": "1",
        "HOME": str(tmp_path),
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "app.cli", "finetune", "tiny", "--data", str(data), "--models-dir", str(repo),
        "--out", "two", "--device", "cpu", "--workers", "0", "--no-progress", *common,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "wrote" in proc.stdout
    one = run_finetune(
        FinetuneOptions(
            model="tiny", data=data, models_dir=repo, out="one", test_size=96, epochs=2,
            batch_size=8, lr=0.05, device="cpu", progress=False,
        )
    )  # fmt: skip
    a, b = read_weights(one.folder), read_weights(repo / "two")
    changed = [k for k in a if not torch.equal(a[k], read_weights(repo / "tiny")[k])]
    assert changed, "the one-process run trained nothing"
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=2e-5, rtol=1e-4, msg=key)
    assert (repo / "two" / "model.toml").read_text().count("world_size = 2") == 1
