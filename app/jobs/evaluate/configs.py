"""What an evaluation computes: view configs (``spec@level``), presets, the Fig. 3 sweep,
and how each config's views are picked out of one pool per image. No torch here."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

from app.errors import InvalidRequestError
from app.jobs.datasets import ClassOrder
from app.request import LEVELS, Level, check_level
from app.runtime.plan import DtypeName
from app.tta.adaptive import AUTO, resolve_spec
from app.tta.stages import STAGE_SEPARATOR, StagedPolicy, parse_policy
from app.tta.views import AUTO_SPEC, CROP_KINDS, ViewSpec, parse_view_spec, split_kind

BASELINE = "center:1@softmax"
AUTO_STAGE_MODELS = "auto"  # --stage-models: every other model of the repository with our classes
TOP_K = 5

_FC_MFC = "fixed:5,mfixed:5"
PRESETS: dict[str, list[str]] = {
    # the rows the closing note asks for
    "closing": [
        BASELINE,
        "random:10@feature",
        "random:20@feature",
        "random:10@softmax",
        "random:20@softmax",
        f"{_FC_MFC}@feature",
        f"{_FC_MFC}@softmax",
        f"{_FC_MFC},random:10,mrandom:10@feature",
        f"{_FC_MFC},random:10,mrandom:10@softmax",
        "auto@softmax",
    ],
    # MID Tab. I (and the per-family Tabs. II-VII, which repeat its rows for other models)
    "table1": [BASELINE]
    + [f"random:{n}@{lv}" for lv in ("feature", "softmax") for n in (10, 20)]
    + [f"random:{n},mrandom:{n}@{lv}" for lv in ("feature", "softmax") for n in (5, 10, 15, 20)]
    + [f"{s}@{lv}" for lv in ("feature", "softmax") for s in ("fixed:5", _FC_MFC)],
    # candidate policies for the accuracy-vs-compute sweep: crops at the model's scale and
    # above it, the whole image at test resolutions above the training one, and mixes
    "policies": [
        BASELINE,
        f"{_FC_MFC}@softmax",
        "center@256@softmax",
        "center@288@softmax",
        "center,center@288@softmax",
        "fixed:5,fixed@288:5@softmax",
    ]
    + [f"full@{s},mfull@{s}@softmax" for s in (224, 256, 288, 320)]
    + [f"center,full@{s},mfull@{s}@softmax" for s in (256, 288, 320)],
    # MID Tab. VIII: fixed crops combined with random ones
    "table8": [BASELINE]
    + [f"{s}@{lv}" for lv in ("feature", "softmax") for s in ("fixed:5", _FC_MFC)]
    + [f"fixed:5,random:{n}@{lv}" for lv in ("feature", "softmax") for n in (5, 10, 15, 20)]
    + [
        f"{_FC_MFC},random:{n},mrandom:{n}@{lv}"
        for lv in ("feature", "softmax")
        for n in (5, 10, 15, 20)
    ],
}


@dataclass(frozen=True)
class EvalConfig:
    """A view spec (or a staged policy, or the adaptive ``auto`` policy) and an averaging
    level. A staged config's ``spec`` is every stage's views (what its pool must hold)."""

    spec: ViewSpec | None  # None: ``auto``, resolved per image as the server resolves it
    level: Level
    stages: StagedPolicy | None = None

    @property
    def name(self) -> str:
        what = self.stages or (AUTO if self.spec is None else self.spec)
        return f"{what}@{self.level}"

    @property
    def asked(self) -> StagedPolicy:
        """What the config asks for before any image is seen (``auto`` unresolved)."""
        return self.stages or StagedPolicy.single(self.spec or AUTO_SPEC)

    def policy_for(
        self, width: int, height: int, crop: int, measured: StagedPolicy | None = None
    ) -> StagedPolicy:
        """The policy for an image whose model-scale resize is ``width`` x ``height``;
        ``measured``: the model's measured ``auto`` policy, if it has one."""
        if self.stages is not None:
            return self.stages
        if self.spec is None and measured is not None:
            return measured
        return StagedPolicy.single(resolve_spec(self.spec or AUTO_SPEC, width, height, crop))


def parse_config(text: str) -> EvalConfig:
    """``<view spec>@<level>`` (level defaults to softmax); the spec may be ``auto`` and its
    kinds may carry a size (``full@288,mfull@288@logit``): only a level name after the last
    ``@`` is a level."""
    spec_text, at, level_text = text.strip().rpartition("@")
    level_text = level_text.strip().lower()
    if not at or level_text not in LEVELS:
        if at and level_text[:1].isalpha():  # a word after the last "@" names a level
            raise InvalidRequestError(
                f"level in config {text!r} must be one of {', '.join(LEVELS)}, got {level_text!r}"
            )
        spec_text, level_text = text.strip(), "softmax"
    level = check_level(level_text)
    if spec_text.strip().lower() == AUTO:
        return EvalConfig(None, level)
    if STAGE_SEPARATOR in spec_text:
        policy = parse_policy(spec_text)
        if policy.cascade:
            raise InvalidRequestError(
                f"config {text!r}: a cascade's later stages run on other models, which one "
                "model's view pool cannot score; --stage-models searches cascades"
            )
        return EvalConfig(policy.joined, level, policy)
    return EvalConfig(parse_view_spec(spec_text), level)


