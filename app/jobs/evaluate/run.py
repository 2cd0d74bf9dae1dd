"""One evaluation run: decode in DataLoader workers (the server's decode and resize), one
forward over each image's view pool, per-image records, then the report on rank 0."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from app.config import Settings
from app.engine import Engine, load_engine
from app.errors import MidserveError
from app.jobs.datasets import LabelledImage, read_labelled_folder
from app.jobs.distributed import distributed_context
from app.jobs.evaluate.configs import (
    TOP_K,
    EvalConfig,
    EvalOptions,
    image_seed,
    pool_spec,
    select_views,
)
from app.jobs.evaluate.records import prepare_out, read_records, records_path, run_key
from app.jobs.evaluate.report import build_report, write_report
from app.options import EngineOptions
from app.pipeline import ImagePreparer
from app.repository import ModelRepository
from app.tta.averaging import average_probabilities
from app.tta.preprocess import PreparedImage, cut_views
from app.tta.views import View, plan_views


class DecodedImages(torch.utils.data.Dataset):
    """Decode + resize + normalise on the CPU as serving does (``ImagePreparer.image``);
    errors come back as data, not exceptions."""

    def __init__(self, paths: list[Path], preparer: ImagePreparer) -> None:
        self.paths, self.preparer = paths, preparer

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            image, _ = self.preparer.image(self.paths[i].read_bytes())
            image.at(image.resized_size)  # resized in the worker: no view needs another scale
        except (OSError, MidserveError) as exc:
            return {"i": i, "error": f"{type(exc).__name__}: {exc}"}
        image.source = None  # so the decoded pixels are not sent back to the main process
        return {"i": i, "image": image}


@dataclass
class PlannedImage:
    name: str
    target: int
    image: PreparedImage
    views: list[View]
    chosen: dict[str, list[int]]  # config name -> indices into views


class PoolScorer:
    """Turns decoded images into per-image records (one forward of each image's view pool)."""

    def __init__(self, engine: Engine, configs: list[EvalConfig], seed: int) -> None:
        self.engine, self.configs, self.seed = engine, configs, seed
        self.crop = engine.cfg.input_size
        self.k = min(TOP_K, engine.cfg.num_classes)

    def plan(self, name: str, target: int, image: PreparedImage) -> PlannedImage:
        """The image's view pool and, per config, which pool views it averages."""
        w, h = image.resized_size
        specs = {c.name: c.spec_for(w, h, self.crop) for c in self.configs}
        pool = pool_spec(list(specs.values()))
        views = plan_views(pool, w, h, self.crop, image_seed(self.seed, name))
        chosen = {n: select_views(pool, s) for n, s in specs.items()}
        return PlannedImage(name, target, image, views, chosen)

    @torch.inference_mode()
    def score(self, batch: list[PlannedImage]) -> list[dict[str, Any]]:
        """Records for a few images at once: one run_views over all their pools."""
        stacks = []
        for p in batch:
            stacks.append(cut_views(p.image.to(self.engine.device), p.views))
        out = self.engine.run_views(torch.cat(stacks))
        head = self.engine.model.head
        records, offset = [], 0
        for p in batch:
            feats = out.features[offset : offset + len(p.views)]
            logits = out.logits[offset : offset + len(p.views)]
            offset += len(p.views)
            top: dict[str, list[int]] = {}
            for c in self.configs:
                idx = torch.tensor(p.chosen[c.name], device=feats.device)
                probs = average_probabilities(feats[idx], logits[idx], head, c.level)
                top[c.name] = probs.float().topk(self.k).indices.tolist()
            records.append(
                {
                    "file": p.name,
                    "target": p.target,
                    "size": list(p.image.resized_size),
                    "pool": len(p.views),
                    "views": {n: len(v) for n, v in p.chosen.items()},
                    "top": top,
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
        scorer = PoolScorer(engine, configs, opts.seed)
        sink = records_path(opts.out, ctx.rank, ctx.world)
        t0 = time.perf_counter()
        work = [(names[i], items[i]) for i in todo]
        progress = opts.progress and ctx.is_main
        views_run = score_images(opts, work, scorer, sink, progress)
        elapsed = time.perf_counter() - t0
        ctx.barrier()
    if not ctx.is_main:
        return None
    report = build_report(opts, folder, names, read_records(opts.out), cfg, len(done))
    report["timing"] = {
        "seconds": round(elapsed, 3),
        "images_computed": len(todo),
        "views_run": views_run,
        "world_size": ctx.world,
        "scope": "this process" if ctx.world == 1 else "rank 0 only (each rank did its share)",
        "views_per_second": round(views_run / elapsed, 2) if elapsed > 0 else None,
    }
    write_report(opts, report, model_folder=cfg.folder)
    return report


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
    cpu = torch.device("cpu")  # workers decode on the CPU; the scorer moves the tensors
    preparer = ImagePreparer(engine.cfg, cpu, o.limits, o.jpeg_draft, engine.model.stride)
    dataset = DecodedImages([item.path for _, item in work], preparer)
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
            name, labelled = work[item["i"]]
            if "error" in item:
                sink.write(json.dumps({"file": name, "skipped": item["error"]}) + "\n")
                bar.update(1)
                continue
            planned = scorer.plan(name, labelled.target, item["image"])
            pending.append(planned)
            pending_views += len(planned.views)
            if pending_views >= threshold:
                flush()
        flush()
    bar.close()
    return views_run
