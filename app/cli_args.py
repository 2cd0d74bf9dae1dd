"""Arguments every ``midserve`` subcommand spells the same way, and Settings from them.

Apart from ``app/cli.py`` so that each job's own ``cli.py`` can use them without importing
the module that imports it. No torch here: ``midserve --help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from app.runtime.plan import DTYPE_NAMES

if TYPE_CHECKING:
    from app.config import Settings

DEFAULT_MODEL = "tf_efficientnet_lite0"


def add_model_arg(p: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL) -> None:
    """``--model`` means the same in every subcommand that takes one."""
    p.add_argument("--model", default=default, required=default is None,
                   help=f"model-repository name (default: {default})")  # fmt: skip


def add_engine_args(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    """Where the models are and how they run; unset flags keep the MIDSERVE_* settings.
    ``dtype=False`` for a job that picks its own precision (training)."""
    p.add_argument("--models-dir", type=Path, default=None, help="model repository folder")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    if dtype:
        p.add_argument("--dtype", default=None, choices=("auto", *DTYPE_NAMES),
                       help="default: MIDSERVE_DTYPE, else auto (as the server)")  # fmt: skip


def settings_from_args(args: argparse.Namespace) -> Settings:
    """``Settings`` (environment) with the command line's explicit flags on top."""
    from app.config import Settings

    overrides = {
        "models_dir": getattr(args, "models_dir", None),
        "device": getattr(args, "device", None),
        "dtype": getattr(args, "dtype", None),
    }
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def add_job_parser(sub: argparse._SubParsersAction, name: str, summary: str, doc: str | None
                   ) -> argparse.ArgumentParser:  # fmt: skip
    """A job's subcommand, its module docstring as the long description."""
    return sub.add_parser(
        name, help=summary, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
