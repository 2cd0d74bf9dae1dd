"""Cascades searched across the repository's models, on several labelled folders at once.

The requested model's configs and each later-stage model's configs are evaluated on the
same photos (one resumable run folder per model and data folder, as a plain evaluation
writes). Per photo their records are merged, a later-stage model's compute counted in the
requested model's view-equivalents (``app.runtime.cost``: measured time per view of each
served plan, else FLOPs), and the staged search of ``staged.py`` runs over all of them: a
first stage of the requested model, a gate, and a later stage of the same model or of
another one, its answer alone (``last``) or averaged with the first's (``all``).
Thresholds and temperatures are fitted on one half of the photos (a hash of folder and
file name), and every number reported is on the other half: all folders pooled and each
folder on its own, with paired bootstrap intervals against the reference policies given.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.config import Settings
from app.errors import DataError, InvalidRequestError
from app.jobs.evaluate.cascade_report import plot_cascades, write_cascade_report
from app.jobs.evaluate.cascade_scores import plain_answered, replay, score_policy
from app.jobs.evaluate.compute import choose_policy, time_policies, write_policy
from app.jobs.evaluate.configs import (
    AUTO_STAGE_MODELS,
    BASELINE,
    EvalConfig,
    EvalOptions,
    parse_configs,
)
from app.jobs.evaluate.records import read_records
from app.jobs.evaluate.staged import (
    StagedRow,
    fit_half,
    plain_halves,
    scored,
    staged_rows,
)
from app.model_config import ModelConfig
from app.pipeline import ImagePipeline
from app.repository import ModelRepository
from app.request import Level
from app.runtime.cost import ViewCost, view_cost
from app.runtime.engine import Engine
from app.runtime.load import load_engine
from app.runtime.plan import EngineOptions
from app.tta.stages import Stage, parse_policy

log = logging.getLogger(__name__)
SOFTMAX: Level = "softmax"  # every searched config and cascade answers at this level


def stage_model_configs(cfg: ModelConfig) -> list[str]:
    """A later-stage model's candidate views (its center crop, the baseline, is always
    evaluated): a crop at its resize size; the whole image at about its input size, alone
    and with its mirror, and a step below it and at its resize size with the mirror; and
    the center crop with the whole image and its mirror."""
    near = max(64, cfg.input_size // 32 * 32)  # about the input size, a multiple of 32
    return [
        f"center@{cfg.resize_size}@softmax",
        f"full@{near - 32},mfull@{near - 32}@softmax",
        f"full@{near}@softmax",
        f"full@{near},mfull@{near}@softmax",
        "full,mfull@softmax",
        "center,full,mfull@softmax",
    ]


def later_stage_models(repo: ModelRepository, model: str, asked: list[str]) -> list[str]:
    """The models tried as later stages: those named, or (``auto``) every other available
    model of the repository with the same classes."""
    if asked == ["none"]:
        return []
    own = repo.config(model)

    def same_classes(name: str) -> bool:
        cfg = repo.config(name)
        return (cfg.labels, cfg.num_classes) == (own.labels, own.num_classes)

    if asked != [AUTO_STAGE_MODELS]:
        unknown = [m for m in asked if m not in repo.names() or m == model]
        if unknown:
            raise InvalidRequestError(
                f"--stage-models: {', '.join(unknown)} is not another model of the repository "
                f"({', '.join(repo.names())})"
            )
        other = [m for m in asked if not same_classes(m)]
        if other:
            raise InvalidRequestError(
                f"--stage-models: {', '.join(other)} has other classes than {model}"
            )
        return list(dict.fromkeys(asked))
    names = [n for n in repo.names() if n != model and repo.available(n)[0]]
    return [n for n in names if same_classes(n)]


@dataclass
class CascadeInputs:
    """Every photo's merged record, the configs by name (a later stage's qualified by its
    model) and what one view of each later-stage model costs."""

    records: list[dict[str, Any]]
    stages: dict[str, Stage]  # softmax-level plain configs, candidates for either stage
    references: list[str]  # configs every cascade is compared with, pairwise
    costs: dict[str, ViewCost]
    kinds: list[str]  # the data folders, in order


def qualified(model: str, config: str) -> str:
    """A later-stage model's config name as a cascade's calibration key spells it."""
    return f"{model}:{config}"


def model_configs(
    opts: EvalOptions, repo: ModelRepository, models: list[str]
) -> dict[str, list[EvalConfig]]:
    """What each model is evaluated with: the requested model the configs asked for, a
    later-stage model its candidate views."""
    out = {opts.model: opts.configs}
    out.update({m: parse_configs(stage_model_configs(repo.config(m))) for m in models})
    return out


def evaluate_folders(
    opts: EvalOptions, folders: list[Path], configs: dict[str, list[EvalConfig]],
    settings: Settings,
) -> dict[tuple[str, str], dict[str, dict[str, Any]]]:  # fmt: skip
    """Each model's records on each folder: (model, folder name) -> file -> record."""
    from app.jobs.evaluate.run import run_evaluation

    out = {}
    for folder in folders:
        labels_file = opts.labels_file if len(folders) == 1 else None
        for model, model_configs in configs.items():
            run = dataclasses.replace(
                opts, model=model, data=folder, labels_file=labels_file, configs=model_configs,
                out=opts.out / model / folder.name, dataset_name=folder.name, sweep=None,
                policy_budget=None, time_images=0, write_model_results=False,
            )  # fmt: skip
            log.info("evaluating %s on %s", model, folder)
            run_evaluation(run, settings)
            out[(model, folder.name)] = read_records(run.out)
    return out


