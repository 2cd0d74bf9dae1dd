"""The staged-policy and calibration sections of the evaluation report (markdown)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from app.jobs.evaluate.staged import Calibration, StagedRow


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100.0 * x:.1f}"


def _num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def markdown_staged_table(
    rows: Sequence[StagedRow], plain: dict[str, dict[str, float]], baseline: str
) -> str:
    """Gated policies chosen on the fit half, scored on the test half, beside the plain
    configs on the same test images."""
    n = rows[0].images if rows else 0
    head = (
        f"Thresholds and temperatures chosen on the fit half; every number below is on the "
        f"other (test) half: {n} images, none of which chose them.\n\n"
        "| policy | budget (fit) | view-eq/img | ms/img | GFLOPs/img | went on | top-1 % | "
        f"top-5 % | Δ top-1 vs {baseline} (95 % CI) | fit top-1 % | fit view-eq |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|\n"
    )
    lines = []
    for r in rows:
        p = r.paired
        ci = f"{100 * p.diff:+.1f} ({100 * p.ci_low:+.1f} .. {100 * p.ci_high:+.1f})"
        lines.append(
            f"| `{r.policy}` | {r.budget:g} | {r.view_equivalents:.2f} | "
            f"{_num(r.ms_per_image, 1)} | {_num(r.gflops, 2)} | {_pct(r.escalated)} % | "
            f"{_pct(r.top1)} | {_pct(r.top5)} | {ci} | {_pct(r.fit_top1)} | "
            f"{r.fit_view_equivalents:.2f} |"
        )
    for name, h in plain.items():
        lines.append(
            f"| `{name}` (plain) | | {h['view_equivalents']:.2f} | | | | {_pct(h['top1'])} | "
            f"| | {_pct(h['fit_top1'])} | {h['fit_view_equivalents']:.2f} |"
        )
    return head + "\n".join(lines) + "\n"


def markdown_calibration_table(calibrations: Sequence[Calibration]) -> str:
    head = (
        "Temperature fitted on the fit half (minimum NLL of softmax(log p / T)); NLL, ECE "
        "(15 bins) and the AUROC of telling wrong answers from right ones by each signal, "
        "on the test half.\n\n"
        "| config | T | NLL before | NLL after | ECE before | ECE after | AUROC prob | "
        "AUROC margin | AUROC agree |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| `{c.config}` | {c.temperature:.3f} | {c.nll_before:.3f} | {c.nll_after:.3f} | "
        f"{c.ece_before:.3f} | {c.ece_after:.3f} | {_num(c.auroc['prob'])} | "
        f"{_num(c.auroc['margin'])} | {_num(c.auroc['agree'])} |"
        for c in calibrations
    ]
    return head + "\n".join(lines) + "\n"
