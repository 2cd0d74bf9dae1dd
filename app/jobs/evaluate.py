"""``midserve evaluate``: the MID paper's tables and Fig. 3 for any model on any labelled folder.

Cost model: every image is decoded and resized once; one *pool* of views is planned for it
(``plan_views`` with the largest count of each kind any config needs); every config's
views are a prefix of each kind in that pool (``center`` is the first fixed crop), so one
forward over the pool serves all configs, which are then averaged separately with
``average_probabilities``. A 10-config run costs one forward of the distinct views.

Random views of a config are the first ``n`` of the pool's random views, so ``random:10``
is a prefix of ``random:20`` and of the sweep's ``random:40`` (the usual way to draw an
accuracy-vs-crops curve). Their positions are uniformly random as in serving, but not the
exact boxes a server request with the same seed gets (that one plans its spec alone).

Per-image results go to ``records.jsonl`` in the output folder as they are computed, so an
interrupted run continues where it stopped; under ``torchrun`` every rank takes every
``world``-th image and rank 0 writes the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.errors import DataError, EvalResultsError, InvalidRequestError, MidserveError
from app.eval_results import EvalResult, write_eval_results
from app.jobs.datasets import CLASS_ORDERS, ClassOrder, LabelledFolder, read_labelled_folder
from app.jobs.report import (
    Row,
    SweepPoint,
    crop_statistics,
    csv_table,
    gains_by_aspect,
    markdown_aspect_table,
    markdown_table,
    paired,
    plot_sweep,
    rows_to_json,
    sweep_csv,
)
from app.options import DecodeLimits
from app.request import LEVELS, Level
from app.tta.adaptive import AUTO, auto_policy
from app.tta.averaging import average_probabilities
from app.tta.preprocess import cut_views, decode_image, prepare_image
from app.tta.views import View, ViewSpec, parse_view_spec, plan_views

log = logging.getLogger(__name__)

RUN_SCHEMA = "midserve.evalrun/1"
BASELINE = "center:1@softmax"
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


# -- configs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalConfig:
    """A view spec (or the adaptive ``auto`` policy) and an averaging level."""

    spec: ViewSpec | None  # None: auto_policy per image
    level: Level

    @property
    def name(self) -> str:
        return f"{AUTO if self.spec is None else self.spec}@{self.level}"

    def spec_for(self, width: int, height: int, crop: int) -> ViewSpec:
        return auto_policy(width, height, crop) if self.spec is None else self.spec


def parse_config(text: str) -> EvalConfig:
    """``<view spec>@<level>`` (level defaults to softmax); the spec may be ``auto``."""
    spec_text, _, level = text.strip().partition("@")
    level = level.strip().lower() or "softmax"
    if level not in LEVELS:
        raise InvalidRequestError(
            f"level in config {text!r} must be one of {', '.join(LEVELS)}, got {level!r}"
        )
    if spec_text.strip().lower() == AUTO:
        return EvalConfig(None, level)
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
    return Sweep(lo, hi, level)


# -- views: one pool per image, every config a prefix of each kind ------------------------


def pool_spec(specs: list[ViewSpec]) -> ViewSpec:
    """The largest count of each kind over ``specs`` (``center`` needs one fixed crop)."""
    need = {"fixed": 0, "mfixed": 0, "random": 0, "mrandom": 0}
    for spec in specs:
        for kind, n in spec.parts:
            key = "fixed" if kind == "center" else kind
            need[key] = max(need[key], n)
    return ViewSpec(tuple((k, n) for k, n in need.items() if n > 0))


def select_views(pool: ViewSpec, spec: ViewSpec) -> list[int]:
    """Indices into the views planned for ``pool`` that make up ``spec``."""
    start, offset = {}, 0
    for kind, n in pool.parts:
        start[kind] = offset
        offset += n
    out: list[int] = []
    for kind, n in spec.parts:
        key = "fixed" if kind == "center" else kind
        out.extend(range(start[key], start[key] + n))
    return out


def image_seed(seed: int, name: str) -> int:
    """A per-image seed that depends only on the run seed and the file, not on order."""
    return zlib.crc32(f"{seed}:{name}".encode()) & 0x7FFFFFFF


# -- decoding (DataLoader workers) -------------------------------------------------------


class _DecodedImages(torch.utils.data.Dataset):
    """Decode + resize + normalise on the CPU; errors come back as data, not exceptions."""

    def __init__(self, paths: list[Path], cfg: Any, limits: DecodeLimits) -> None:
        self.paths, self.cfg, self.limits = paths, cfg, limits

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.paths[i]
        try:
            decoded = decode_image(path.read_bytes(), self.limits)
            prepared = prepare_image(decoded.image, self.cfg, torch.device("cpu"), decoded.format)
        except (OSError, MidserveError) as exc:
            return {"i": i, "error": f"{type(exc).__name__}: {exc}"}
        return {"i": i, "image": prepared}


# -- the run ---------------------------------------------------------------------------


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
    models_dir: Path | None = None
    device: str = "auto"
    dtype: str = "float32"
    workers: int = 0
    batch_views: int = 0  # views per forward across images; 0 = the engine's chunk size
    write_model_results: bool = True
    fresh: bool = False
    progress: bool = True


def _all_configs(opts: EvalOptions) -> list[EvalConfig]:
    configs = list(opts.configs)
    names = {c.name for c in configs}
    if opts.sweep:
        for _, rc, cc in opts.sweep.configs():
            for c in (rc, cc):
                if c.name not in names:
                    configs.append(c)
                    names.add(c.name)
    return configs


def _run_key(opts: EvalOptions, configs: list[EvalConfig], cfg: Any) -> dict[str, Any]:
    return {
        "schema": RUN_SCHEMA,
        "model": opts.model,
        "weights": cfg.weights.describe(),
        "input_size": cfg.input_size,
        "resize_size": cfg.resize_size,
        "data": str(opts.data.resolve()),
        "configs": [c.name for c in configs],
        "seed": opts.seed,
        # only when set: run folders written before the option existed still resume
        **({"class_order": opts.class_order} if opts.class_order != "ids" else {}),
    }


def _prepare_out(out: Path, key: dict[str, Any], fresh: bool, rank: int) -> None:
    """Start or resume: an existing run folder must hold the same run."""
    run_file = out / "run.json"
    if rank == 0:
        if fresh:
            for p in out.glob("records*.jsonl"):
                p.unlink()
            run_file.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        if run_file.is_file():
            try:
                old = json.loads(run_file.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise EvalResultsError(f"{run_file} is unreadable ({exc}); use --fresh") from exc
            differs = [k for k in key if old.get(k) != key[k]]
            if differs:
                raise EvalResultsError(
                    f"{out} holds results of a different run (differs in: {', '.join(differs)}); "
                    "give another --out or --fresh to discard them"
                )
        else:
            run_file.write_text(json.dumps(key, indent=2) + "\n")


def read_records(out: Path) -> dict[str, dict[str, Any]]:
    """Finished images of earlier (partial) runs; a torn last line is ignored."""
    done: dict[str, dict[str, Any]] = {}
    for path in sorted(out.glob("records*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "file" in rec:
                done[rec["file"]] = rec
    return done


@dataclass
class _Planned:
    name: str
    target: int
    image: Any  # PreparedImage
    views: list[View]
    chosen: dict[str, list[int]]  # config name -> indices into views


class _Evaluator:
    """Turns decoded images into per-image records (one forward of each image's view pool)."""

    def __init__(self, engine: Any, configs: list[EvalConfig], seed: int) -> None:
        self.engine, self.configs, self.seed = engine, configs, seed
        self.crop = engine.cfg.input_size
        self.k = min(TOP_K, engine.cfg.num_classes)

    def plan(self, name: str, image: Any) -> _Planned:
        """The image's view pool and, per config, which pool views it averages."""
        w, h = image.resized_size
        specs = {c.name: c.spec_for(w, h, self.crop) for c in self.configs}
        pool = pool_spec(list(specs.values()))
        views = plan_views(pool, w, h, self.crop, image_seed(self.seed, name))
        chosen = {n: select_views(pool, s) for n, s in specs.items()}
        return _Planned(name, -1, image, views, chosen)

    @torch.inference_mode()
    def score(self, batch: list[_Planned]) -> list[dict[str, Any]]:
        """Records for a few images at once: one run_views over all their pools."""
        stacks = []
        for p in batch:
            p.image.hwc = p.image.hwc.to(self.engine.device)
            stacks.append(cut_views(p.image, p.views))
        out = self.engine.run_views(torch.cat(stacks))
        head = self.engine.model.head
        records, offset = [], 0
        for p in batch:
            name, target, image, views, chosen = p.name, p.target, p.image, p.views, p.chosen
            feats = out.features[offset : offset + len(views)]
            logits = out.logits[offset : offset + len(views)]
            offset += len(views)
            top: dict[str, list[int]] = {}
            for c in self.configs:
                idx = torch.tensor(chosen[c.name], device=feats.device)
                probs = average_probabilities(feats[idx], logits[idx], head, c.level)
                top[c.name] = probs.float().topk(self.k).indices.tolist()
            records.append(
                {
                    "file": name,
                    "target": target,
                    "size": list(image.resized_size),
                    "pool": len(views),
                    "views": {n: len(v) for n, v in chosen.items()},
                    "top": top,
                }
            )
        return records


def _dist() -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return tdist.get_rank(), world


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as tdist

        tdist.barrier()


def run_evaluation(opts: EvalOptions) -> dict[str, Any] | None:
    """Evaluate, write records and the report; returns the report (None on ranks > 0)."""
    from app.config import Settings
    from app.engine import Engine, pick_device
    from app.options import EngineOptions
    from app.repository import ModelRepository

    rank, world = _dist()
    settings = Settings()
    repo = ModelRepository(opts.models_dir or settings.models_dir)
    device = pick_device(opts.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    model = repo.load(opts.model, device)
    cfg = model.cfg
    folder = read_labelled_folder(opts.data, model.labels, opts.labels_file, opts.class_order)
    items = folder.items[: opts.limit] if opts.limit > 0 else folder.items
    configs = _all_configs(opts)
    key = _run_key(opts, configs, cfg)
    _prepare_out(opts.out, key, opts.fresh, rank)
    _barrier(world)

    names = [str(it.path.relative_to(folder.root)) for it in items]
    done = read_records(opts.out)
    todo = [i for i, n in enumerate(names) if n not in done][rank::world]
    options = EngineOptions.from_settings(settings).with_changes(dtype=opts.dtype)
    engine = Engine(model, options)
    evaluator = _Evaluator(engine, configs, opts.seed)
    t0 = time.perf_counter()
    views_run = _evaluate_images(opts, items, names, todo, evaluator, rank, world)
    elapsed = time.perf_counter() - t0
    _barrier(world)
    if world > 1:
        import torch.distributed as tdist

        tdist.destroy_process_group()
    if rank != 0:
        return None
    records = read_records(opts.out)
    report = build_report(opts, folder, names, records, cfg, len(done))
    report["timing"] = {
        "seconds": round(elapsed, 3),
        "images_computed": len(todo),
        "views_run": views_run,
        "world_size": world,
        "scope": "this process" if world == 1 else "rank 0 only (each rank did its share)",
        "views_per_second": round(views_run / elapsed, 2) if elapsed > 0 else None,
    }
    write_report(opts, report, model_folder=cfg.folder)
    return report


def _evaluate_images(
    opts: EvalOptions,
    items: list[Any],
    names: list[str],
    todo: list[int],
    evaluator: _Evaluator,
    rank: int,
    world: int,
) -> int:
    from tqdm import tqdm

    dataset = _DecodedImages(
        [items[i].path for i in todo], evaluator.engine.cfg, evaluator.engine.options.limits
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=opts.workers, collate_fn=lambda x: x
    )
    suffix = "" if world == 1 else f"-rank{rank}"
    views_run = 0
    bar = tqdm(total=len(todo), unit="img", disable=not opts.progress or rank != 0, file=sys.stderr)
    pending: list[_Planned] = []
    threshold = max(1, opts.batch_views or evaluator.engine.chunk_views)
    pending_views = 0
    records_path = opts.out / f"records{suffix}.jsonl"
    torn = records_path.is_file() and not records_path.read_bytes().endswith(b"\n")
    with records_path.open("a") as sink:
        if torn and records_path.stat().st_size:
            sink.write("\n")  # end a line cut by an interrupted run; it is ignored on read

        def flush() -> None:
            nonlocal pending, pending_views, views_run
            if not pending:
                return
            for rec in evaluator.score(pending):
                views_run += rec["pool"]
                sink.write(json.dumps(rec) + "\n")
            sink.flush()
            bar.update(len(pending))
            pending, pending_views = [], 0

        for item in loader:
            i = todo[item["i"]]
            if "error" in item:
                sink.write(json.dumps({"file": names[i], "skipped": item["error"]}) + "\n")
                bar.update(1)
                continue
            planned = evaluator.plan(names[i], item["image"])
            planned.target = items[i].target
            pending.append(planned)
            pending_views += len(planned.views)
            if pending_views >= threshold:
                flush()
        flush()
    bar.close()
    return views_run


# -- the report ------------------------------------------------------------------------


def _correct(records: list[dict[str, Any]], name: str, k: int) -> np.ndarray:
    return np.array([r["target"] in r["top"][name][:k] for r in records], dtype=bool)


def build_report(
    opts: EvalOptions,
    folder: LabelledFolder,
    names: list[str],
    records: dict[str, dict[str, Any]],
    cfg: Any,
    resumed: int,
) -> dict[str, Any]:
    ordered = [records[n] for n in names if n in records]
    scored = [r for r in ordered if "top" in r]
    skipped = [{"file": r["file"], "reason": r["skipped"]} for r in ordered if "skipped" in r]
    if not scored:
        raise DataError(
            f"no image of {opts.data} could be evaluated ({len(skipped)} skipped: "
            + "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:3])
            + ")"
        )
    base = _correct(scored, BASELINE, 1)
    rows = []
    for c in opts.configs:
        c1 = _correct(scored, c.name, 1)
        rows.append(
            Row(
                config=c.name,
                level=c.level,
                images=len(scored),
                top1=float(c1.mean()),
                top5=float(_correct(scored, c.name, TOP_K).mean()),
                mean_views=float(np.mean([r["views"][c.name] for r in scored])),
                paired=None if c.name == BASELINE else paired(c1, base, seed=opts.seed),
            )
        )
    sizes = [tuple(r["size"]) for r in scored]
    aspects = np.array([max(s) / min(s) for s in sizes])
    table_names = [c.name for c in opts.configs]
    report: dict[str, Any] = {
        "model": opts.model,
        "dataset": opts.dataset_name or opts.data.resolve().name,
        "dataset_path": str(opts.data.resolve()),
        "layout": folder.layout,
        "images_listed": len(names),
        "images": len(scored),
        "skipped": skipped,
        "unlabelled": len(folder.unlabelled),
        "resumed_images": resumed,
        "seed": opts.seed,
        "baseline": BASELINE,
        "rows": rows_to_json(rows),
        "crop_statistics": crop_statistics(sizes, cfg.input_size, cfg.resize_size),
        "by_aspect": gains_by_aspect(
            aspects, {n: _correct(scored, n, 1) for n in table_names}, BASELINE
        ),
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if opts.sweep:
        points = [
            SweepPoint(
                k,
                float(_correct(scored, rc.name, 1).mean()),
                float(_correct(scored, cc.name, 1).mean()),
            )
            for k, rc, cc in opts.sweep.configs()
        ]
        report["sweep"] = {"level": opts.sweep.level, "points": [asdict(p) for p in points]}
    report["_rows"] = rows
    return report


def write_report(opts: EvalOptions, report: dict[str, Any], model_folder: Path | None) -> None:
    out = opts.out
    rows: list[Row] = report.pop("_rows")
    title = (
        f"{report['model']} on {report['dataset']} ({report['images']} images, "
        f"{len(report['skipped'])} skipped, seed {report['seed']})"
    )
    md = [f"# {title}\n", markdown_table(rows, BASELINE)]
    md.append("\n## Top-1 % by aspect ratio of the resized image\n\n")
    md.append(markdown_aspect_table(report["by_aspect"], [r.config for r in rows]))
    stats = report["crop_statistics"]
    md.append("\n## Room around the crop\n\n```\n" + json.dumps(stats, indent=2) + "\n```\n")
    if "sweep" in report:
        points = [SweepPoint(**p) for p in report["sweep"]["points"]]
        (out / "sweep.csv").write_text(sweep_csv(points))
        center = next(r.top1 for r in rows if r.config == BASELINE)
        plot_sweep(points, center, title, out / "sweep.png", report["sweep"]["level"])
        md.append("\n## Sweep (Fig. 3)\n\n![sweep](sweep.png)\n\n```\n" + sweep_csv(points))
        md.append("```\n")
    (out / "results.md").write_text("".join(md))
    (out / "results.csv").write_text(csv_table(rows))
    (out / "results.json").write_text(json.dumps(report, indent=2, default=_nan_none) + "\n")
    if opts.write_model_results and model_folder is not None:
        results = [
            EvalResult(
                model=report["model"],
                config=r.config,
                dataset=report["dataset"],
                top1=r.top1,
                top5=r.top5,
                images=r.images,
                level=r.level,
                skipped=len(report["skipped"]),
                mean_views=r.mean_views,
                diff_top1_vs_center=r.paired.diff if r.paired else 0.0,
                ci_low=r.paired.ci_low if r.paired else 0.0,
                ci_high=r.paired.ci_high if r.paired else 0.0,
                seed=report["seed"],
                dataset_path=report["dataset_path"],
                evaluated_at=report["evaluated_at"],
            )
            for r in rows
        ]
        try:
            write_eval_results(model_folder, report["model"], results)
        except OSError as exc:
            log.warning("could not write %s/eval.json: %s", model_folder, exc)


def _nan_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# -- the CLI ---------------------------------------------------------------------------


def cmd_evaluate(args: argparse.Namespace) -> int:
    configs = parse_configs(args.configs)
    sweep = parse_sweep(args.sweep, args.sweep_level)
    out = args.out or Path("runs") / "eval" / f"{args.model}-{args.data.resolve().name}"
    if args.workers < 0 or args.limit < 0:
        raise InvalidRequestError("--workers and --limit must not be negative")
    opts = EvalOptions(
        model=args.model,
        data=args.data,
        out=out,
        configs=configs,
        sweep=sweep,
        labels_file=args.labels_file,
        class_order=args.class_order,
        dataset_name=args.dataset_name or "",
        limit=args.limit,
        seed=args.seed,
        models_dir=args.models_dir,
        device=args.device,
        dtype=args.dtype,
        workers=args.workers,
        batch_views=args.batch_views,
        write_model_results=not args.no_model_results,
        fresh=args.fresh,
        progress=not args.no_progress,
    )
    report = run_evaluation(opts)
    if report is not None:
        sys.stdout.write((out / "results.md").read_text())
        print(f"\nwritten to {out}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="accuracy of view configs on a labelled folder (MID tables, Fig. 3)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="tf_efficientnet_lite0", help="model-repository name")
    p.add_argument("--data", type=Path, required=True, help="labelled image folder")
    p.add_argument("--labels-file", type=Path, default=None, help="val.txt or LOC_val_solution.csv")
    p.add_argument(
        "--class-order",
        default="ids",
        choices=CLASS_ORDERS,
        help="class folders: ids = named by label id/synset/index; sorted = i-th folder is class i",
    )
    p.add_argument("--dataset-name", default=None, help="name in eval.json (default: folder)")
    p.add_argument(
        "--configs",
        nargs="+",
        default=["closing"],
        help=f"'spec@level' items (';' separates several in one argument) or presets: "
        f"{', '.join(PRESETS)}; e.g. center:1@softmax 'fixed:5,mfixed:5@softmax' auto",
    )
    p.add_argument("--sweep", default=None, help="Fig. 3 sweep, e.g. random:1..40")
    p.add_argument("--sweep-level", default="softmax", choices=list(LEVELS))
    p.add_argument("--limit", type=int, default=0, help="first N images only (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="fixes every random view position")
    p.add_argument("--out", type=Path, default=None, help="output folder (resumed if present)")
    p.add_argument("--fresh", action="store_true", help="discard earlier results in --out")
    p.add_argument("--workers", type=int, default=2, help="DataLoader decode workers")
    p.add_argument(
        "--batch-views",
        type=int,
        default=0,
        help="views per forward across images (0 = the device's chunk: 10 cpu, 128 cuda)",
    )
    p.add_argument("--no-model-results", action="store_true", help="do not write eval.json")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--models-dir", type=Path, default=None, help="model repository folder")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(handler=cmd_evaluate)
