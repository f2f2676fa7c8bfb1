"""Prunable share of the FLOPs over a sample of timm architectures (issue 18).

    python -m benchmarks.timm_coverage --baseline benchmarks/timm_coverage_4afe31d.json
        # -> benchmarks/timm_coverage.json and TIMM_COVERAGE.md, with the shares of main at 4afe31d beside
    python -m benchmarks.timm_coverage --models dla34 dpn68  # a subset (printed, files untouched)

For every model of ``tests/timm_zoo.py`` (random weights, the test-suite's small input): groups
(free/total), the share of the model's FLOPs in ops that touch at least one free group (the prunable
share, :meth:`fxmorph.CostModel.prunable_share`), and the distinct reasons that pin groups holding
parameters (besides the model output), each with the number of such groups. Analysis only: no
surgery, no shrinking (the tests do those). Every architecture of ``timm.list_models()``, in a sweep that
takes hours: :mod:`benchmarks.timm_all`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

import fxmorph

logger = logging.getLogger("benchmarks.timm_coverage")
HERE = Path(__file__).parent


def coverage(name: str) -> dict:
    """Groups, prunable FLOPs share and pin reasons of the timm model ``name`` (analysis only)."""
    sys.path.insert(0, str(HERE.parent))
    from tests.timm_zoo import build, example_input

    model, x = build(name), example_input(name)
    start = time.perf_counter()
    try:
        cg = fxmorph.analyze(model, (x,))
    except fxmorph.TraceError as exc:  # reported in the table, with the line fx stopped at
        cause = str(exc).splitlines()
        where = next((line.strip() for line in cause if "offending line" in line), "")
        return {"model": name, "input": list(x.shape), "error": f"{cause[0]} {where}"}
    seconds = time.perf_counter() - start
    cost = fxmorph.CostModel(cg)
    reasons = pin_reasons(cg)
    return {"model": name, "input": list(x.shape), "groups": len(cg.groups), "free_groups": len(cg.free_groups),
            "prunable_share": cost.prunable_share(), "gflops": cost.flops() / 1e9, "analyze_s": seconds,
            "pins": [f"{reason} ({count})" for reason, count in reasons.most_common()]}  # fmt: skip


def pin_reasons(cg: fxmorph.ChannelGraph) -> Counter[str]:
    """The distinct reasons that pin groups holding parameters (besides the model output), each with the number
    of such groups it pins (``benchmarks.timm_all`` counts them the same way)."""
    reasons: Counter[str] = Counter()
    for g in cg.groups:
        if g.params:
            reasons.update({p.reason for p in g.pins} - {"model output"})
    return reasons


def table(rows: list[dict], baseline: dict[str, dict] | None = None) -> str:
    """The markdown table of ``rows``, with the prunable share of each model in ``baseline`` beside."""
    before = "| before " if baseline else ""
    lines = [
        f"| model | input | groups (free) | prunable FLOPs {before}| pin reasons besides the output "
        "(number of groups with parameters) |",
        "|---|---|---|---|" + ("---|" if baseline else "") + "---|",
    ]
    for r in rows:
        old = (baseline or {}).get(r["model"], {})
        was = f"| {_share(old)} " if baseline else ""
        if "error" in r:
            lines.append(f"| {r['model']} | {'x'.join(map(str, r['input']))} | - | - {was}| {r['error'][:300]} |")
            continue
        lines.append(f"| {r['model']} | {'x'.join(map(str, r['input']))} | {r['groups']} ({r['free_groups']}) "
                     f"| {_share(r)} {was}| {'; '.join(r['pins'])[:300]} |")  # fmt: skip
    return "\n".join(lines)


def _share(row: dict) -> str:
    """The prunable share of ``row`` as a percentage, or ``-`` when the model was not analysed."""
    return f"{100 * row['prunable_share']:.1f}%" if "prunable_share" in row else "-"


_HEADER = """# Prunable FLOPs over a timm sample

Command: `python -m benchmarks.timm_coverage --baseline benchmarks/timm_coverage_4afe31d.json` (timm
{timm}, torch {torch}; analysis only, random weights, the inputs of `tests/timm_zoo.py`; raw numbers in
`timm_coverage.json`). "Prunable FLOPs" is the share of the model's FLOPs in ops that touch at least one
free group; "before" is the same measure on main at 4afe31d, before functional norms had rules (issue
18). `tests/test_timm.py` asserts a lower bound per model (95% but for the explained exceptions) and
runs the mask oracle on each.

{above} of {traced} models that torch.fx traces reach at least 95%. The others, as `tests/timm_zoo.py`
explains them:

{exceptions}

"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="model names (default: every model of tests/timm_zoo.py)")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--baseline", type=Path, help="an earlier timm_coverage.json, shown as a 'before' column")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fxmorph").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    import timm

    sys.path.insert(0, str(HERE.parent))
    from tests.timm_zoo import MODELS

    rows = []
    for name in args.models or list(MODELS):
        rows.append(coverage(name))
        r = rows[-1]
        if "error" in r:
            logger.info("%-30s %s", name, r["error"][:200])
            continue
        logger.info("%-30s %5.1f%%  %d/%d free  %.1f s", name, 100 * r["prunable_share"], r["free_groups"],
                    r["groups"], r["analyze_s"])  # fmt: skip
    baseline = {r["model"]: r for r in json.loads(args.baseline.read_text())} if args.baseline else None
    if args.models:
        print(table(rows, baseline))
        return
    (args.out / "timm_coverage.json").write_text(json.dumps(rows, indent=2) + "\n")
    above = sum(r.get("prunable_share", 0) >= 0.95 for r in rows)
    traced = sum("error" not in r for r in rows)
    from tests.timm_zoo import EXCEPTIONS, UNTRACEABLE

    notes = [f"- {name}: {why}." for name, (_, why) in EXCEPTIONS.items()]
    notes.append(f"- {', '.join(UNTRACEABLE)}: torch.fx cannot trace them (fxmorph refuses them with a "
                 "TraceError naming the line; the table shows it).")  # fmt: skip
    header = _HEADER.format(timm=timm.__version__, torch=torch.__version__, above=above, traced=traced,
                            exceptions="\n".join(notes))  # fmt: skip
    (args.out / "TIMM_COVERAGE.md").write_text(header + table(rows, baseline) + "\n")


if __name__ == "__main__":
    main()
