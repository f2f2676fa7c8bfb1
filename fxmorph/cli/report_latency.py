"""The latency-budget parts of ``fxmorph-export``'s report: each round's prediction and measurement, and a plot of
latency against FLOPs for the original, the latency-budget result and a FLOPs-budget cut to the same FLOPs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["markdown_section", "plot_latency_flops", "terminal_line"]


def _points(data: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(label, GFLOPs, measured ms) of every model the plot shows: the original, the result and, where measured,
    the FLOPs-budget cut (its latency from the interleaved measurement of all three)."""
    lat, budget = data["latency"], data["latency_budget"]
    points = [
        ("original", data["flops"]["before"] / 1e9, lat["models"]["original"]["median_ms"]),
        ("latency budget", data["flops"]["after"] / 1e9, lat["models"]["shrunk"]["median_ms"]),
    ]
    if "flops_budget" in lat["models"] and "flops_budget" in budget:
        points.append(
            ("FLOPs budget", budget["flops_budget"]["flops"] / 1e9, lat["models"]["flops_budget"]["median_ms"])
        )
    return points


def plot_latency_flops(data: dict[str, Any], path: Path) -> Path:
    """Measured latency against FLOPs; the budget as a dashed line."""
    from fxmorph.cli.report_files import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    for (label, flops, ms), color in zip(_points(data), ("#555555", "#d62728", "#1f77b4"), strict=False):
        ax.scatter([flops], [ms], s=70, color=color, label=f"{label}: {ms:.2f} ms at {flops:.3g} GFLOPs", zorder=3)
    scale = data["latency"]["models"]["original"]["median_ms"] / data["latency_budget"]["original_ms"]
    ax.axhline(data["latency_budget"]["budget_ms"] * scale, ls="--", color="#d62728", lw=1, label="latency budget")
    ax.set_xlabel("GFLOPs")
    ax.set_ylabel("onnxruntime latency, median ms")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"{data['model']}: latency against FLOPs", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_section(data: dict[str, Any]) -> list[str]:
    """The ``## Latency budget`` section: every round, and the plot."""
    budget = data.get("latency_budget")
    if not budget:
        return []
    lines = [
        "## Latency budget",
        "",
        f"Budget {data['budget']['latency']} = {budget['budget_ms']:.3f} ms of the original's "
        f"{budget['original_ms']:.3f} ms on {budget['runtime']}. The latency model (tables of the model's kernels, "
        f"built or read from the cache in {budget['profile_seconds']:.1f} s) predicted "
        f"{budget['predicted_original_ms']:.3f} ms for the original and was scaled to its measured time; each round "
        "cut to the budget as predicted, then measured the result beside the original (the ratio of interleaved "
        "runs).",
        "",
        "| round | predicted ms | measured ms | FLOPs | parameters | |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for k, r in enumerate(budget["rounds"], 1):
        mark = "returned" if k == budget["chosen_round"] else ""
        lines.append(
            f"| {k} | {r['predicted_ms']:.3f} | {r['measured_ms']:.3f} | {r['flops'] / 1e9:.3f} G | "
            f"{r['params'] / 1e6:.3f} M | {mark} |"
        )
    if data["latency"]["measured"]:
        lines += ["", "![Latency against FLOPs](latency_flops.png)"]
    return [*lines, ""]


def terminal_line(data: dict[str, Any]) -> str | None:
    """One line on the latency budget for the terminal summary."""
    budget = data.get("latency_budget")
    if not budget:
        return None
    rounds = len(budget["rounds"])
    return (
        f"latency budget {data['budget']['latency']} = {budget['budget_ms']:.3f} ms: measured "
        f"{budget['measured_ms']:.3f} ms after {rounds} round(s) ({budget['runtime']})"
    )
