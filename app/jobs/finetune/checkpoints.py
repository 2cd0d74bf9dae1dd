"""Per-epoch checkpoints of a fine-tuning run, and resuming from the latest one."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.errors import InvalidRequestError
from app.jobs.finetune.options import FinetuneResult

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^epoch-(\d+)\.pt$")
# Settings a resumed run must share with the checkpoint it continues.
RESUME_KEYS = ("parent", "test_size", "train", "augment", "batch_size", "lr", "label_smoothing")


def checkpoint_path(folder: Path, epoch: int) -> Path:
    return folder / f"epoch-{epoch:03d}.pt"


def latest_checkpoint(folder: Path) -> Path | None:
    found = []
    for p in folder.glob("epoch-*.pt") if folder.is_dir() else []:
        m = CHECKPOINT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def save_atomic(obj: Any, path: Path) -> None:
    """A checkpoint is either the whole file or absent: an interrupted save leaves a .tmp."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def save_checkpoint(
    path: Path,
    epoch: int,
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    settings: dict[str, Any],
    result: FinetuneResult,
) -> None:
    save_atomic(
        {
            "epoch": epoch,
            "network": network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "history": result.history,
            "settings": {k: settings[k] for k in RESUME_KEYS},
            "val_top1_before": result.val_top1_before,
        },
        path,
    )


def resume(
    ckpt_dir: Path,
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    settings: dict[str, Any],
    result: FinetuneResult,
) -> int:
    """Load the latest checkpoint made with the same settings; returns its epoch."""
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        raise InvalidRequestError(f"--resume: no epoch-NNN.pt checkpoint in {ckpt_dir}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise InvalidRequestError(f"--resume: cannot read {path}: {exc}") from exc
    saved = state.get("settings", {})
    differ = [k for k in RESUME_KEYS if saved.get(k) != settings.get(k)]
    if differ:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}" for k in differ)
        raise InvalidRequestError(f"--resume: {path} was made with other settings ({detail})")
    network.load_state_dict(state["network"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    result.history = list(state.get("history", []))
    if result.val_top1_before is None and state.get("val_top1_before") is not None:
        result.val_top1_before = float(state["val_top1_before"])
    log.info("resuming from %s (epoch %d)", path, state["epoch"])
    return int(state["epoch"])
