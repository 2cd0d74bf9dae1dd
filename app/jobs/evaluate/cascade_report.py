"""The cascade search's report: every policy on the test half, pooled and per folder, with
paired intervals against the references, and top-1 against compute across models."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.jobs.evaluate.cascade_scores import KindScore, PolicyScore

MODEL_COLOURS = ("tab:blue", "tab:purple", "tab:brown", "tab:olive", "tab:cyan")


def _pct(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{100.0 * x:.1f}"


def _ci(score: KindScore, ref: str) -> str:
    p = score.vs.get(ref)
    if p is None or math.isnan(p.diff):
        return ""
    return f"{100 * p.diff:+.1f} ({100 * p.ci_low:+.1f} .. {100 * p.ci_high:+.1f})"


def _name(policy: str) -> str:
    return policy.removesuffix("@softmax").replace(":1", "")


def _table(scores: Sequence[PolicyScore], refs: list[str], kinds: list[str]) -> str:
    head = ["policy", "budget (fit)", "view-eq/img", "ms/img", "went on", "top-1 %"]
    head += [f"{k} top-1 %" for k in kinds] + [f"Δ vs `{_name(r)}` (95 % CI)" for r in refs]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for s in scores:
        p = s.pooled
        ms = "" if s.ms_per_image is None else f"{s.ms_per_image:.1f}"
        budget = "" if s.budget is None else f"{s.budget:g}"
        went_on = f"{100 * p.escalated:.0f} %" if s.budget is not None else ""
        cells = [f"`{_name(s.policy)}`", budget, f"{p.view_equivalents:.2f}", ms, went_on,
                 _pct(p.top1)]  # fmt: skip
        cells += [f"{_pct(s.kinds[k].top1)} ({s.kinds[k].view_equivalents:.2f})" for k in kinds]
        cells += [_ci(p, r) if r != s.policy else "" for r in refs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _per_kind(scores: Sequence[PolicyScore], refs: list[str], kinds: list[str]) -> str:
    """Each folder apart: the paired difference against the first reference."""
    if not refs:
        return ""
    ref = refs[0]
    out = [f"\nPer folder, Δ top-1 against `{_name(ref)}` on the same photos (95 % CI):\n\n"]
    head = ["policy", *kinds]
    out += ["| " + " | ".join(head) + " |\n", "|---" * len(head) + "|\n"]
    for s in scores:
        if s.policy == ref:
            continue
        cells = [f"`{_name(s.policy)}`"] + [_ci(s.kinds[k], ref) for k in kinds]
        out.append("| " + " | ".join(cells) + " |\n")
    return "".join(out)


def write_cascade_report(
    report: dict[str, Any],
    plain: Sequence[PolicyScore],
    gated: Sequence[PolicyScore],
    path: Path,
) -> None:
    kinds: list[str] = report["folders"]
    refs = [report["baseline"], *report["references"]]
    costs = ", ".join(
        f"one view of `{m}` = {c['ratio']:.2f} views of `{report['model']}` ({c['source']})"
        for m, c in report["view_cost"].items()
    )
    md = [
        f"# Cascades of `{report['model']}` with {', '.join(report['stage_models']) or 'no'} "
        f"later-stage model(s)\n\n",
        f"Thresholds and temperatures fitted on {report['fit_images']} photos; every number "
        f"below is on the other {report['test_images']} (test half), pooled and per folder "
        f"(per-folder cells: top-1 % (view-eq/img)). Compute in view-equivalents of "
        f"`{report['model']}`: {costs or 'one model'}.\n\n",
        "## Gated policies chosen on the fit half, per budget\n\n",
        _table(gated, refs, kinds),
        _per_kind(gated, refs[1:] or refs, kinds),
        "\n## Every plain config and reference, every model\n\n",
        _table(plain, refs, kinds),
        "\n![top-1 against compute](cascades.png)\n",
    ]
    if report.get("policy_written"):
        w = report["policy_written"]
        md.append(
            f"\n`views=auto` now serves `{w['spec']}` (fit half {_pct(w['fit_top1'])} % at "
            f"{w['fit_view_equivalents']:.2f} view-eq; test half {_pct(w['top1'])} % at "
            f"{w['view_equivalents']:.2f}).\n"
        )
    path.write_text("".join(md))


def plot_cascades(
    plain: Sequence[PolicyScore], gated: Sequence[PolicyScore], path: Path, model: str
) -> None:
    """Test-half top-1 against view-equivalents of the requested model: each model's plain
    configs in its colour, gated policies and cascades as diamonds, the Pareto front of all
    of them joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    models = list(dict.fromkeys(p.model for p in plain if p.model != "staged"))
    colours = {m: MODEL_COLOURS[i % len(MODEL_COLOURS)] for i, m in enumerate(models)}
    colours["staged"] = "tab:red"
    seen: set[str] = set()
    for p in plain:
        label = None if p.model in seen else p.model
        seen.add(p.model)
        ax.plot(p.pooled.view_equivalents, 100 * p.pooled.top1, "o", color=colours[p.model],
                label=label)  # fmt: skip
        ax.annotate(_name(p.policy), (p.pooled.view_equivalents, 100 * p.pooled.top1),
                    fontsize=6, textcoords="offset points", xytext=(4, 3))  # fmt: skip
    for n, g in enumerate(gated):
        colour = "tab:green" if g.model == "cascade" else "tab:orange"
        label = f"gated ({g.model}), chosen on the fit half" if g.model not in seen else None
        seen.add(g.model)
        ax.plot(g.pooled.view_equivalents, 100 * g.pooled.top1, "D", color=colour, label=label)
        ax.annotate(f"{_name(g.policy)} ({100 * g.pooled.escalated:.0f} % on)",
                    (g.pooled.view_equivalents, 100 * g.pooled.top1), fontsize=6, color=colour,
                    textcoords="offset points", xytext=(4, -10 if n % 2 else 5))  # fmt: skip
    points = sorted((s.pooled.view_equivalents, 100 * s.pooled.top1) for s in [*plain, *gated])
    front, best = [], -1.0
    for x, y in points:  # cheapest first: a point is on the front when nothing cheaper beats it
        if y > best:
            front.append((x, y))
            best = y
    ax.plot([x for x, _ in front], [y for _, y in front], "-", color="tab:gray", alpha=0.6,
            label="Pareto front, every model and policy")  # fmt: skip
    ax.set_xlabel(f"view-equivalents of {model} per photo (test half)")
    ax.set_ylabel("top-1 % (test half, all folders)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