def merge_records(
    opts: EvalOptions,
    folders: list[Path],
    configs: dict[str, list[EvalConfig]],
    by_run: dict[tuple[str, str], dict[str, dict[str, Any]]],
    costs: dict[str, ViewCost],
) -> CascadeInputs:
    """One record per photo that every model scored: the requested model's record with
    each later-stage model's configs added under their qualified names, their compute in
    the requested model's view-equivalents."""
    models = [m for m in configs if m != opts.model]
    repo_configs = {m: configs[m] for m in models}
    stages: dict[str, Stage] = {
        c.name: Stage(c.spec) for c in opts.configs if _plain_softmax(c) and c.spec is not None
    }
    for m, later in repo_configs.items():
        for c in later:
            if _plain_softmax(c) and c.spec is not None:
                stages[qualified(m, c.name)] = Stage(c.spec, model=m)
    merged: list[dict[str, Any]] = []
    for folder in folders:
        own = by_run[(opts.model, folder.name)]
        for name, record in sorted(own.items()):
            others = [by_run[(m, folder.name)].get(name) for m in models]
            if "probs" not in record or any(o is None or "probs" not in o for o in others):
                continue
            rec = copy.deepcopy(record)
            rec["file"], rec["kind"] = f"{folder.name}/{name}", folder.name
            for m, other in zip(models, others, strict=True):
                assert other is not None
                for name_of in (c.name for c in repo_configs[m]):
                    q = qualified(m, name_of)
                    for field in ("probs", "view_top1", "views", "gflops", "top"):
                        rec[field][q] = other[field][name_of]
                    rec["view_equivalents"][q] = other["view_equivalents"][name_of] * costs[m].ratio
            merged.append(rec)
    if not merged:
        raise DataError("no photo was scored by every model; nothing to search")
    references = [c.name for c in opts.configs if c.stages is not None]
    references += [qualified(m, "full:1,mfull:1@softmax") for m in models]
    references = [r for r in references if r in merged[0]["probs"]]
    return CascadeInputs(merged, stages, references, costs, [f.name for f in folders])


def _plain_softmax(c: EvalConfig) -> bool:
    return c.level == "softmax" and c.stages is None


def search_cascades(opts: EvalOptions, inputs: CascadeInputs) -> dict[str, Any]:
    """The staged search over every model's configs, every policy scored on the test half
    pooled and per folder, and the references they are compared with."""
    records, seed = inputs.records, opts.seed
    rows, calibrations = staged_rows(records, inputs.stages, BASELINE, opts.budgets(), seed)
    targets = torch.tensor([r["target"] for r in records])
    names = [*inputs.stages, *(r for r in inputs.references if r not in inputs.stages)]
    by_name = {n: scored(records, n) for n in names}
    test = ~np.array([fit_half(r["file"], seed) for r in records])
    refs = {r: plain_answered(by_name[r], targets) for r in inputs.references}
    refs[BASELINE] = plain_answered(by_name[BASELINE], targets)
    plain = [
        score_policy(n, inputs.stages[n].model or opts.model if n in inputs.stages else "staged",
                     plain_answered(by_name[n], targets), inputs, refs, test, seed)
        for n in names
    ]  # fmt: skip
    gated = []
    for row in rows:
        answered = replay(row.policy, row.temperatures, by_name, targets)
        if abs(float(answered.right[test].mean()) - row.top1) > 1e-9:
            raise AssertionError(f"replaying {row.policy} disagrees with the search")
        kind = "cascade" if parse_policy(row.policy).cascade else "staged"
        gated.append(score_policy(
            row.policy, kind, answered, inputs, refs, test, seed, budget=row.budget,
            fit_top1=row.fit_top1, fit_view_equivalents=row.fit_view_equivalents,
            temperatures=row.temperatures,
        ))  # fmt: skip
    return {"rows": rows, "calibrations": calibrations, "plain": plain, "gated": gated,
            "fit_images": int((~test).sum()), "test_images": int(test.sum())}  # fmt: skip


