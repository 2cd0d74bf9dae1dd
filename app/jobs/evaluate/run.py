"""One evaluation run: decode in DataLoader workers (the server's decode and resize), one
forward over each image's view pool, per-image records, then the report on rank 0."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from app.answers import StagedAnswers, split_by_stage
from app.config import Settings
from app.errors import InvalidRequestError, MidserveError
from app.jobs.datasets import LabelledImage, read_labelled_folder
from app.jobs.distributed import distributed_context
from app.jobs.evaluate.compute import (
    FlopCounter,
    best_under_budget,
    choose_policy,
    time_configs,
    write_policy,
)
from app.jobs.evaluate.configs import (
    TOP_K,
    EvalConfig,
    EvalOptions,
    image_seed,
    parse_config,
    pool_spec,
    select_views,
)
from app.jobs.evaluate.records import prepare_out, read_records, records_path, run_key
from app.jobs.evaluate.report import build_report, write_report
from app.jobs.evaluate.staged import StagedRow, encode_probs
from app.jobs.evaluate.tables import Row
from app.model_config import ModelConfig
from app.pipeline import ImagePipeline
from app.preparer import ImagePreparer
from app.repository import ModelRepository
from app.request import Level
from app.runtime.engine import Engine, ViewOutputs
from app.runtime.load import load_engine
from app.runtime.plan import EngineOptions
from app.tta.averaging import average_probabilities
from app.tta.preprocess import ViewGroup, cut_view_groups
from app.tta.stages import StagedPolicy
from app.tta.views import View, plan_image_views, view_equivalents


class PoolPlanner:
    """Decode, plan one view pool per image (every config's views, at every resolution they
    ask for) and cut it into groups by shape, as serving does. Holds no network, so the
    DataLoader workers run it."""

    def __init__(self, preparer: ImagePreparer, configs: list[EvalConfig], seed: int) -> None:
        self.preparer, self.configs, self.seed = preparer, configs, seed
        self.draft_side = preparer.draft_side([c.asked for c in configs])

    def __call__(self, name: str, target: int, data: bytes) -> PlannedImage:
        prep = self.preparer
        image, _ = prep.image(data, self.draft_side)
        w, h = image.resized_size
        crop, measured = prep.cfg.input_size, prep.measured_auto
        policies = {c.name: c.policy_for(w, h, crop, measured) for c in self.configs}
        pool = pool_spec([p.joined for p in policies.values()])
        views = plan_image_views(
            pool, *image.decoded_size, prep.geometry, image_seed(self.seed, name)
        )
        chosen = {n: select_views(pool, p.joined) for n, p in policies.items()}
        groups = cut_view_groups(image, views)
        return PlannedImage(name, target, (w, h), views, groups, chosen, policies)


class DecodedImages(torch.utils.data.Dataset):
    """Each image planned and cut in a worker; errors come back as data, not exceptions."""

    def __init__(self, work: list[tuple[str, LabelledImage]], planner: PoolPlanner) -> None:
        self.work, self.planner = work, planner

    def __len__(self) -> int:
        return len(self.work)

    def __getitem__(self, i: int) -> dict[str, Any]:
        name, item = self.work[i]
        try:
            return {"i": i, "planned": self.planner(name, item.target, item.path.read_bytes())}
        except (OSError, MidserveError) as exc:
            return {"i": i, "error": f"{type(exc).__name__}: {exc}"}


@dataclass
class PlannedImage:
    name: str
    target: int
    size: tuple[int, int]  # the model-scale resize, for the aspect-ratio tables
    views: list[View]
    groups: list[ViewGroup]  # the pool's views by shape
    chosen: dict[str, list[int]]  # config name -> indices into views (every stage's)
    policies: dict[str, StagedPolicy]  # config name -> the policy it resolved to here


class PoolScorer:
    """Per-image records from planned images: one forward per view shape over a batch of
    images' pools, then every config averaged from its views' outputs."""

    def __init__(self, engine: Engine, configs: list[EvalConfig], flops: FlopCounter) -> None:
        self.engine, self.configs, self.flops = engine, configs, flops
        self.k = min(TOP_K, engine.cfg.num_classes)
        self.input_size = engine.cfg.input_size
        self.temperatures = dict(engine.cfg.calibration)

    def run(self, batch: list[PlannedImage]) -> list[ViewOutputs]:
        """Each image's pool outputs in view order; equal shapes share a forward."""
        by_shape: dict[tuple[int, ...], list[tuple[int, ViewGroup]]] = defaultdict(list)
        for i, p in enumerate(batch):
            for g in p.groups:
                by_shape[tuple(g.batch.shape[-2:])].append((i, g))
        parts: list[list[tuple[list[int], ViewOutputs]]] = [[] for _ in batch]
        for members in by_shape.values():
            out = self.engine.run_views(torch.cat([g.batch for _, g in members]))
            offset = 0
            for i, g in members:
                n = len(g.indices)
                rows = ViewOutputs(
                    out.features[offset : offset + n], out.logits[offset : offset + n]
                )
                parts[i].append((g.indices, rows))
                offset += n
        return [ViewOutputs.in_view_order(p) for p in parts]

    def answer(
        self, policy: StagedPolicy, out: ViewOutputs, level: Level
    ) -> tuple[torch.Tensor, int]:
        """A config's probabilities from its views' outputs (every stage's, in order), as
        the server answers: a staged policy stops where its gate stops it. Also the
        number of views that answer ran."""
        head = self.engine.head
        if not policy.staged:  # plain configs stay uncalibrated: the report fits them
            return average_probabilities(out.features, out.logits, head, level), policy.total
        answers = StagedAnswers(policy, level, {None: head}, self.temperatures)
        parts = split_by_stage(out, policy)
        k = answers.stages_to_run(parts)
        return answers.answer(parts, k)[0], policy.stage_ends[k - 1]

    @torch.inference_mode()
    def score(self, batch: list[PlannedImage]) -> list[dict[str, Any]]:
        records = []
        for p, out in zip(batch, self.run(batch), strict=True):
            top: dict[str, list[int]] = {}
            probs_of: dict[str, str] = {}
            view_top1: dict[str, list[int]] = {}
            ran: dict[str, list[View]] = {}
            for c in self.configs:
                idx = torch.tensor(p.chosen[c.name], device=out.features.device)
                mine = ViewOutputs(out.features[idx], out.logits[idx])
                probs, n = self.answer(p.policies[c.name], mine, c.level)
                top[c.name] = probs.float().topk(self.k).indices.tolist()
                probs_of[c.name] = encode_probs(probs)
                view_top1[c.name] = mine.logits[:n].argmax(dim=-1).tolist()
                ran[c.name] = [p.views[i] for i in p.chosen[c.name][:n]]
            records.append(
                {
                    "file": p.name,
                    "target": p.target,
                    "size": list(p.size),
                    "pool": len(p.views),
                    "views": {n: len(v) for n, v in ran.items()},
                    "view_equivalents": {
                        n: round(view_equivalents(v, self.input_size), 4) for n, v in ran.items()
                    },
                    "gflops": {
                        n: round(sum(self.flops.gflops(v.shape) for v in vs), 4)
                        for n, vs in ran.items()
                    },
                    "top": top,
                    "probs": probs_of,
                    "view_top1": view_top1,
                }
            )
        return records


