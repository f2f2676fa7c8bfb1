"""The markdown table and the latency plot of ``python -m benchmarks.zoo`` (from its JSON records)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LABELS = {
    "original": "original",
    "fxmorph": "fxmorph (default)",
    "fxmorph_r1": "fxmorph round_to=1",
    "uniform": "uniform width",
    "tp": "Torch-Pruning",
    "tp_r8": "Torch-Pruning round_to=8",
}


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _row(name: str, key: str, v: dict[str, Any], cuda: bool) -> str:
    if "error" in v:
        return f"| {name} | {LABELS[key]} | failed: {v['error'][:80]} |" + " |" * (11 + cuda)
    ok = lambda s: "ok" if s == "ok" else f"**no**: {s[:60]}"  # noqa: E731
    made = key != "original"
    return (
        f"| {name} | {LABELS[key]} | {v['flops'] / 1e9:.3f} | {v['params'] / 1e6:.2f} | "
        f"{_fmt(v['budget_ratio'] if made else None, '.4f')} | "
        f"{_fmt(v['shrink_s'] if made else None, '.2f')} | {_fmt(v['peak_mb'] if made else None, '.0f')} | "
        f"{_fmt(v.get('latency_ms'), '.2f')} | {_fmt(v.get('p90_ms'), '.2f')} | "
        f"{_fmt(v.get('latency_ratio'), '.3f')} | {_fmt(v.get('vs_tp_best'), '.3f')} | "
        f"{ok(v['check'])} | {ok(v['onnx'])} |" + (f" {_fmt(v.get('cuda_ms'), '.3f')} |" if cuda else "")
    )


def write_markdown(records: list[dict[str, Any]], path: Path, command: str) -> None:
    """One table row per (model, variant), the settings of the latency runs above it."""
    settings = records[0]["latency_settings"] if records else {}
    cuda = any(v.get("cuda_ms") is not None for r in records for v in r["variants"].values())
    lines = [
        "# fxmorph against Torch-Pruning and uniform width scaling (issue 5)",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"onnxruntime {settings.get('ort_version')} {settings.get('provider')}, {settings.get('threads')} intra-op "
        f"threads, {settings.get('graph_optimization')}, {settings.get('rounds')} interleaved rounds per model, "
        f"on {settings.get('machine')}. Budget: 50% of the original FLOPs (PyTorch's counter); Torch-Pruning's "
        "ratio is bisected to match fxmorph's default result. `budget` is achieved/requested FLOPs; `vs TP` is "
        "the latency over Torch-Pruning's best variant of the same model.",
        "",
        "| model | variant | GFLOPs | M params | budget | shrink s | peak MB | ms median | ms p90 | ratio | vs TP "
        "| check | ONNX parity |" + (" CUDA ms |" if cuda else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if cuda else ""),
    ]
    for r in records:
        for key, v in r["variants"].items():
            lines.append(_row(r["model"], key, v, cuda))
    path.write_text("\n".join(lines) + "\n")


def write_plot(records: list[dict[str, Any]], path: Path) -> None:
    """Latency after/before per model, one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = [k for k in LABELS if k != "original"]
    names = [r["model"] for r in records]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(names)), 4.5))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        values = [r["variants"].get(key, {}).get("latency_ratio", np.nan) for r in records]
        ax.bar(np.arange(len(names)) + i * width - 0.4 + width / 2, values, width, label=LABELS[key])
    ax.axhline(0.5, color="grey", lw=0.8, ls="--", label="FLOPs ratio (0.5)")
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("onnxruntime latency, after / before")
    ax.set_title("Latency at half the FLOPs (lower is better)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
