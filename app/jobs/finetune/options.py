"""What a fine-tuning run is asked to do and what it returns; no torch, so the CLI can
build its arguments from these names without loading the network code."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from app.jobs.datasets import ClassOrder
from app.model_config import ModelConfig

TRAIN_PARTS = ("classifier", "last-bn", "head-conv")
DEFAULT_TRAIN = "classifier,last-bn"
Augment = Literal["test", "test2", "train", "center"]
AUGMENTS = ("test", "test2", "train")  # "center" is evaluation's, not a training choice
FIXRES_LR_PER_512 = 0.008  # FixRes fine-tuning lr for ResNet-50 at batch 512


def default_lr(batch_size: int) -> float:
    return FIXRES_LR_PER_512 * batch_size / 512


@dataclass(frozen=True)
class FinetuneOptions:
    model: str  # a model name in the repository, or a model.toml / model folder path
    data: Path
    out: str = ""
    models_dir: Path | None = None  # where the source lives and the output goes
    val: Path | None = None
    test_size: int | None = None  # None: the source model's input size
    epochs: int = 10
    batch_size: int = 64  # global: split evenly across processes
    lr: float | None = None  # None: 0.008 x batch / 512 (FixRes)
    lr_step: int | None = None  # None: divide by 10 halfway (FixRes: every 30 of 60 epochs)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    augment: str = "test"
    train: str = DEFAULT_TRAIN
    label_smoothing: float = 0.0
    bn_only: bool = False
    bn_set: bool = False  # with bn_only: add the statistics to the source as a per-resolution set
    class_order: ClassOrder = "ids"
    resume: bool = False
    checkpoint_dir: Path | None = None  # None: <out folder>/checkpoints
    workers: int = 0
    seed: int = 0
    device: str | None = None  # unset: CUDA when there is one
    progress: bool = True
    force: bool = False


@dataclass
class FinetuneResult:
    folder: Path
    cfg: ModelConfig
    history: list[dict[str, float]] = field(default_factory=list)
    val_top1_before: float | None = None
    val_top1: float | None = None
    images: int = 0
    skipped: int = 0
