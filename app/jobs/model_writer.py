"""The one writer of model-repository entries, for finetune and import-fixres.

weights.safetensors first, model.toml last: the repository lists a folder by its
model.toml, so a half-written folder is never listed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from app.errors import InvalidRequestError
from app.model_config import ModelConfig, write_model_config
from app.repository import MODEL_NAME_RE

WEIGHTS_FILE = "weights.safetensors"


def check_output(root: Path, out: str, force: bool, resume: bool) -> Path:
    """The folder for a new entry ``out`` under ``root``; refuses bad names and overwrites."""
    if not MODEL_NAME_RE.match(out):
        raise InvalidRequestError(
            f"--out {out!r} is not a valid model name (letters, digits, '_', '.', '-')"
        )
    folder = root / out
    if (folder / "model.toml").exists() and not (force or resume):
        raise InvalidRequestError(
            f"model {out!r} already exists in {root}; choose another --out or pass --force"
        )
    return folder


def write_model_entry(
    network: nn.Module, cfg: ModelConfig, source: ModelConfig, folder: Path
) -> ModelConfig:
    """Write ``network``'s weights and ``cfg`` into ``folder``; a labels file of ``source``
    comes along. Returns ``cfg`` as written (with its folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(folder / WEIGHTS_FILE)
    if source.labels not in ("imagenet-1k", "none") and source.folder is not None:
        shutil.copyfile(source.folder / source.labels, folder / source.labels)
    out = cfg.with_changes(folder=folder)
    write_model_config(out, folder)
    return out