def run_evaluation(opts: EvalOptions, settings: Settings | None = None) -> dict[str, Any] | None:
    """Evaluate, write records and the report; returns the report (None on ranks > 0).

    The engine is built as the server builds it from ``settings`` (default: the
    environment's), with ``opts.device`` / ``opts.dtype`` on top where given."""
    settings = settings or Settings()
    options = EngineOptions.from_settings(settings).with_changes(
        device=opts.device, dtype=opts.dtype
    )
    repo = ModelRepository(opts.models_dir or settings.models_dir)
    with distributed_context(options.device) as ctx:
        engine = load_engine(repo, opts.model, options.with_changes(device=str(ctx.device)))
        cfg = engine.cfg
        folder = read_labelled_folder(
            opts.data, engine.model.labels, opts.labels_file, opts.class_order
        )
        items = folder.items[: opts.limit] if opts.limit > 0 else folder.items
        configs = opts.all_configs()
        prepare_out(opts.out, run_key(opts, configs, cfg), opts.fresh, ctx.rank)
        ctx.barrier()
        names = [str(it.path.relative_to(folder.root)) for it in items]
        done = read_records(opts.out)
        todo = [i for i, n in enumerate(names) if n not in done][ctx.rank :: ctx.world]
        scorer = PoolScorer(engine, configs, FlopCounter(cfg))
        sink = records_path(opts.out, ctx.rank, ctx.world)
        t0 = time.perf_counter()
        work = [(names[i], items[i]) for i in todo]
        progress = opts.progress and ctx.is_main
        views_run = score_images(opts, work, scorer, sink, progress)
        elapsed = time.perf_counter() - t0
        ctx.barrier()
        timed: dict[str, float] = {}
        photos = [item.path.read_bytes() for item in items[: opts.time_images]]
        if photos and ctx.is_main:  # the serving path, one config at a time
            timed = time_configs(ImagePipeline(engine), configs, photos)
        report = None
        if ctx.is_main:
            report = build_report(opts, folder, names, read_records(opts.out), cfg, len(done),
                                  timed)  # fmt: skip
            if photos and report["_staged"]:  # the gated policies it found, served as chosen
                gated = [parse_config(f"{r.policy}@softmax") for r in report["_staged"]]
                ms = time_configs(ImagePipeline(engine), gated, photos)
                report["_staged"] = [
                    dataclasses.replace(r, ms_per_image=ms[g.name])
                    for r, g in zip(report["_staged"], gated, strict=True)
                ]
    if report is None:
        return None
    report["timing"] = {
        "seconds": round(elapsed, 3),
        "images_computed": len(todo),
        "views_run": views_run,
        "world_size": ctx.world,
        "scope": "this process" if ctx.world == 1 else "rank 0 only (each rank did its share)",
        "views_per_second": round(views_run / elapsed, 2) if elapsed > 0 else None,
    }
    rows, staged = report["_rows"], report["_staged"]
    halves = report["_plain_halves"]
    write_report(opts, report, model_folder=cfg.folder)
    if opts.policy_budget is not None and cfg.folder is not None:
        report["policy_written"] = write_chosen_policy(
            cfg, rows, staged, halves, report["calibration"], opts.policy_budget
        )
    return report


