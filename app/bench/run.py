"""One bench run: the bound, the network alone by chunk size, the served pipeline against
the naive one, the dtype's agreement, then HTTP and the server's CPU around the network, all
in one process so the ratios hold."""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from app.bench.cpu_budget import cpu_budget_phase, print_budget
from app.bench.plans import cannot_run, parallel_throughput, raw_by_backend, tuned, tuning_summary
from app.bench.roofline import gemm_gflops, model_gflops_per_view
from app.bench.server_load import HttpRound, http_load, summarize_rounds
from app.bench.timing import (
    dtype_agreement,
    engine_throughput,
    naive_throughput,
    pipeline_rates,
    raw_forward,
)
from app.cli_args import settings_from_args
from app.repository import LoadedModel, ModelRepository
from app.runtime.engine import Engine, pick_device
from app.runtime.plan import EngineOptions
from app.serve_process import serve_process
from app.tta.views import ViewSpec, default_policy, parse_view_spec

ROUNDS = 3


def best_chunk(engine: Engine, spec: ViewSpec, d: float, out: dict[str, Any]) -> int:
    """Views per forward with the highest raw throughput; rounds interleaved, median per
    chunk, so one noisy second cannot pick the chunk."""
    chunks = sorted({1, 2, 4, 8, 10, 16, spec.total, engine.chunk_views})
    chunk_rounds: dict[int, list[float]] = {c: [] for c in chunks}
    for _ in range(3):
        for c in chunks:
            chunk_rounds[c].append(raw_forward(engine, c, d / 4, views=max(spec.total, c)))
    raw = {c: statistics.median(v) for c, v in chunk_rounds.items()}
    best = max(raw, key=lambda c: raw[c])
    out["raw_forward_by_chunk"] = {str(c): round(v, 2) for c, v in raw.items()}
    out["raw_forward_views_per_s"] = raw[best]
    out["best_chunk"] = best
    return best


# images/s over HTTP of the center crop, the default before staged policies and the
# model's measured (gated) default, side by side in one run
GATED_POLICIES = {
    "center": "center",
    "previous": "center,full@288,mfull@288",
    "gated_default": "auto",
}


def tuning_env(args: argparse.Namespace) -> dict[str, str]:
    """The bench's tuning budget and cache for the servers it starts: the same key, so a
    server loads the plan the bench tuned and measured instead of tuning its own."""
    env = {"MIDSERVE_TUNE_SECONDS": str(args.tune_seconds)}
    if args.tune_cache_dir:
        env["MIDSERVE_TUNE_CACHE_DIR"] = str(args.tune_cache_dir)
    return env


