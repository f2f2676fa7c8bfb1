"""The summary of the timm sweep (:mod:`benchmarks.timm_all`): the coverage table, the JSON and the histogram.

python -m benchmarks.timm_all --jsonl /tmp/timm_all.jsonl --summarize
    # -> benchmarks/TIMM_ALL.md, timm_all.json and timm_all_share.png, from a complete or partial sweep
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.timm_coverage import _share

__all__ = ["error_category", "reason_category", "summarize"]

ROW = dict[str, Any]
logger = logging.getLogger(__name__)


def reason_category(reason: str) -> str:
    """A pin reason without what names one model's parts: quoted qualified names (two dots or more: parameters,
    submodules) become '…' and numbers outside quotes N; quoted op and class names stay."""
    parts = re.split(r"('[^']*')", reason)  # odd items: the quoted ones
    for i, part in enumerate(parts):
        if i % 2:
            parts[i] = "'…'" if part.count(".") >= 2 else part
        else:
            parts[i] = re.sub(r"\d+", "N", part)
    return "".join(parts)[:140]


def error_category(row: ROW) -> str:
    """A short class of a failed row: why torch.export failed (auto capture tried it last), else the error."""
    text = row.get("export_error") or row.get("error", "")
    rule = re.match(r"AnalysisError: (channel rule '\w+' failed) on node .*?\)\): (\w+: .*?)\. This is a bug", text)
    if rule:  # the rule and the exception inside it, without the node
        return f"AnalysisError: {rule.group(1)}: {rule.group(2)}"[:160]
    text = re.sub(r"^cannot (capture|trace) \w+ with torch\.(export|fx): ", "", text)
    text = re.sub(r"(/[\w.\-]+)+\.py:\d+", "<file>", text)  # source locations
    text = re.sub(r"'[^']*'|`[^`]*`|\"[^\"]*\"", "'…'", text)
    return re.sub(r"\d+", "N", text)[:160]


def _pct(n: int, total: int) -> str:
    """``n (x%)`` of ``total``."""
    return f"{n} ({100 * n / total:.0f}%)" if total else str(n)


def summarize(rows: list[ROW], total: int, out: Path, limits: str = "") -> None:
    """Write TIMM_ALL.md, timm_all.json and (with matplotlib) timm_all_share.png to ``out``."""
    import timm

    rows = sorted(rows, key=lambda r: r["model"])
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:  # categories from the raw reasons, so that a change of reason_category needs no new sweep
        categories: Counter[str] = Counter()
        for reason, count in r["pins"].items():
            categories[reason_category(reason)] += count
        r["pin_categories"] = dict(categories.most_common())
    status = Counter("captured" if r["status"] == "ok" else r["status"] for r in rows)
    shares = [r["prunable_share"] for r in ok]
    bands = Counter(">= 95%" if s >= 0.95 else "50 - 95%" if s >= 0.5 else "< 50%" for s in shares)
    partial = "" if len(rows) >= total else " (a partial sweep, in a seeded random order: `--resume` continues it)"
    lines = [
        "# fxmorph over every timm architecture",
        "",
        f"Command: `python -m benchmarks.timm_all --jsonl /tmp/timm_all.jsonl` then `--summarize` (timm "
        f"{timm.__version__}, torch {torch.__version__}; analysis only, random weights, the smallest input each "
        "model runs on; raw rows in `timm_all.json`). Prunable FLOPs: the share of the model's FLOPs in ops "
        "that touch at least one free group. Each model ran in a forked child, niced, on a shared 2-core machine, "
        f"with {limits}; above that many fp32 parameters a model was built in bfloat16 without drawing random "
        "weights (fxmorph analyses it on fake tensors), above the second limit not at all.",
        "",
        f"**{len(rows)} of {total} architectures done**{partial}.",
        "",
        f"- analysed: {_pct(len(ok), len(rows))}: by torch.fx {sum(r['capture'] == 'fx' for r in ok)}, by "
        f"torch.export {sum(r['capture'] == 'export' for r in ok)}",
    ]
    for what, n in status.most_common():
        if what != "captured":
            lines.append(f"- {what}: {_pct(n, len(rows))}")
    in_bands = (f"{band}: {_pct(bands[band], len(ok))}" for band in (">= 95%", "50 - 95%", "< 50%"))
    lines.append("- prunable FLOPs of the analysed: " + ", ".join(in_bands))
    if shares:
        sides = Counter(r["input"][-1] for r in ok).most_common(3)
        at_default = sum(r["input"] == r["default_input"] for r in ok)
        lines.append(f"- median prunable share {100 * sorted(shares)[len(shares) // 2]:.1f}%; input sides "
                     f"{', '.join(f'{s} ({n} models)' for s, n in sides)}; {at_default} analysed at their "
                     "default size (no smaller one ran)")  # fmt: skip
        seconds = sorted(r["total_s"] for r in rows)
        lines.append(f"- time per model (build, input search, analysis): median {seconds[len(seconds) // 2]:.0f} s, "
                     f"total {sum(seconds) / 3600:.1f} h")  # fmt: skip
    models_by: dict[str, list[str]] = defaultdict(list)
    groups_by: Counter[str] = Counter()
    for r in ok:
        for category, count in r["pin_categories"].items():
            models_by[category].append(r["model"])
            groups_by[category] += count
    lines += ["", "## Pin reasons (groups with parameters, besides the model output)", "",
              "| reason | models | groups | e.g. |", "|---|---|---|---|"]  # fmt: skip
    for category, models in sorted(models_by.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        lines.append(f"| {_cell(category)} | {len(models)} | {groups_by[category]} | {', '.join(models[:3])} |")
    failed = [r for r in rows if r["status"] != "ok"]
    by_error: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in failed:
        by_error[(r["status"], error_category(r))].append(r["model"])
    lines += ["", "## Not analysed, by error", "", "| status | error (export's where both captures failed) | "
              "models | which |", "|---|---|---|---|"]  # fmt: skip
    for (what, category), models in sorted(by_error.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        lines.append(f"| {what} | {_cell(category)} | {len(models)} | {', '.join(models[:6])} |")
    crashes = [r for r in rows if r["status"] == "crash" and r.get("traceback")]
    bugs = [r for r in failed if "This is a bug in fxmorph" in r.get("error", "")]
    if crashes or bugs:
        lines += ["", "## Bugs in fxmorph: raw exceptions (not fxmorph.errors types), AnalysisErrors that say so", ""]
        lines += [f"- {r['model']}: `{r['error'][:200]}` at `{_where(r['traceback'])}`" for r in crashes]
        lines += [f"- {r['model']}: `{error_category(r)}`" for r in bugs]
    lines += ["", "## Every model", "", "| model | input | capture | params (M) | groups (free) | prunable FLOPs | "
              "time (s) | pin reasons (groups) or error |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        size = "x".join(map(str, r.get("input", [])[1:])) or "-"
        params = f"{r['params'] / 1e6:.1f}" if "params" in r else "-"
        if r["status"] == "ok":
            detail = "; ".join(f"{c} ({n})" for c, n in r["pin_categories"].items())
            lines.append(f"| {r['model']} | {size} | {r['capture']} | {params} | {r['groups']} ({r['free_groups']}) "
                         f"| {_share(r)} | {r['total_s']:.0f} | {_cell(detail)} |")  # fmt: skip
        else:
            lines.append(f"| {r['model']} | {size} | {r['status']} | {params} | - | - | {r['total_s']:.0f} | "
                         f"{_cell(r.get('error', ''))} |")  # fmt: skip
    (out / "TIMM_ALL.md").write_text("\n".join(lines) + "\n")
    (out / "timm_all.json").write_text(json.dumps({"done": len(rows), "total": total, "rows": rows}, indent=1) + "\n")
    _plot(shares, out / "timm_all_share.png", len(rows), total)


def _cell(text: str, width: int = 250) -> str:
    """``text`` fit for a markdown table cell: no pipes or newlines, at most ``width`` characters."""
    return text.replace("|", "\\|").replace("\n", " ")[:width]


def _where(tb: list[str]) -> str:
    """The last ``File ..., line ..., in ...`` of a traceback tail, shortened to the package path."""
    frames = [line.strip() for line in tb if line.strip().startswith("File ")]
    return re.sub(r'File ".*?/(fxmorph|timm|torch)/', r'File "\1/', frames[-1]) if frames else ""


def _plot(shares: list[float], path: Path, done: int, total: int) -> None:
    """A histogram of the prunable shares (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist([100 * s for s in shares], bins=[*range(0, 95, 5), 95, 99, 100.001], color="tab:blue")
    ax.set_xlabel("prunable FLOPs share (%)")
    ax.set_ylabel("timm architectures")
    ax.set_yscale("log")
    ax.set_title(f"fxmorph analysis over timm: {len(shares)} analysed ({done} of {total} done)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
