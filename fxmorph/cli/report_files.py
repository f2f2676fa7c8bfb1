"""Render the report of ``fxmorph-export``: markdown, plots (matplotlib, Agg backend) and the terminal table.

Everything here reads the JSON-ready report dictionary that ``fxmorph-export`` writes to
``report.json``, so a report can be re-rendered from that file alone::

    data = json.loads(Path("out/report.json").read_text())
    fxmorph.cli.report_files.write_all(data, Path("out"))
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fxmorph.cli.report_latency import markdown_section, plot_latency_flops, terminal_line

__all__ = ["plot_flops", "plot_latency", "plot_widths", "render_markdown", "terminal_table", "write_all"]

logger = logging.getLogger(__name__)

_BEFORE, _AFTER, _PINNED = "#9ecae1", "#08519c", "#bdbdbd"


def _si(value: float, unit: str = "") -> str:
    """``3.6e9`` -> ``"3.648 G"``."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.3f} {prefix}{unit}".rstrip()
    return f"{value:.0f} {unit}".rstrip()


def _pct(ratio: float | None) -> str:
    """``0.5`` -> ``"50.0%"`` (``"-"`` for None)."""
    return "-" if ratio is None else f"{100 * ratio:.1f}%"


def _diff(value: float | None) -> str:
    """A parity difference for the tables (``"unchecked"`` when the file was not checked)."""
    return "unchecked" if value is None else f"{value:.2e}"


def _requested(data: dict[str, Any]) -> str:
    """The budgets as the user gave them: FLOPs (with their count), latency, or both."""
    budget = data["budget"]
    parts = []
    if budget["requested"] is not None:
        parts.append(f"{budget['requested']} ({_si(budget['flops'], 'FLOPs')})")
    if budget.get("latency") is not None:
        parts.append(f"latency {budget['latency']}")
    return " and ".join(parts)


def _latency_settings(lat: dict[str, Any]) -> str:
    """One line with every setting the latency was measured under."""
    s = lat["settings"]
    return (
        f"onnxruntime {s['ort_version']} {s['provider']}, {s['threads']} intra-op thread(s), "
        f"{s['inter_op_threads']} inter-op, {s['graph_optimization']}, spinning "
        f"{'on' if s['allow_spinning'] else 'off'}, {s['warmup']} warm-up run(s), {s['rounds']} interleaved "
        f"round(s) x {s['repeats_per_round']}"
    )