def http_phase(args: argparse.Namespace, models_dir: Path, engine: Engine, images: list[bytes],
               spec: ViewSpec, out: dict[str, Any]) -> None:  # fmt: skip
    """The same pipeline behind a real server, batched (and, with --http-matrix, not),
    against ``engine`` in process with the concurrency its plan serves with: the server
    tunes itself at load (from the same cache), so both sides run the same plan."""
    d = args.duration
    # only what the bench was told: the server tunes the rest as the bench's engine did
    env = {"MIDSERVE_DEVICE": out["device"], "MIDSERVE_FUSE": "false" if args.no_fuse else "true"}
    if args.dtype:
        env["MIDSERVE_DTYPE"] = args.dtype
    if args.compile:
        env["MIDSERVE_COMPILE"] = "true"
    env.update(tuning_env(args))
    params = {"views": str(spec), "level": args.level}
    # batched: the server's own defaults; unbatched: requests never share a forward
    settings = {"batched": {},
                "unbatched": {"MIDSERVE_MAX_BATCH_VIEWS": str(spec.total),
                              "MIDSERVE_MAX_WAIT_MS": "0"}}  # fmt: skip
    modes = ["batched", "unbatched"] if args.http_matrix else ["batched"]
    levels = [1, 8] if args.http_matrix else [8]
    servers: dict[str, str] = {}
    rounds: dict[str, list[HttpRound]] = {f"http_{m}_c{c}": [] for m in modes for c in levels}
    rounds["http_v2_batched_c8"] = []  # the Open Inference Protocol on the batched server
    engine_rounds: list[float] = []
    with contextlib.ExitStack() as stack:
        for mode in modes:
            servers[mode], _ = stack.enter_context(
                serve_process(models_dir, args.model, env={**env, **settings[mode]},
                              inherit_output=True, ready_timeout_s=180)
            )  # fmt: skip
        # The machine's speed drifts from minute to minute: interleave short rounds of the
        # in-process engine and every HTTP setting, so each ratio compares like with like.
        policy_rounds: dict[str, list[HttpRound]] = {
            f"{key}_c{c}": [] for key in GATED_POLICIES for c in (1, 8)
        }
        for r in range(ROUNDS):
            engine_rounds.append(parallel_throughput(engine, images, spec, args.level, d / ROUNDS))
            warm = 1.0 if r == 0 else 0.2
            for mode in modes:
                for c in levels:
                    rounds[f"http_{mode}_c{c}"].append(
                        http_load(servers[mode], args.model, images, params, c, d / ROUNDS, warm)
                    )
            rounds["http_v2_batched_c8"].append(http_load(
                servers["batched"], args.model, images, params, 8, d / ROUNDS, warm, "v2"
            ))  # fmt: skip
            for key, views in GATED_POLICIES.items():  # one image a request: images/s
                for c in (1, 8):
                    policy_rounds[f"{key}_c{c}"].append(http_load(
                        servers["batched"], args.model, images, {"views": views}, c,
                        d / ROUNDS, warm,
                    ))  # fmt: skip
    out["http_policies"] = {
        key: {"views": GATED_POLICIES[key.rpartition("_")[0]],
              **{k: round(v, 2) for k, v in summarize_rounds(value).items()}}
        for key, value in policy_rounds.items()
    }  # fmt: skip
    gated, before = out["http_policies"]["gated_default_c8"], out["http_policies"]["previous_c8"]
    out["gated_vs_previous_images_per_s_c8"] = round(
        gated["requests_per_s"] / max(before["requests_per_s"], 1e-9), 3
    )
    for key, value in rounds.items():
        out[key] = {k: round(v, 2) for k, v in summarize_rounds(value).items()}
    v1, v2 = out["http_batched_c8"], out["http_v2_batched_c8"]  # one image a request
    out["v2_vs_v1_images_per_s_c8"] = round(
        v2["requests_per_s"] / max(v1["requests_per_s"], 1e-9), 3
    )
    out["engine_views_per_s_beside_http"] = statistics.median(engine_rounds)
    c8 = out["http_batched_c8"]
    out["http_views_per_s_c8"] = c8["views_per_s"]
    out["http_p50_ms_c8"], out["http_p99_ms_c8"] = c8["p50_ms"], c8["p99_ms"]
    out["http_overhead"] = 1.0 - c8["views_per_s"] / out["engine_views_per_s_beside_http"]


def cpu_phase(args: argparse.Namespace, models_dir: Path, engine: Engine,
              photos: list[tuple[str, bytes]], spec: ViewSpec,
              out: dict[str, Any]) -> None:  # fmt: skip
    """Server CPU per request around the network, by stage (app/bench/cpu_budget.py), on a
    server that loads ``engine``'s tuned plan from the same cache."""
    env = {"MIDSERVE_DEVICE": str(engine.device), **tuning_env(args)}
    cpu_budget_phase(models_dir, args.model, engine, photos, spec, args.duration, env,
                     args.cpu_client, out)  # fmt: skip
    print_budget(out["cpu_outside_network"])


def plans_phase(args: argparse.Namespace, model: LoadedModel, out: dict[str, Any]) -> Engine | None:
    """Both GEMM ceilings, the network alone per backend and dtype, and the tuned engine."""
    d = args.duration
    if model.device.type == "cpu":  # bf16 paths are judged against the bf16 ceiling
        out["gemm_gflops_bfloat16"] = gemm_gflops(d, model.device, torch.bfloat16)
        out["bound_views_per_s_bfloat16"] = (
            out["gemm_gflops_bfloat16"] / out["model_gflops_per_view"]
        )
    raw = raw_by_backend(model, 8, d)
    out["raw_forward_by_backend"] = {k: round(v, 2) for k, v in raw.items()}
    if args.no_tune:
        return None
    engine = tuned(model, args.tune_seconds, args.tune_cache_dir)
    out.update(tuning_summary(engine))
    return engine