def write_chosen_policy(
    cfg: ModelConfig,
    rows: list[Row],
    staged: list[StagedRow],
    halves: dict[str, dict[str, float]],
    calibration: list[dict[str, Any]],
    budget: float,
) -> dict[str, Any]:
    """Write what ``views=auto`` serves: the best plain or gated policy within ``budget``
    on the fit half, with its temperatures; without per-image probabilities (records of an
    older run), the best plain config on every image, uncalibrated."""
    temperatures = {c["config"]: c["temperature"] for c in calibration}
    chosen = choose_policy(halves, staged, temperatures, budget)
    if chosen is not None:
        write_policy(cfg, chosen.spec, chosen.temperatures)
        return dataclasses.asdict(chosen)
    best = best_under_budget(rows, budget)
    if best is None:
        raise InvalidRequestError(f"no config fits a budget of {budget} views")
    spec = best.config.rpartition("@")[0]
    write_policy(cfg, spec)
    return {"spec": spec, "temperatures": {}, "top1": best.top1,
            "view_equivalents": best.view_equivalents}  # fmt: skip


def score_images(
    opts: EvalOptions,
    work: list[tuple[str, LabelledImage]],
    scorer: PoolScorer,
    records_file: Path,
    progress: bool,
) -> int:
    """Score the (name, image) pairs, appending a record per image to ``records_file``;
    a forward gathers about ``opts.batch_views`` views. Returns the views run."""
    engine = scorer.engine
    o = engine.options
    cpu = torch.device("cpu")  # workers decode on the CPU; the engine moves the tensors
    preparer = ImagePreparer(
        engine.cfg, cpu, o.limits, o.jpeg_draft, engine.model.stride, o.uint8_views
    )
    dataset = DecodedImages(work, PoolPlanner(preparer, scorer.configs, opts.seed))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=opts.workers, collate_fn=lambda x: x
    )
    views_run = 0
    bar = tqdm(total=len(work), unit="img", disable=not progress, file=sys.stderr)
    pending: list[PlannedImage] = []
    threshold = max(1, opts.batch_views or engine.chunk_views)
    pending_views = 0
    torn = records_file.is_file() and not records_file.read_bytes().endswith(b"\n")
    with records_file.open("a") as sink:
        if torn and records_file.stat().st_size:
            sink.write("\n")  # end a line cut by an interrupted run; it is ignored on read

        def flush() -> None:
            nonlocal pending, pending_views, views_run
            if not pending:
                return
            for rec in scorer.score(pending):
                views_run += rec["pool"]
                sink.write(json.dumps(rec) + "\n")
            sink.flush()
            bar.update(len(pending))
            pending, pending_views = [], 0

        for item in loader:
            name, _ = work[item["i"]]
            if "error" in item:
                sink.write(json.dumps({"file": name, "skipped": item["error"]}) + "\n")
                bar.update(1)
                continue
            planned = item["planned"]
            pending.append(planned)
            pending_views += len(planned.views)
            if pending_views >= threshold:
                flush()
        flush()
    bar.close()
    return views_run
