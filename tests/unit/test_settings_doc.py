"""docs/configuration.md is generated from ``Settings``: every setting described, the document
current, each row's variable the one the environment really sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.cli import main
from app.config import Settings
from app.settings_doc import INTRO, REGENERATE, effective_values, env_name, markdown
from tests.helpers import PROJECT_ROOT

DOC = PROJECT_ROOT / "docs" / "configuration.md"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No MIDSERVE_* variable from the shell running the tests."""
    for key in list(os.environ):
        if key.startswith("MIDSERVE_"):
            monkeypatch.delenv(key)
    return monkeypatch


def documented_variables() -> list[str]:
    rows = [ln for ln in DOC.read_text().splitlines() if ln.startswith("| `")]
    return [row.split("|")[1].strip().strip("`") for row in rows]


def test_every_setting_has_a_description() -> None:
    bare = [n for n, f in Settings.model_fields.items() if not (f.description or "").strip()]
    assert not bare, f"settings without Field(description=...): {bare}"


def test_the_configuration_document_is_current() -> None:
    assert DOC.read_text() == markdown(), f"docs/configuration.md is stale: run `{REGENERATE}`"


def test_each_row_names_the_prefix_and_the_field_in_capitals() -> None:
    expected = sorted(f"MIDSERVE_{name.upper()}" for name in Settings.model_fields)
    assert sorted(documented_variables()) == expected
    assert all(env_name(name) == f"MIDSERVE_{name.upper()}" for name in Settings.model_fields)


def test_the_printed_values_read_back_as_the_same_settings(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    given = Settings(
        models_dir=tmp_path, models=["a", "b"], max_top_k=7, max_wait_ms=0.5, device="cpu",
        dtype="bfloat16", compile=True, chunk_views=4, tune_cache_dir=tmp_path / "tuning",
        grpc_host="0.0.0.0", public_docs=True, fuse=False,
    )  # fmt: skip
    for line in effective_values(given):
        name, _, value = line.partition("=")
        if value:  # empty: unset
            clean_env.setenv(name, value)
    assert Settings() == given


def test_auto_zero_and_empty_mean_unset_where_the_document_says(
    clean_env: pytest.MonkeyPatch,
) -> None:
    unset_by_default = [n for n, f in Settings.model_fields.items() if f.default is None]
    not_spelt = set()
    for name in unset_by_default:
        for spelling in ("auto", "0", ""):
            clean_env.setenv(env_name(name), spelling)
            try:
                if getattr(Settings(), name) is not None:
                    not_spelt.add(name)
            except ValueError:
                not_spelt.add(name)
            clean_env.delenv(env_name(name))
    assert not_spelt == {"compile", "auth_tokens_file"}
    assert all(f"`{env_name(n).removeprefix('MIDSERVE_')}`" in INTRO for n in not_spelt)


def test_midserve_settings_prints_the_values_in_effect_with_tokens_hidden(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("MIDSERVE_MAX_TOP_K", "7")
    clean_env.setenv("MIDSERVE_AUTH_TOKENS", '["s3cret", "other"]')
    assert main(["settings"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "MIDSERVE_MAX_TOP_K=7" in out
    assert "MIDSERVE_AUTH_TOKENS=(2 hidden)" in out
    assert "s3cret" not in "\n".join(out)
    assert len(out) == len(Settings.model_fields)


def test_midserve_settings_refuses_an_environment_that_does_not_validate(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("MIDSERVE_DTYPE", "float64")
    assert main(["settings"]) == 2
    assert "dtype" in capsys.readouterr().err


def test_midserve_settings_markdown_prints_the_document(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("MIDSERVE_MAX_TOP_K", "7")  # the environment does not change the defaults
    assert main(["settings", "--markdown"]) == 0
    assert capsys.readouterr().out == DOC.read_text()