# ------------------------------------------------------------------------------------------------ plots


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    # Files only, with or without a display; force: even where a backend was chosen already.
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_widths(data: dict[str, Any], path: Path, *, per_row: int = 40) -> Path:
    """Bars of every channel group's width before and after, ``per_row`` groups to a panel; pinned in grey."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    rows = data["groups"]["rows"]
    chunks = [rows[i : i + per_row] for i in range(0, len(rows), per_row)] or [[]]
    width = max(6.0, 0.26 * min(len(rows), per_row) + 2)
    fig, axes = plt.subplots(
        len(chunks), 1, figsize=(width, 2.9 * len(chunks) + 0.9), layout="constrained", squeeze=False
    )
    # A log scale once widths span more than 50x: on a linear one, the narrow groups' bars would not show.
    log = bool(rows) and max(r["before"] for r in rows) / max(min(r["before"] for r in rows), 1) > 50
    for ax, chunk in zip(axes[:, 0], chunks, strict=True):
        xs = list(range(len(chunk)))
        ax.bar([x - 0.2 for x in xs], [r["before"] for r in chunk], width=0.4, color=_BEFORE)
        ax.bar(
            [x + 0.2 for x in xs],
            [r["after"] for r in chunk],
            width=0.4,
            color=[_PINNED if r["pinned"] else _AFTER for r in chunk],
        )
        ax.set_xticks(xs)
        ax.set_xticklabels([str(r["id"]) for r in chunk], rotation=90 if len(chunk) > 20 else 0, fontsize=8)
        ax.set_xlim(-0.7, (per_row if len(chunks) > 1 else max(len(chunk), 1)) - 0.3)  # equal bar widths
        ax.set_ylabel("channels")
        if log:
            ax.set_yscale("log")
    axes[-1, 0].set_xlabel("channel group")
    handles = [Patch(color=_BEFORE, label="before"), Patch(color=_AFTER, label="after")]
    if any(r["pinned"] for r in rows):
        handles.append(Patch(color=_PINNED, label="pinned (cannot change)"))
    axes[0, 0].legend(handles=handles, loc="upper left", fontsize=8)
    changed = data["groups"]["changed"]
    fig.suptitle(f"{data['model']}: width per channel group ({changed} of {len(rows)} changed)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency(data: dict[str, Any], path: Path) -> Path:
    """Median latency of both ONNX files (whiskers from the minimum to the 90th percentile)."""
    plt = _pyplot()
    lat = data["latency"]
    names = ["original", "shrunk"]
    models = [lat["models"][n] for n in names]
    medians = [m["median_ms"] for m in models]
    lower = [m["median_ms"] - m["min_ms"] for m in models]
    upper = [m["p90_ms"] - m["median_ms"] for m in models]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    bars = ax.bar(names, medians, color=[_BEFORE, _AFTER], yerr=[lower, upper], capsize=6)
    for bar, value in zip(bars, medians, strict=True):
        ax.annotate(
            f"{value:.2f} ms",
            (bar.get_x() + bar.get_width() / 2, value / 2),
            ha="center",
            va="center",
            color="black" if bar.get_facecolor()[0] > 0.5 else "white",  # dark text on the light bar, light on the dark
            fontsize=11,
        )
    s = lat["settings"]
    speed = f"{lat['speedup']:.2f}x faster" if lat.get("speedup") else ""
    ax.set_title(f"{data['model']}: onnxruntime latency, median ({speed})")
    ax.set_ylabel("milliseconds per run (whiskers: min to p90)")
    ax.set_xlabel(
        f"ORT {s['ort_version']}, {s['threads']} thread(s), {s['rounds']} interleaved rounds, "
        f"input {'x'.join(str(d) for d in data['input_shape'])}",
        fontsize=8,
    )
    ax.set_ylim(0, max(m["p90_ms"] for m in models) * 1.2)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_flops(data: dict[str, Any], path: Path) -> Path:
    """FLOPs and parameters before and after, side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 4.0), layout="constrained")
    for ax, key, scale, unit in ((axes[0], "flops", 1e9, "GFLOPs"), (axes[1], "params", 1e6, "M parameters")):
        values = [data[key]["before"] / scale, data[key]["after"] / scale]
        bars = ax.bar(["original", "shrunk"], values, color=[_BEFORE, _AFTER])
        for bar, value in zip(bars, values, strict=True):
            ax.annotate(f"{value:.3g}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom")
        ax.set_ylabel(unit)
        ax.set_ylim(0, max(values) * 1.15 if max(values) > 0 else 1)
        ax.set_title(f"{unit.split()[-1]}: {_pct(data[key]['ratio'])} of the original")
    shape = "x".join(str(d) for d in data["input_shape"])
    fig.suptitle(f"{data['model']} at input {shape}, budget {_requested(data)}")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ text


def render_markdown(data: dict[str, Any]) -> str:
    """The report as markdown (``report.md``), linking the plots next to it."""
    sections = (_md_summary, markdown_section, _md_latency, _md_onnx, _md_widths, _md_pins, _md_passes_and_versions)
    return "\n".join(line for section in sections for line in section(data))


