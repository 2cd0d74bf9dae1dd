"""Every setting as an operator reads it: the reference table (docs/configuration.md) and the
values in effect, both built from ``Settings`` itself so neither can drift from the code.

A setting's text is its ``Field(description=...)``; where it matters is where it is declared
(``EngineOptions``: wherever a model runs; ``Settings``: the server) unless the field tags
another scope in ``json_schema_extra``. No torch here: ``midserve settings`` stays fast.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import annotated_types
from pydantic.fields import FieldInfo

from app.config import Settings
from app.runtime.plan import EngineOptions

REGENERATE = "midserve settings --markdown > docs/configuration.md"
SCOPES = {
    "all": "every `midserve` command (the server and the jobs)",
    "server": "`midserve serve`",
    "engine": "how a model runs, wherever one is loaded: serve, classify, evaluate, bench",
}
SCOPE_LEGEND = "\n".join(f"  - **{k}**: {v}" for k, v in SCOPES.items())
INTRO = f"""\
# Configuration

<!-- Generated from app/config.py and app/runtime/plan.py by `{REGENERATE}`;
edit the descriptions there. tests/unit/test_settings_doc.py fails when this file is stale. -->

midserve reads its settings from environment variables with the prefix `MIDSERVE_` (no
settings file is read). `midserve settings` prints the values in effect, one
`MIDSERVE_NAME=value` a line (tokens hidden), and fails on a value that does not validate;
command-line flags such as `--device` or `--models-dir` override the environment for that run.

- Booleans are `true` / `false`; lists are JSON: `MIDSERVE_MODELS='["a", "b"]'`.
- An engine knob left unset is chosen at load: by the tuner (`MIDSERVE_TUNE`), else as its
  row's "untuned" says; a knob that is set fixes its dimension and the tuner times only the
  others. `auto`, `0` or an empty value also mean unset, for every setting whose default is
  unset but `COMPILE` and `AUTH_TOKENS_FILE`.
- The view bounds (batch, queue, per request) count view-equivalents: views of the model's
  input size, a larger view (a whole image at 288 px, a crop at `@320`) counting as its pixels
  over one such view.
- Where it matters (the last column):
{SCOPE_LEGEND}

Deployment (image, compose, Kubernetes, KServe): [deployment.md](deployment.md). Limits and
what a client sees past each: [reliability.md](reliability.md).
"""
HEADER = "| variable | type | default | what it does | where |\n|---|---|---|---|---|"


def env_name(name: str) -> str:
    """The environment variable that sets field ``name``."""
    return f"{Settings.model_config.get('env_prefix', '')}{name.upper()}"


def scope(name: str) -> str:
    """Where a field matters: its ``scope`` tag, else the class that declares it."""
    extra = Settings.model_fields[name].json_schema_extra
    tagged = extra.get("scope") if isinstance(extra, dict) else None
    if isinstance(tagged, str):
        return tagged
    return "engine" if name in EngineOptions.model_fields else "server"


def is_secret(name: str) -> bool:
    extra = Settings.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and extra.get("secret") is True


def ordered_fields() -> list[tuple[str, FieldInfo]]:
    """Fields by scope (all, server, engine), each in declaration order."""
    order = list(SCOPES)
    fields = list(Settings.model_fields.items())
    return sorted(fields, key=lambda item: order.index(scope(item[0])))


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{v}`" for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return " \\| ".join(_type_name(a) for a in args)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return f"JSON list of {_type_name(item)}"
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def type_text(info: FieldInfo) -> str:
    """The type without ``None`` (its default says unset), with its bounds."""
    bounds = (
        (annotated_types.Ge, "ge", "≥"),
        (annotated_types.Gt, "gt", ">"),
        (annotated_types.Le, "le", "≤"),
        (annotated_types.Lt, "lt", "<"),
    )
    text = _type_name(info.annotation)
    for meta in info.metadata:
        for kind, attr, symbol in bounds:
            if isinstance(meta, kind):
                text += f", {symbol} {getattr(meta, attr)}"
    return text


def env_value(value: Any) -> str:
    """A value as the environment spells it (what ``Settings`` reads back)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


def default_text(info: FieldInfo) -> str:
    if info.default_factory is not None:
        doc = (info.default_factory.__doc__ or "computed at start-up").strip()
        return doc.split("\n\n")[0].replace("``", "`").rstrip(".")
    value = info.default
    if value is None:
        return "unset"
    text = f"`{env_value(value)}`" if value != "" else "empty"
    mib = 1 << 20
    if isinstance(value, int) and not isinstance(value, bool) and value and value % mib == 0:
        text += f" ({value // mib} MiB)"
    return text


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def rows() -> Iterator[str]:
    for name, info in ordered_fields():
        cells = [
            f"`{env_name(name)}`",
            type_text(info),
            _cell(default_text(info)),
            _cell(info.description or ""),
            scope(name),
        ]
        yield "| " + " | ".join(cells) + " |"


def markdown() -> str:
    """docs/configuration.md: the introduction and one row per setting."""
    return "\n".join([INTRO, HEADER, *rows()]) + "\n"


def effective_values(settings: Settings) -> list[str]:
    """``MIDSERVE_NAME=value`` for every setting in effect; an empty value is unset, and
    secrets show only how many there are."""
    lines = []
    for name, _ in ordered_fields():
        value = getattr(settings, name)
        shown = f"({len(value)} hidden)" if is_secret(name) and value else env_value(value)
        lines.append(f"{env_name(name)}={shown}")
    return lines
