"""The command line's seams: every job registered explicitly, light to import, one --model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from app.cli import build_parser
from app.errors import InvalidRequestError
from app.jobs.finetune.cli import model_from_args
from tests.helpers import PROJECT_ROOT


def test_every_job_is_a_subcommand() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"evaluate", "finetune", "import-fixres", "bench"} <= set(sub.choices)


def test_the_command_line_imports_no_torch() -> None:
    code = "import sys, app.cli; app.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT, check=True
    )
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "argv",
    [["finetune", "tiny", "--data", "d"], ["finetune", "--model", "tiny", "--data", "d"]],
)
def test_finetune_takes_model_as_flag_or_positional(argv: list[str]) -> None:
    assert model_from_args(build_parser().parse_args(argv)) == "tiny"


def test_finetune_refuses_no_model_or_two() -> None:
    parser = build_parser()
    with pytest.raises(InvalidRequestError, match="no model"):
        model_from_args(parser.parse_args(["finetune", "--data", "d"]))
    with pytest.raises(InvalidRequestError, match="two different"):
        model_from_args(parser.parse_args(["finetune", "a", "--model", "b", "--data", "d"]))


def test_evaluate_and_bench_default_to_the_servers_dtype() -> None:
    parser = build_parser()
    for argv in (["evaluate", "--data", "d"], ["bench"]):
        args = parser.parse_args(argv)
        assert args.dtype is None and args.device is None and args.models_dir is None


def test_auto_and_unset_spell_the_same_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.cli_args import settings_from_args

    monkeypatch.setenv("MIDSERVE_DTYPE", "float32")
    parser = build_parser()
    given = settings_from_args(parser.parse_args(["classify", "x.jpg", "--dtype", "auto"]))
    assert given.dtype is None  # auto: chosen at load, over the environment's float32
    assert settings_from_args(parser.parse_args(["classify", "x.jpg"])).dtype == "float32"
    monkeypatch.setenv("MIDSERVE_DTYPE", "auto")
    assert settings_from_args(parser.parse_args(["classify", "x.jpg"])).dtype is None