def pipeline_phase(args: argparse.Namespace, model: LoadedModel, engine: Engine,
                   options: EngineOptions, images: list[bytes], spec: ViewSpec,
                   out: dict[str, Any], tuned_engine: Engine | None = None
                   ) -> EngineOptions:  # fmt: skip
    """The served pipeline against the naive one and the unfused network; interleaved
    rounds, medians: the machine's speed drifts between one phase and the next.
    Returns the options the measured engine was built with."""
    d = args.duration
    served = options.with_changes(dtype=engine.dtype_name, chunk_views=engine.chunk_views)
    # the same engine on the network as loaded: what the inference rewrites buy
    unfused = None if args.no_fuse else Engine(model, served.with_changes(fuse=False))
    engine_runs, naive_runs, unfused_runs, tuned_runs = [], [], [], []
    for _ in range(ROUNDS):
        if tuned_engine is not None:  # served as tuned: plan.workers images at once
            tuned_runs.append(
                parallel_throughput(tuned_engine, images, spec, args.level, d / ROUNDS)
            )
        engine_runs.append(engine_throughput(engine, images, spec, args.level, d / ROUNDS))
        naive_runs.append(naive_throughput(model, images, min(spec.total, 10), d / ROUNDS))
        if unfused is not None:
            unfused_runs.append(engine_throughput(unfused, images, spec, args.level, d / ROUNDS))
    out["engine_views_per_s"] = statistics.median(engine_runs)
    out["naive_views_per_s"] = statistics.median(naive_runs)
    if unfused_runs:
        out["engine_unfused_views_per_s"] = statistics.median(unfused_runs)
        out["fusion_speedup"] = out["engine_views_per_s"] / out["engine_unfused_views_per_s"]
    out["efficiency"] = out["engine_views_per_s"] / out["bound_views_per_s"]
    if tuned_runs:
        out["tuned_engine_views_per_s"] = statistics.median(tuned_runs)
        out["tuned_vs_naive"] = out["tuned_engine_views_per_s"] / out["naive_views_per_s"]
        out["tuned_vs_fp32_bound"] = out["tuned_engine_views_per_s"] / out["bound_views_per_s"]
    if engine.dtype != torch.float32:
        # fp32 is not the ceiling of a bf16/fp16 forward: its own matmul rate is
        gemm = out.get(f"gemm_gflops_{engine.dtype_name}") or gemm_gflops(
            d, engine.device, engine.dtype
        )
        out[f"gemm_gflops_{engine.dtype_name}"] = gemm
        out[f"bound_views_per_s_{engine.dtype_name}"] = gemm / out["model_gflops_per_view"]
        out[f"efficiency_{engine.dtype_name}"] = (
            out["engine_views_per_s"] / out[f"bound_views_per_s_{engine.dtype_name}"]
        )
    out["speedup_vs_naive"] = out["engine_views_per_s"] / out["naive_views_per_s"]
    return served


def policy_phase(args: argparse.Namespace, engine: Engine, images: list[bytes],
                 spec: ViewSpec, out: dict[str, Any]) -> None:  # fmt: skip
    """The crop policy against a whole-image one (``--full-spec``) through the same engine,
    in interleaved rounds: images/s and view-equivalents/s (pixels / one input-size view)."""
    policies = {"crops": spec, "full": parse_view_spec(args.full_spec)}
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in policies}
    for _ in range(ROUNDS):
        for key, policy in policies.items():
            rates = pipeline_rates(engine, images, policy, args.level, args.duration / ROUNDS)
            runs[key].append((rates[0], rates[2]))
    for key, policy in policies.items():
        out[f"policy_{key}"] = {
            "spec": str(policy),
            "images_per_s": round(statistics.median(r[0] for r in runs[key]), 2),
            "view_equivalents_per_s": round(statistics.median(r[1] for r in runs[key]), 2),
        }


def dtype_phase(args: argparse.Namespace, model: LoadedModel, served: EngineOptions,
                images: list[bytes], spec: ViewSpec, out: dict[str, Any]) -> None:  # fmt: skip
    """What a faster dtype buys (throughput) and costs (agreement with float32)."""
    # agreement of the fused network in that dtype, as served by default
    checked = served.with_changes(fuse=True)
    if served.dtype != "float32":
        fp32 = Engine(model, served.with_changes(dtype="float32"))
        out["engine_float32_views_per_s"] = engine_throughput(
            fp32, images, spec, args.level, args.duration
        )
        out["agreement_vs_float32"] = dtype_agreement(model, images, spec, checked)
    elif args.check_dtype:
        other = checked.with_changes(dtype=args.check_dtype)
        why = cannot_run(Engine(model, other))
        out[f"{args.check_dtype}_agreement"] = (
            {"skipped": why} if why else dtype_agreement(model, images, spec, other)
        )


