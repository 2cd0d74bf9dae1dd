"""Evaluation report: accuracy tables, paired statistics against the center crop, plots.

Everything here works on per-image 0/1 correctness vectors, so it is independent of how
the predictions were computed and easy to check by hand.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class Paired:
    """One config against the baseline on the same images (MID's "gain in parentheses")."""

    diff: float  # top-1 difference, fraction (config - baseline)
    ci_low: float  # bootstrap 95 % interval of the difference
    ci_high: float
    fixed: int  # images the baseline got wrong and the config right
    broken: int  # images the baseline got right and the config wrong
    mcnemar_p: float  # exact two-sided McNemar (binomial) p-value


@dataclass(frozen=True)
class Row:
    config: str
    level: str
    images: int
    top1: float  # fraction of images
    top5: float
    mean_views: float
    paired: Paired | None  # None for the baseline itself
    view_equivalents: float = math.nan  # compute per image: pixels / one input-size view
    gflops: float = math.nan  # per image, from a FLOP counter
    ms_per_image: float = math.nan  # measured alone on the serving path (--time-images)


def bootstrap_diff_ci(
    a: np.ndarray, b: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile 95 % interval of mean(a - b), resampling images with replacement."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(samples, d.size))
    means = d[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def mcnemar_exact(fixed: int, broken: int) -> float:
    """Two-sided exact McNemar p-value: discordant pairs ~ Binomial(fixed + broken, 1/2)."""
    n = fixed + broken
    if n == 0:
        return 1.0
    k = min(fixed, broken)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired(config: np.ndarray, baseline: np.ndarray, seed: int = 0) -> Paired:
    c = np.asarray(config, dtype=bool)
    b = np.asarray(baseline, dtype=bool)
    fixed = int(np.sum(c & ~b))
    broken = int(np.sum(~c & b))
    lo, hi = bootstrap_diff_ci(c, b, seed=seed)
    diff = float(c.mean() - b.mean()) if c.size else math.nan
    return Paired(diff, lo, hi, fixed, broken, mcnemar_exact(fixed, broken))


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100.0 * x:.2f}"


def _signed(x: float) -> str:
    return "-" if math.isnan(x) else f"{100.0 * x:+.2f}"


def markdown_table(rows: Sequence[Row], baseline: str) -> str:
    head = (
        "| config | views/img | view-eq/img | GFLOPs/img | ms/img | top-1 % | top-5 % | "
        f"Δ top-1 vs {baseline} (95 % CI) | fixed | broken | McNemar p |\n"
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        if r.paired is None:
            extra = "(baseline) | | |"
        else:
            p = r.paired
            extra = (
                f"{_signed(p.diff)} ({_signed(p.ci_low)} .. {_signed(p.ci_high)}) | "
                f"{p.fixed} | {p.broken} | {p.mcnemar_p:.3g}"
            )
        cost = f"{r.view_equivalents:.2f} | {r.gflops:.2f} | {r.ms_per_image:.1f}"
        lines.append(
            f"| `{r.config}` | {r.mean_views:.1f} | {cost.replace('nan', '–')} | "
            f"{_pct(r.top1)} | {_pct(r.top5)} | {extra} |"
        )
    return head + "\n".join(lines) + "\n"


def rows_to_json(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Rows as JSON values; a number that was not measured (NaN) is null."""
    return [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(r).items()}
        for r in rows
    ]


def csv_table(rows: Sequence[Row]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "config",
            "level",
            "images",
            "mean_views",
            "top1",
            "top5",
            "diff_top1",
            "ci_low",
            "ci_high",
            "fixed",
            "broken",
            "mcnemar_p",
            "view_equivalents",
            "gflops",
            "ms_per_image",
        ]  # fmt: skip
    )
    for r in rows:
        p = r.paired
        w.writerow(
            [r.config, r.level, r.images, f"{r.mean_views:.3f}", f"{r.top1:.6f}", f"{r.top5:.6f}"]
            + (
                [
                    f"{p.diff:.6f}",
                    f"{p.ci_low:.6f}",
                    f"{p.ci_high:.6f}",
                    p.fixed,
                    p.broken,
                    f"{p.mcnemar_p:.6g}",
                ]  # fmt: skip
                if p
                else ["", "", "", "", "", ""]
            )
            + [f"{r.view_equivalents:.4f}", f"{r.gflops:.4f}", f"{r.ms_per_image:.2f}"]
        )
    return buf.getvalue()


@dataclass(frozen=True)
class SweepPoint:
    crops: int
    random_top1: float  # k random crops
    with_center_top1: float  # center crop + k random crops


def sweep_csv(points: Sequence[SweepPoint]) -> str:
    lines = ["random_crops,top1_random,top1_center_plus_random"]
    lines += [f"{p.crops},{p.random_top1:.6f},{p.with_center_top1:.6f}" for p in points]
    return "\n".join(lines) + "\n"


def plot_sweep(
    points: Sequence[SweepPoint], center_top1: float, title: str, path: Path, level: str
) -> Path:
    """The MID paper's Fig. 3: top-1 against the number of random crops averaged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [p.crops for p in points]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    ax.plot(ks, [100 * p.random_top1 for p in points], "o-", ms=3, label="RCs")
    ax.plot(ks, [100 * p.with_center_top1 for p in points], "s-", ms=3, label="CC + RCs")
    ax.axhline(100 * center_top1, color="gray", ls="--", lw=1, label="CC only")
    ax.set_xlabel(f"number of random crops (RCs) averaged at the {level} level")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


# -- the data's crop-to-image statistics (MID: gains come from the room around the crop) --


def crop_statistics(sizes: Sequence[tuple[int, int]], crop: int, resize: int) -> dict[str, Any]:
    """How much room the resized images leave around one crop, over the whole set."""
    if not sizes:
        return {}
    w = np.array([s[0] for s in sizes], dtype=np.float64)
    h = np.array([s[1] for s in sizes], dtype=np.float64)
    long_side, short_side = np.maximum(w, h), np.minimum(w, h)
    aspect = long_side / short_side
    area_ratio = crop * crop / (w * h)
    q = [0, 10, 50, 90, 100]
    edges = [1.0, 1.1, 1.25, 1.5, 2.0, 3.0, math.inf]
    hist, _ = np.histogram(aspect, bins=edges)
    return {
        "images": len(sizes),
        "crop_size": crop,
        "resize_size": resize,
        "crop_to_image_ratio": crop / resize,
        "crop_area_fraction_mean": float(area_ratio.mean()),
        "crop_area_fraction_quantiles": _quantiles(area_ratio, q, 4),
        "aspect_quantiles": _quantiles(aspect, q, 3),
        "resized_long_side_quantiles": _quantiles(long_side, q, 0),
        "no_room": int(np.sum(long_side == crop)),
        "room_one_axis_only": int(np.sum((short_side == crop) & (long_side > crop))),
        "aspect_histogram": {
            f"{lo:g}-{hi:g}": int(n) for lo, hi, n in zip(edges[:-1], edges[1:], hist, strict=True)
        },
    }


def _quantiles(x: np.ndarray, q: list[int], digits: int) -> dict[str, float]:
    values = np.percentile(x, q).round(digits).tolist()
    return {f"p{p}": v for p, v in zip(q, values, strict=True)}


ASPECT_BANDS = ((1.0, 1.25), (1.25, 1.5), (1.5, math.inf))


def gains_by_aspect(
    aspects: np.ndarray, correct: dict[str, np.ndarray], baseline: str
) -> list[dict[str, Any]]:
    """Top-1 of every config per aspect band of the resized images, next to the baseline."""
    out = []
    for lo, hi in ASPECT_BANDS:
        mask = (aspects >= lo) & (aspects < hi)
        n = int(mask.sum())
        row: dict[str, Any] = {"aspect": f"{lo:g}-{hi:g}", "images": n}
        for name, c in correct.items():
            row[name] = float(c[mask].mean()) if n else math.nan
        row["baseline"] = baseline
        out.append(row)
    return out


def markdown_aspect_table(bands: list[dict[str, Any]], configs: Sequence[str]) -> str:
    head = "| aspect (long/short) | images | " + " | ".join(f"`{c}`" for c in configs) + " |\n"
    head += "|---|---:|" + "---:|" * len(configs) + "\n"
    body = "\n".join(
        f"| {b['aspect']} | {b['images']} | " + " | ".join(_pct(b[c]) for c in configs) + " |"
        for b in bands
    )
    return head + body + "\n"
