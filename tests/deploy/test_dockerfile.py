"""The Dockerfile: hadolint clean, and the facts the image relies on hold in this checkout.

The image cannot be built here (no Docker engine), so these tests check what a build would
trip over: lint findings, files the build copies but .dockerignore drops, a default model
whose weights would not be inside the image.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
import tomllib

import pytest

from app.model_config import load_model_config
from tests.deploy.tools import MISSING, find_tool
from tests.helpers import PROJECT_ROOT

DOCKERFILE = PROJECT_ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_reports_nothing() -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip(MISSING["hadolint"])
    res = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == ""


def test_runtime_stage_is_non_root_with_readyz_healthcheck_and_serve_command() -> None:
    ins = instructions()
    froms = [args for word, args in ins if word == "FROM"]
    assert len(froms) == 2 and froms[0].endswith("AS build") and froms[1].endswith("AS runtime")
    runtime = ins[[i for i, (w, _) in enumerate(ins) if w == "FROM"][1] :]
    users = [args for word, args in runtime if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert users[-1].split(":")[0].isdigit()  # Kubernetes runAsNonRoot needs a numeric uid
    health = " ".join(args for word, args in runtime if word == "HEALTHCHECK")
    assert "/readyz" in health and ":8000" in health
    cmd = [args for word, args in runtime if word == "CMD"][-1]
    assert cmd == '["midserve", "serve", "--host", "0.0.0.0", "--port", "8000"]'
    env = " ".join(args for word, args in runtime if word == "ENV")
    assert "MIDSERVE_MODELS_DIR=/app/models" in env
    copies = [args for word, args in runtime if word == "COPY"]
    assert "--from=build /opt/venv /opt/venv" in copies and "models ./models" in copies


def test_torch_index_is_a_build_argument_defaulting_to_cpu_wheels() -> None:
    ins = instructions()
    args = dict(a.split("=", 1) for w, a in ins if w == "ARG" and "=" in a)
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    torch_runs = [a for w, a in ins if w == "RUN" and "torch==" in a]
    assert len(torch_runs) == 1 and '--index-url "${TORCH_INDEX_URL}"' in torch_runs[0]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for the common cases: the last matching pattern wins (! re-includes)."""
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat[1:] if negate else pat
        pat = pat.removeprefix("**/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) for p in prefixes) or fnmatch.fnmatch(parts[-1], pat):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_build_copies_and_drops_generated_weights() -> None:
    patterns = [
        ln.strip()
        for ln in (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.strip().startswith("#")
    ]
    copied = []
    for word, args in instructions():
        if word == "COPY" and not args.startswith("--from"):
            copied += args.split()[:-1]
    assert set(copied) == {"pyproject.toml", "README.md", "app", "models"}
    for src in copied:
        assert (PROJECT_ROOT / src).exists(), src
        assert not _ignored(src, patterns), f"{src} is copied but .dockerignore drops it"
    assert not _ignored("models/tf_efficientnet_lite0/model.toml", patterns)
    assert not _ignored("app/api/routes.py", patterns)
    for generated in (
        "models/tiny/weights.safetensors",
        "models/x/eval.json",
        ".venv/bin/python",
        "artifacts/dashboard-proof.md",
        "app/__pycache__/cli.cpython-311.pyc",
    ):
        assert _ignored(generated, patterns), generated


def test_default_model_weights_come_from_an_installed_dependency() -> None:
    """No download at start: the default model's weights are a pip dependency of midserve."""
    cfg = load_model_config(PROJECT_ROOT / "models" / "tf_efficientnet_lite0")
    assert cfg.weights.kind == "package"
    deps = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    dist = cfg.weights.package.replace("_", "-")
    assert any(re.split(r"[<>=!~ \[]", d, maxsplit=1)[0] == dist for d in deps), dist