def print_table(out: dict[str, Any]) -> None:
    rows: list[tuple[str, str]] = []
    for key, value in out.items():
        if key == "cpu_outside_network":  # a table of its own
            continue
        if isinstance(value, float):
            rows.append((key, f"{value:.3f}"))
        elif not isinstance(value, dict):
            rows.append((key, str(value)))
        else:
            rows.append((key, json.dumps(value)))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}", file=sys.stderr)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    settings = settings_from_args(args)
    # the server's engine options, with the bench's own choices on top
    options = EngineOptions.from_settings(settings).with_changes(
        chunk_views=args.chunk_views or None, compile=False, fuse=False if args.no_fuse else None
    )
    device = pick_device(options.device)
    model = ModelRepository(settings.models_dir).load(args.model, device)
    spec = (
        default_policy(args.views) if args.views_spec is None else parse_view_spec(args.views_spec)
    )
    files = sorted(Path(args.data).glob("*")) if args.data else []
    photos = [(f.name, f.read_bytes()) for f in files if f.is_file()][: args.images]
    images = [data for _, data in photos]
    if not images:
        raise SystemExit(f"no images in {args.data!r}: pass --data with real photos")
    d = args.duration
    if args.ceiling:
        from app.bench.ceiling import ceiling_phase

        ceiling: dict[str, Any] = {"model": args.model, "device": str(device)}
        env = {"MIDSERVE_DEVICE": str(device), **tuning_env(args)}
        engine = tuned(model, args.tune_seconds, args.tune_cache_dir)
        ceiling_phase(settings.models_dir, args.model, engine, images, d, env, ceiling)
        print_table(ceiling)
        return ceiling
    if args.cpu_budget:
        budget: dict[str, Any] = {"model": args.model, "device": str(device)}
        engine = tuned(model, args.tune_seconds, args.tune_cache_dir)
        cpu_phase(args, settings.models_dir, engine, photos, spec, budget)
        return budget
    if args.policies:
        from app.bench.policies import policies_phase, print_policies

        compared: dict[str, Any] = {"model": args.model, "device": str(device)}
        env = {"MIDSERVE_DEVICE": str(device), **tuning_env(args)}
        policies_phase(settings.models_dir, args.model, photos, args.policies,
                       args.policy_duration, env, args.cpu_client, compared)  # fmt: skip
        print_policies(compared["policies"])
        return compared
    out: dict[str, Any] = {"model": args.model, "device": str(device), "dtype": options.dtype,
                           "views": spec.total, "spec": str(spec), "level": args.level,
                           "threads": torch.get_num_threads()}  # fmt: skip

    out["gemm_gflops"] = gemm_gflops(d, device)
    out["model_gflops_per_view"] = model_gflops_per_view(model)
    out["bound_views_per_s"] = out["gemm_gflops"] / out["model_gflops_per_view"]

    tuned_engine = plans_phase(args, model, out)
    engine = Engine(model, options)
    out["dtype"] = engine.dtype_name
    out["fusion"] = engine.fusion.describe() if engine.fusion else "off"
    chunk = best_chunk(engine, spec, d, out)
    engine.chunk_views = args.chunk_views or chunk
    if args.compile:
        out["eager_engine_views_per_s"] = engine_throughput(engine, images, spec, args.level, d)
        engine = Engine(model, options.with_changes(chunk_views=engine.chunk_views, compile=True))
        size = model.cfg.input_size
        t0 = time.perf_counter()
        engine.run_views(torch.zeros(engine.chunk_views, 3, size, size, device=device))
        out["compile_warmup_s"] = time.perf_counter() - t0
        out["raw_forward_views_per_s"] = raw_forward(engine, engine.chunk_views, d)
    served = pipeline_phase(args, model, engine, options, images, spec, out, tuned_engine)
    served_engine = tuned_engine or engine  # what the server runs
    policy_phase(args, served_engine, images, spec, out)
    dtype_phase(args, model, served, images, spec, out)
    if not args.no_http:
        http_phase(args, settings.models_dir, served_engine, images, spec, out)
        # the server's plan: the bench's tuned engine (an untuned bench tunes for this phase)
        cpu_engine = tuned_engine or tuned(model, args.tune_seconds, args.tune_cache_dir)
        cpu_phase(args, settings.models_dir, cpu_engine, photos, spec, out)
    print_table(out)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}