def run_cascade_search(
    opts: EvalOptions, folders: list[Path], asked_models: list[str], settings: Settings
) -> dict[str, Any]:
    """Evaluate, merge, search, report; with ``opts.policy_budget``, write the best policy
    (plain, gated or cascade, chosen on the fit half) as the model's ``views=auto``."""
    options = EngineOptions.from_settings(settings).with_changes(
        device=opts.device, dtype=opts.dtype
    )
    repo = ModelRepository(opts.models_dir or settings.models_dir)
    models = later_stage_models(repo, opts.model, asked_models)
    configs = model_configs(opts, repo, models)
    by_run = evaluate_folders(opts, folders, configs, settings)
    own = load_engine(repo, opts.model, options)
    engines = {m: load_engine(repo, m, options) for m in models}
    costs = {m: view_cost(engines[m], own) for m in models}
    inputs = merge_records(opts, folders, configs, by_run, costs)
    found = search_cascades(opts, inputs)
    if opts.time_images:
        photos = _photos(folders, inputs, opts.time_images)
        _time(opts, repo, own, engines, options, found, photos)
    written = None
    if opts.policy_budget is not None and own.cfg.folder is not None:
        written = write_best(own.cfg, found, inputs, opts)
    report = {
        "model": opts.model, "stage_models": models, "folders": inputs.kinds,
        "view_cost": {m: dataclasses.asdict(c) for m, c in costs.items()},
        "fit_images": found["fit_images"], "test_images": found["test_images"],
        "references": inputs.references, "baseline": BASELINE,
        "gated": [dataclasses.asdict(g) for g in found["gated"]],
        "plain": [dataclasses.asdict(p) for p in found["plain"]],
        "calibration": [dataclasses.asdict(c) for c in found["calibrations"]],
        "policy_written": written,
    }  # fmt: skip
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "cascades.json").write_text(json.dumps(report, indent=2, default=_nan) + "\n")
    plot_cascades(found["plain"], found["gated"], opts.out / "cascades.png", opts.model)
    write_cascade_report(report, found["plain"], found["gated"], opts.out / "cascades.md")
    return report


def write_best(cfg: ModelConfig, found: dict[str, Any], inputs: CascadeInputs,
               opts: EvalOptions) -> dict[str, Any]:  # fmt: skip
    """Write the best policy within the budget on the fit half (top-1, then likelihood,
    then cost): a plain config of the requested model, or a gated one, cascades included."""
    assert opts.policy_budget is not None
    own_plain = [n for n, s in inputs.stages.items() if s.model is None]
    halves = {n: plain_halves(inputs.records, n, opts.seed) for n in own_plain}
    temperatures = {c.config: c.temperature for c in found["calibrations"]}
    rows: list[StagedRow] = found["rows"]
    chosen = choose_policy(halves, rows, temperatures, opts.policy_budget)
    if chosen is None:
        raise InvalidRequestError(f"no policy fits a budget of {opts.policy_budget} views")
    written = write_policy(cfg, chosen.spec, chosen.temperatures)
    log.info("views=auto of %s now serves %s", cfg.name, written.auto_views)
    return dataclasses.asdict(chosen)


def _photos(folders: list[Path], inputs: CascadeInputs, n: int) -> list[bytes]:
    """The first ``n`` test-half photos of each folder, bytes as uploaded."""
    by_kind: dict[str, list[str]] = {}
    for r in inputs.records:
        kind, _, name = r["file"].partition("/")
        if len(by_kind.setdefault(kind, [])) < n:
            by_kind[kind].append(name)
    roots = {f.name: f for f in folders}
    return [(roots[k] / name).read_bytes() for k, names in by_kind.items() for name in names]


def _time(opts: EvalOptions, repo: ModelRepository, own: Engine, engines: dict[str, Engine],
          options: EngineOptions, found: dict[str, Any], photos: list[bytes]) -> None:  # fmt: skip
    """Milliseconds per photo of every policy scored, on the serving path (decode to
    answer, one photo at a time), in interleaved rounds."""
    from app.local_pipeline import local_pipeline

    pipelines = {opts.model: local_pipeline(repo, own, options)}
    pipelines.update({m: ImagePipeline(e) for m, e in engines.items()})
    own_pipeline = pipelines[opts.model]
    jobs = [(g.policy, own_pipeline, parse_policy(g.policy), SOFTMAX) for g in found["gated"]]
    for p in found["plain"]:
        text = p.policy.rpartition("@")[0]
        if p.model in pipelines and p.model != opts.model:  # qualified: MODEL:views
            views = parse_policy(text[len(p.model) + 1 :])
            jobs.append((p.policy, pipelines[p.model], views, SOFTMAX))
        else:
            jobs.append((p.policy, own_pipeline, parse_policy(text), SOFTMAX))
    ms = time_policies(jobs, photos)
    found["gated"] = [dataclasses.replace(g, ms_per_image=ms[g.policy]) for g in found["gated"]]
    found["plain"] = [dataclasses.replace(p, ms_per_image=ms[p.policy]) for p in found["plain"]]


def _nan(value: Any) -> Any:
    if isinstance(value, float):
        return None
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