def parse_configs(items: list[str]) -> list[EvalConfig]:
    """Preset names and configs (several per argument when separated by ``;``).

    The center-crop baseline is always evaluated first; duplicates are dropped.
    """
    texts: list[str] = []
    for item in items:
        for part in item.split(";"):
            part = part.strip()
            if part:
                texts.extend(PRESETS.get(part, [part]))
    configs = [parse_config(BASELINE)]
    for t in texts:
        c = parse_config(t)
        if c.name not in {x.name for x in configs}:
            configs.append(c)
    return configs


@dataclass(frozen=True)
class Sweep:
    """Fig. 3: ``random:k`` and ``center:1,random:k`` for k in lo..hi, at one level."""

    lo: int
    hi: int
    level: Level

    def configs(self) -> list[tuple[int, EvalConfig, EvalConfig]]:
        out = []
        for k in range(self.lo, self.hi + 1):
            rc = EvalConfig(ViewSpec((("random", k),)), self.level)
            cc = EvalConfig(ViewSpec((("center", 1), ("random", k))), self.level)
            out.append((k, rc, cc))
        return out


def parse_sweep(text: str | None, level: str = "softmax") -> Sweep | None:
    if not text:
        return None
    kind, _, rng = text.partition(":")
    lo_text, sep, hi_text = rng.partition("..")
    if kind.strip() != "random" or not sep or not (lo_text.isdigit() and hi_text.isdigit()):
        raise InvalidRequestError(f"--sweep must look like random:1..40, got {text!r}")
    lo, hi = int(lo_text), int(hi_text)
    if not 1 <= lo <= hi <= 200:
        raise InvalidRequestError(f"--sweep range must satisfy 1 <= lo <= hi <= 200, got {text!r}")
    if level not in LEVELS:
        raise InvalidRequestError(f"--sweep-level must be one of {', '.join(LEVELS)}")
    return Sweep(lo, hi, check_level(level))


@dataclass
class EvalOptions:
    model: str
    data: Path
    out: Path
    configs: list[EvalConfig]
    sweep: Sweep | None = None
    labels_file: Path | None = None
    class_order: ClassOrder = "ids"
    dataset_name: str = ""
    limit: int = 0
    seed: int = 0
    models_dir: Path | None = None  # None: the settings' (MIDSERVE_MODELS_DIR)
    device: str | None = None  # None: the settings' (MIDSERVE_DEVICE)
    dtype: DtypeName | None = None  # None: the settings', i.e. what the server runs
    workers: int = 0
    batch_views: int = 0  # views per forward across images; 0 = the engine's chunk size
    write_model_results: bool = True
    fresh: bool = False
    progress: bool = True
    time_images: int = 0  # time each config alone on this many images (0: not timed)
    policy_budget: float | None = None  # write the best policy within this many view-equivs
    stage_budgets: tuple[float, ...] = (1.5, 2.0, 2.5, 3.0)  # gated policies searched at

    def budgets(self) -> list[float]:
        """The budgets gated policies are chosen at: the report's, and the one written."""
        extra = [self.policy_budget] if self.policy_budget is not None else []
        return sorted({*self.stage_budgets, *extra})

    def all_configs(self) -> list[EvalConfig]:
        """The table's configs, then the sweep's that are not among them."""
        configs = list(self.configs)
        names = {c.name for c in configs}
        if self.sweep:
            for _, rc, cc in self.sweep.configs():
                for c in (rc, cc):
                    if c.name not in names:
                        configs.append(c)
                        names.add(c.name)
        return configs


# -- views: one pool per image, every config a prefix of each kind ------------------------


def _pool_key(token: str) -> str:
    """The pool entry a spec part draws from: ``center[@S]`` is the first ``fixed[@S]``."""
    kind, size = split_kind(token)
    kind = "fixed" if kind == "center" else kind
    return f"{kind}@{size}" if size else kind


def pool_spec(specs: list[ViewSpec]) -> ViewSpec:
    """The largest count of each kind (and size) over ``specs``: the model-scale crop kinds
    first, in a fixed order, then sized and whole-image kinds in order of appearance."""
    need = {kind: 0 for kind in CROP_KINDS if kind != "center"}
    for spec in specs:
        for token, n in spec.parts:
            key = _pool_key(token)
            need[key] = max(need.get(key, 0), n)
    return ViewSpec(tuple((k, n) for k, n in need.items() if n > 0))


def select_views(pool: ViewSpec, spec: ViewSpec) -> list[int]:
    """Indices into the views planned for ``pool`` that make up ``spec``."""
    start, offset = {}, 0
    for token, n in pool.parts:
        start[token] = offset
        offset += n
    out: list[int] = []
    for token, n in spec.parts:
        key = _pool_key(token)
        out.extend(range(start[key], start[key] + n))
    return out


def image_seed(seed: int, name: str) -> int:
    """A per-image seed that depends only on the run seed and the file, not on order."""
    return zlib.crc32(f"{seed}:{name}".encode()) & 0x7FFFFFFF
