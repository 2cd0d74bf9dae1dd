"""One model's configuration, read from ``models/<name>/model.toml``.

Serving, evaluation and fine-tuning all read this one object, so preprocessing can never
drift between them (the same role as timm's PretrainedCfg).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import tomli_w

from app.errors import InvalidRequestError, ModelConfigError
from app.tta.levels import LEVELS
from app.tta.views import parse_view_spec

Interpolation = Literal["bicubic", "bilinear", "nearest"]
WeightsKind = Literal["package", "file", "hub", "none"]
KeyMapping = Literal["exact", "in-order", "strip-prefix"]
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


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
    folder: Path | None = None

    @property
    def resize_size(self) -> int:
        """Shorter side after the single resize; timm's convention floor(size / crop_pct)."""
        return max(self.input_size, math.floor(self.input_size / self.crop_pct))

    @property
    def crop_to_image_ratio(self) -> float:
        return self.input_size / self.resize_size

    def with_changes(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    def to_toml_dict(self) -> dict[str, Any]:
        """The inverse of :func:`parse_model_config` (used by jobs that write new entries)."""
        weights = {k: v for k, v in asdict(self.weights).items() if v not in ("", None)}
        out: dict[str, Any] = {
            "model": {
                "arch": self.arch,
                "num_classes": self.num_classes,
                "labels": self.labels,
                **({"description": self.description} if self.description else {}),
                **({"parent": self.parent} if self.parent else {}),
            },
            "weights": weights,
            "preprocess": {
                "input_size": self.input_size,
                "crop_pct": self.crop_pct,
                "interpolation": self.interpolation,
                "mean": list(self.mean),
                "std": list(self.std),
            },
            "policy": {
                "views": self.default_views,
                "level": self.default_level,
                **({"auto": self.auto_views} if self.auto_views else {}),
            },
        }
        if self.provenance:
            out["provenance"] = self.provenance
        if self.bn_sets:
            out["bn_sets"] = {str(size): path for size, path in sorted(self.bn_sets.items())}
        return out


def _triple(value: Any, what: str) -> tuple[float, float, float]:
    if not (isinstance(value, list) and len(value) == 3):
        raise ModelConfigError(f"{what} must be a list of three numbers, got {value!r}")
    a, b, c = (float(v) for v in value)
    return (a, b, c)


def parse_model_config(name: str, data: dict[str, Any], folder: Path | None = None) -> ModelConfig:
    """Validate a model.toml document; every problem raises ModelConfigError naming the key."""
    try:
        model = data["model"]
        arch = str(model["arch"])
    except (KeyError, TypeError) as exc:
        raise ModelConfigError(f"{name}: [model] arch is required") from exc
    w = data.get("weights", {})
    kind = w.get("kind", "file")
    if kind not in ("package", "file", "hub", "none"):
        raise ModelConfigError(f"{name}: weights.kind must be package|file|hub|none, got {kind!r}")
    mapping = w.get("key_mapping", "exact")
    if mapping not in ("exact", "in-order", "strip-prefix"):
        raise ModelConfigError(
            f"{name}: weights.key_mapping must be exact|in-order|strip-prefix, got {mapping!r}"
        )
    weights = WeightsSource(
        kind=kind,
        package=str(w.get("package", "")),
        path=str(w.get("path", "")),
        key_mapping=mapping,
        strip_prefix=str(w.get("strip_prefix", "")),
        state_dict_key=str(w.get("state_dict_key", "")),
    )
    if kind == "package" and not (weights.package and weights.path):
        raise ModelConfigError(f"{name}: weights.kind = 'package' needs package and path")
    if kind == "file" and not weights.path:
        raise ModelConfigError(f"{name}: weights.kind = 'file' needs path")
    pre = data.get("preprocess", {})
    interpolation = pre.get("interpolation", "bicubic")
    if interpolation not in INTERPOLATIONS:
        raise ModelConfigError(f"{name}: interpolation must be one of {INTERPOLATIONS}")
    policy = data.get("policy", {})
    bn_sets: dict[int, str] = {}
    for key, path in dict(data.get("bn_sets", {})).items():
        if not (str(key).isdigit() and isinstance(path, str) and path):
            raise ModelConfigError(f"{name}: bn_sets maps a resolution to a file, got {key!r}")
        bn_sets[int(key)] = path
    level = policy.get("level", "softmax")
    if level not in LEVELS:
        raise ModelConfigError(f"{name}: policy.level must be one of {LEVELS}")
    auto_views = str(policy.get("auto", ""))
    for key in ("views", "auto"):  # a bad policy fails at load, not on every request
        text = str(policy.get(key, ""))
        try:
            adaptive = bool(text) and parse_view_spec(text).adaptive
        except InvalidRequestError as exc:
            raise ModelConfigError(f"{name}: policy.{key} = {text!r}: {exc}") from exc
        if key == "auto" and adaptive:
            raise ModelConfigError(f"{name}: policy.auto must be a view spec, not 'auto'")
    try:
        cfg = ModelConfig(
            name=name,
            arch=arch,
            weights=weights,
            num_classes=int(model.get("num_classes", 1000)),
            input_size=int(pre.get("input_size", 224)),
            crop_pct=float(pre.get("crop_pct", 0.875)),
            interpolation=interpolation,
            mean=_triple(pre.get("mean", [0.485, 0.456, 0.406]), "mean"),
            std=_triple(pre.get("std", [0.229, 0.224, 0.225]), "std"),
            labels=str(model.get("labels", "imagenet-1k")),
            default_views=str(policy.get("views", "fixed:5,mfixed:5")),
            default_level=level,
            auto_views=auto_views,
            description=str(model.get("description", "")),
            parent=str(model.get("parent", "")),
            provenance=dict(data.get("provenance", {})),
            bn_sets=bn_sets,
            folder=folder,
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