def _md_summary(data: dict[str, Any]) -> list[str]:
    """Title, command, settings and the before/after table."""
    shape = "x".join(str(d) for d in data["input_shape"])
    lat = data["latency"]
    lines = [
        f"# fxmorph-export report: {data['model']}",
        "",
        f"`{data['command']['line']}`",
        "",
        f"Input {shape}; budget {_requested(data)}; "
        f"criterion `{data['settings'].get('criterion')}`, strategy `{data['settings'].get('strategy')}`, "
        f"widths: {data['settings'].get('rounding', data['settings'].get('round_to'))}; "
        + (
            f"weights from `{data['checkpoint']['path']}`."
            if data.get("checkpoint")
            else "random weights (no checkpoint)."
        ),
        "",
        "## Summary",
        "",
        "| | original | shrunk | shrunk / original |",
        "|---|---:|---:|---:|",
    ]
    for label, key in (("FLOPs", "flops"), ("MACs", "macs"), ("Parameters", "params")):
        d = data[key]
        lines.append(f"| {label} | {_si(d['before'])} | {_si(d['after'])} | {_pct(d['ratio'])} |")
    if lat["measured"]:
        lines.append(
            f"| Latency (median, onnxruntime) | {lat['before_ms']:.3f} ms | {lat['after_ms']:.3f} ms | "
            f"{_pct(lat['ratio'])} ({lat['speedup']:.2f}x faster) |"
        )
    else:
        lines.append(f"| Latency | not measured ({lat['reason']}) | | |")
    lines += ["", "![FLOPs and parameters](flops.png)", ""]
    return lines


