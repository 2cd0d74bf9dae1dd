"""One model's configuration, read from ``models/<name>/model.toml``.

Serving, evaluation and fine-tuning all read this one object, so preprocessing can never
drift between them (the same role as timm's PretrainedCfg).
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

import tomli_w

from app.errors import InvalidRequestError, ModelConfigError
from app.tta.levels import LEVELS
from app.tta.stages import parse_policy
from app.tta.views import resize_for

Interpolation = Literal["bicubic", "bilinear", "nearest"]
WeightsKind = Literal["package", "file", "hub", "none"]
KeyMapping = Literal["exact", "in-order", "strip-prefix"]
INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)
WEIGHTS_KINDS: tuple[str, ...] = get_args(WeightsKind)
KEY_MAPPINGS: tuple[str, ...] = get_args(KeyMapping)


@dataclass(frozen=True)
class WeightsSource:
    """Where the weights come from and how their names map onto the architecture.

    kind: ``package`` (a file inside an installed pip package), ``file`` (a path, relative
    to the model folder), ``hub`` (timm's pretrained download; only when online) or
    ``none`` (random init; tests and smoke checks only).
    """

    kind: WeightsKind = "file"
    package: str = ""
    path: str = ""
    key_mapping: KeyMapping = "exact"
    strip_prefix: str = ""
    state_dict_key: str = ""  # e.g. "model" for FixRes checkpoints ({"model": {...}})

    def describe(self) -> str:
        if self.kind == "package":
            return f"package:{self.package}/{self.path}"
        if self.kind == "file":
            return f"file:{self.path}"
        return self.kind


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build, feed and label one served model."""

    name: str
    arch: str
    weights: WeightsSource
    num_classes: int = 1000
    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: Interpolation = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    labels: str = "imagenet-1k"  # or a file name in the model folder, one "synset name" a line
    default_views: str = "fixed:5,mfixed:5"
    default_level: str = "softmax"
    # what ``views=auto`` serves: a policy chosen by measurement (``evaluate --policies
    # --write-policy``); empty: the built-in aspect-ratio rule (app/tta/adaptive.py)
    auto_views: str = ""
    description: str = ""
    parent: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    # batch-norm statistics per test resolution: shorter side of a view -> file in the
    # folder (app/runtime/bn_sets.py); views nearest a resolution run with its set
    bn_sets: dict[int, str] = field(default_factory=dict)
    # calibration temperatures by the views averaged and level (``spec@level``), fitted by
    # ``evaluate --write-policy`` (app/tta/calibration.py); answers of other views: none
    calibration: dict[str, float] = field(default_factory=dict)
    folder: Path | None = None

    @property
    def resize_size(self) -> int:
        """Shorter side after the single resize (``app.tta.views.resize_for``)."""
        return resize_for(self.input_size, self.crop_pct)

    @property
    def crop_to_image_ratio(self) -> float:
        return self.input_size / self.resize_size

    def with_changes(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    def to_toml_dict(self) -> dict[str, Any]:
        """The inverse of :func:`parse_model_config` (used by jobs that write new entries)."""
        weights = {k: v for k, v in asdict(self.weights).items() if v not in ("", None)}
        out: dict[str, Any] = {"model": {"arch": self.arch}, "weights": weights}
        for key in TOML_KEYS:
            value = getattr(self, key.attr)
            if not (key.optional and value == ""):
                table = out.setdefault(key.table, {})
                table[key.key] = list(value) if isinstance(value, tuple) else value
        if self.provenance:
            out["provenance"] = self.provenance
        if self.bn_sets:
            out["bn_sets"] = {str(size): path for size, path in sorted(self.bn_sets.items())}
        if self.calibration:
            out["calibration"] = dict(sorted(self.calibration.items()))
        return out


def _triple(value: Any, what: str) -> tuple[float, float, float]:
    if not (isinstance(value, list) and len(value) == 3):
        raise ModelConfigError(f"{what} must be a list of three numbers, got {value!r}")
    a, b, c = (float(v) for v in value)
    return (a, b, c)


@dataclass(frozen=True)
class TomlKey:
    """Where a plain ``ModelConfig`` field lives in model.toml, and how it is read. A key
    the file leaves out takes the field's default: the dataclass states every default."""

    table: str
    key: str
    attr: str
    read: Callable[[Any], Any] = str
    optional: bool = False  # written only when not empty


TOML_KEYS = (  # in the order they are written
    TomlKey("model", "num_classes", "num_classes", int),
    TomlKey("model", "labels", "labels"),
    TomlKey("model", "description", "description", optional=True),
    TomlKey("model", "parent", "parent", optional=True),
    TomlKey("preprocess", "input_size", "input_size", int),
    TomlKey("preprocess", "crop_pct", "crop_pct", float),
    TomlKey("preprocess", "interpolation", "interpolation"),
    TomlKey("preprocess", "mean", "mean", lambda v: _triple(v, "mean")),
    TomlKey("preprocess", "std", "std", lambda v: _triple(v, "std")),
    TomlKey("policy", "views", "default_views"),
    TomlKey("policy", "level", "default_level"),
    TomlKey("policy", "auto", "auto_views", optional=True),
)


def _choice(name: str, what: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ModelConfigError(f"{name}: {what} must be {'|'.join(allowed)}, got {value!r}")


def parse_model_config(name: str, data: dict[str, Any], folder: Path | None = None) -> ModelConfig:
    """Validate a model.toml document; every problem raises ModelConfigError naming the key."""
    try:
        model = data["model"]
        arch = str(model["arch"])
    except (KeyError, TypeError) as exc:
        raise ModelConfigError(f"{name}: [model] arch is required") from exc
    w = data.get("weights", {})
    given_w: dict[str, Any] = {f.name: w[f.name] for f in fields(WeightsSource) if f.name in w}
    _choice(name, "weights.kind", given_w.get("kind", WeightsSource.kind), WEIGHTS_KINDS)
    mapping = given_w.get("key_mapping", WeightsSource.key_mapping)
    _choice(name, "weights.key_mapping", mapping, KEY_MAPPINGS)
    texts: dict[str, Any] = {k: str(v) for k, v in given_w.items()}  # kind checked above
    weights = WeightsSource(**texts)
    if weights.kind == "package" and not (weights.package and weights.path):
        raise ModelConfigError(f"{name}: weights.kind = 'package' needs package and path")
    if weights.kind == "file" and not weights.path:
        raise ModelConfigError(f"{name}: weights.kind = 'file' needs path")
    pre = data.get("preprocess", {})
    if "interpolation" in pre and pre["interpolation"] not in INTERPOLATIONS:
        raise ModelConfigError(f"{name}: interpolation must be one of {INTERPOLATIONS}")
    policy = data.get("policy", {})
    bn_sets: dict[int, str] = {}
    for key, path in dict(data.get("bn_sets", {})).items():
        if not (str(key).isdigit() and isinstance(path, str) and path):
            raise ModelConfigError(f"{name}: bn_sets maps a resolution to a file, got {key!r}")
        bn_sets[int(key)] = path
    calibration: dict[str, float] = {}
    for key, value in dict(data.get("calibration", {})).items():
        if not (isinstance(value, int | float) and 0 < value < 1000):
            raise ModelConfigError(f"{name}: calibration[{key!r}] must be a positive number")
        calibration[str(key)] = float(value)
    if "level" in policy and policy["level"] not in LEVELS:
        raise ModelConfigError(f"{name}: policy.level must be one of {LEVELS}")
    for key in ("views", "auto"):  # a bad policy fails at load, not on every request
        text = str(policy.get(key, ""))
        try:
            adaptive = bool(text) and parse_policy(text).adaptive
        except InvalidRequestError as exc:
            raise ModelConfigError(f"{name}: policy.{key} = {text!r}: {exc}") from exc
        if key == "auto" and adaptive:
            raise ModelConfigError(f"{name}: policy.auto must be a view spec, not 'auto'")
    tables = {"model": model, "preprocess": pre, "policy": policy}
    try:
        given = {
            k.attr: k.read(tables[k.table][k.key]) for k in TOML_KEYS if k.key in tables[k.table]
        }
        cfg = ModelConfig(
            name=name,
            arch=arch,
            weights=weights,
            provenance=dict(data.get("provenance", {})),
            bn_sets=bn_sets,
            calibration=calibration,
            folder=folder,
            **given,
        )
    except (TypeError, ValueError) as exc:
        raise ModelConfigError(f"{name}: {exc}") from exc
    if cfg.input_size < 8 or not 0.1 <= cfg.crop_pct <= 1.0 or cfg.num_classes < 1:
        raise ModelConfigError(f"{name}: input_size >= 8, 0.1 <= crop_pct <= 1, num_classes >= 1")
    return cfg


def load_model_config(folder: Path) -> ModelConfig:
    path = folder / "model.toml"
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelConfigError(f"{path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ModelConfigError(f"{path}: {exc}") from exc
    return parse_model_config(folder.name, data, folder)


def write_model_config(cfg: ModelConfig, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.toml"
    path.write_bytes(tomli_w.dumps(cfg.to_toml_dict()).encode())
    return path