def _md_latency(data: dict[str, Any]) -> list[str]:
    """The onnxruntime timings, per model."""
    shape = "x".join(str(d) for d in data["input_shape"])
    lat = data["latency"]
    lines = ["## Latency", ""]
    if lat["measured"]:
        s = lat["settings"]
        lines += [
            f"Measured in onnxruntime on the exported files, on one input of shape {shape}: "
            f"{_latency_settings(lat)}. The models run interleaved (round *r* runs every model once, in an "
            "order rotated by *r*) so drift of the machine hits both alike; *paired* is the median over rounds "
            "of shrunk time / original time in the same round.",
            "",
            f"Machine: {s['machine']}.",
            "",
            "| model | median ms | p90 ms | min ms | mean ms | ratio | paired ratio |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, m in lat["models"].items():
            lines.append(
                f"| {name} | {m['median_ms']:.3f} | {m['p90_ms']:.3f} | {m['min_ms']:.3f} | {m['mean_ms']:.3f} | "
                f"{m['ratio']:.3f} | {m['paired_ratio']:.3f} |"
            )
        lines += ["", "![Latency](latency.png)", ""]
    else:
        lines += [f"Not measured ({lat['reason']}).", ""]
    return lines


def _md_onnx(data: dict[str, Any]) -> list[str]:
    """The exported files and their parity with torch."""
    lines = [
        "## ONNX files",
        "",
        "Each file was run in onnxruntime (CPU) on the example input and, with its dynamic batch axis, on "
        "one more row, and compared with torch.",
        "",
        "| file | exporter | opset | size | max abs diff | max rel diff | export s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for info in data["onnx"].values():
        lines.append(
            f"| `{info['file']}` | {info['exporter']} | {info['opset']} | {_si(info['bytes'], 'B')} | "
            f"{_diff(info['max_abs_diff'])} | {_diff(info['max_rel_diff'])} | {info['export_seconds']:.1f} |"
        )
    lines.append("")
    return lines


def _md_widths(data: dict[str, Any]) -> list[str]:
    """Every channel group's width before and after."""
    groups = data["groups"]
    lines = [
        "## Channel widths",
        "",
        f"{groups['total']} channel groups: {groups['free']} free, {groups['pinned']} pinned, "
        f"{groups['changed']} changed.",
        "",
        "![Width per group](widths.png)",
        "",
        "| group | made by | before | after | kept | pinned because |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for r in groups["rows"]:
        kept = _pct(r["after"] / r["before"]) if r["before"] else "-"
        lines.append(f"| {r['id']} | `{r['made_by']}` | {r['before']} | {r['after']} | {kept} | {r['pinned'] or ''} |")
    return lines


def _md_pins(data: dict[str, Any]) -> list[str]:
    """Why each pinned group kept its width, and the modules eval mode never runs."""
    lines = ["", "## Pinned groups", ""]
    if data["pins"]:
        lines += [
            f"- group {p['group']} (`{p['made_by']}`, {p['width']} channels): {p['reason']}" for p in data["pins"]
        ]
    else:
        lines.append("None.")
    if data.get("dropped_modules"):
        lines += [
            "",
            "Never run in eval mode, so not in the shrunk model: "
            + ", ".join(f"`{m}`" for m in data["dropped_modules"]),
        ]
    return lines


def _md_passes_and_versions(data: dict[str, Any]) -> list[str]:
    """The passes that ran, the library versions, the date."""
    lines = ["", "## Passes", "", "| pass | modified | seconds | note |", "|---|---|---:|---|"]
    for p in data.get("passes", []):
        lines.append(f"| {p['pass']} | {p['modified']} | {float(p['seconds']):.2f} | {p.get('note', '')} |")
    lines += ["", "## Versions", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in data["versions"].items()]
    lines += ["", f"Created {data['created']}.", ""]
    return lines


def terminal_table(data: dict[str, Any], out: Path | str) -> str:
    """The summary ``fxmorph-export`` prints at the end."""
    shape = "x".join(str(d) for d in data["input_shape"])
    lat = data["latency"]
    rows = [("", "original", "shrunk", "shrunk/orig")]
    for label, key in (("FLOPs", "flops"), ("MACs", "macs"), ("parameters", "params")):
        d = data[key]
        rows.append((label, _si(d["before"]), _si(d["after"]), _pct(d["ratio"])))
    if lat["measured"]:
        rows.append(
            (
                "latency (median)",
                f"{lat['before_ms']:.3f} ms",
                f"{lat['after_ms']:.3f} ms",
                f"{_pct(lat['ratio'])} ({lat['speedup']:.2f}x faster)",
            )
        )
    else:
        rows.append(("latency", "not measured", "not measured", lat["reason"]))
    onnx = data["onnx"]
    rows.append(
        (
            "ONNX max abs diff",
            _diff(onnx["original"]["max_abs_diff"]),
            _diff(onnx["shrunk"]["max_abs_diff"]),
            "vs torch, in onnxruntime",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    rule = "-" * (sum(widths) + 6)
    lines = [
        f"{data['model']}  input {shape}  budget {_requested(data)}",
        rule,
    ]
    for i, r in enumerate(rows):
        lines.append(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip())
        if i == 0:
            lines.append(rule)
    lines.append(rule)
    groups = data["groups"]
    lines.append(
        f"{groups['total']} channel groups ({groups['free']} free): {groups['changed']} changed, "
        f"{groups['pinned']} pinned (reasons in report.md)"
    )
    if lat["measured"]:
        lines.append(f"latency: {_latency_settings(lat)}")
    budget_line = terminal_line(data)
    if budget_line:
        lines.append(budget_line)
    lines.append(f"wrote {', '.join(data['files'].values())} to {out}")
    return "\n".join(lines)


def write_all(data: dict[str, Any], out: Path) -> dict[str, str]:
    """Write ``report.md`` and the plots into ``out``; returns what was written, by role, as file names
    relative to ``out`` (``report.json`` included, which the caller writes last)."""
    out = Path(out)
    files = {"original_onnx": "original.onnx", "shrunk_onnx": "shrunk.onnx", "report_json": "report.json"}
    files["report_md"] = "report.md"
    plot_widths(data, out / "widths.png")
    files["widths_plot"] = "widths.png"
    plot_flops(data, out / "flops.png")
    files["flops_plot"] = "flops.png"
    if data["latency"]["measured"]:
        plot_latency(data, out / "latency.png")
        files["latency_plot"] = "latency.png"
        if data.get("latency_budget"):
            plot_latency_flops(data, out / "latency_flops.png")
            files["latency_flops_plot"] = "latency_flops.png"
    if data.get("latency_budget") and "flops_budget" in data["onnx"]:
        files["flops_budget_onnx"] = "flops_budget.onnx"
    data = {**data, "files": files}
    (out / "report.md").write_text(render_markdown(data), encoding="utf-8")
    logger.info("wrote %s to %s", ", ".join(files.values()), out)
    return files
