"""What giving the result back as the user's class costs: write-back plus its proof against a whole shrink.

    python -m benchmarks.write_back                          # resnet50, vit_b_16, convnext_tiny, maxvit_t, swin_t
    python -m benchmarks.write_back --models resnet50 --repeats 5
    python -m benchmarks.write_back --zoo                    # every torchvision model: class kept? outputs equal?

For each model at 1x3x224x224: ``fxmorph.shrink(model, 0.5, (x,))`` with ``keep_class=False`` (the graph
only) and with the default (the user's class), interleaved, medians of ``--repeats`` runs each; and
write-back alone (``fxmorph.surgery.write_back.write_back``: the deep copy around the result's modules, the
re-traces that set width attributes, the structural proof), median of as many runs. Results go to
``benchmarks/write_back.json``; the issue's bar is write-back at most half of a shrink.

``--zoo`` shrinks every torchvision classification, video and segmentation model but the huge ones (the test
suite's small inputs, ``tests/zoo.py``) to 50% and writes the result back: it lists any model that falls back
to a GraphModule, with the reason, and checks the written-back outputs equal the graph's bit for bit
(``benchmarks/write_back_zoo.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import fxmorph
from benchmarks.common import build, example_input
from fxmorph.surgery.write_back import write_back

logger = logging.getLogger("benchmarks.write_back")
HERE = Path(__file__).parent
MODELS = ["resnet50", "vit_b_16", "convnext_tiny", "maxvit_t", "swin_t"]


def _seconds(run: object) -> float:
    start = time.perf_counter()
    run()  # type: ignore[operator]
    return time.perf_counter() - start


def measure(name: str, repeats: int) -> dict[str, object]:
    """Interleaved medians of shrink without and with write-back, and of write-back alone."""
    model, x = build(name), example_input(name)
    graph_runs, class_runs, write_runs = [], [], []
    result = fxmorph.shrink(model, 0.5, (x,), keep_class=False)
    for _ in range(repeats):
        graph_runs.append(_seconds(lambda: fxmorph.shrink(model, 0.5, (x,), keep_class=False)))
        class_runs.append(_seconds(lambda: fxmorph.shrink(model, 0.5, (x,))))
        write_runs.append(_seconds(lambda: write_back(model, result)))
    written = write_back(model, result)
    row = {
        "model": name,
        "input": list(x.shape),
        "shrink_graph_s": statistics.median(graph_runs),
        "shrink_class_s": statistics.median(class_runs),
        "write_back_s": statistics.median(write_runs),
        "traces": written.traces,
        "attributes_set": len(written.attributes),
    }
    row["write_back_share_of_shrink"] = row["write_back_s"] / row["shrink_graph_s"]
    return row


def sweep_zoo() -> list[dict[str, object]]:
    """Every non-huge torchvision model: shrunk to 50%, written back, outputs compared with the graph's."""
    import torch
    from torch.utils._pytree import tree_leaves

    from fxmorph.errors import WriteBackError
    from tests.zoo import CLASSIFICATION, HUGE, SEGMENTATION, VIDEO
    from tests.zoo import build as build_small
    from tests.zoo import example_input as small_input

    rows: list[dict[str, object]] = []
    for name in [n for n in CLASSIFICATION + VIDEO + SEGMENTATION if n not in HUGE]:
        model, x = build_small(name), small_input(name)
        graph = fxmorph.shrink(model, 0.5, (x,), keep_class=False)
        try:
            written = write_back(model, graph)
        except WriteBackError as exc:
            rows.append({"model": name, "kept_class": False, "reason": str(exc)})
            logger.info("%-30s falls back: %s", name, exc)
            continue
        with torch.no_grad():
            pairs = zip(tree_leaves(graph(x)), tree_leaves(written.model(x)), strict=True)
            same = all(torch.equal(a, b) for a, b in pairs)
        rows.append({"model": name, "kept_class": type(written.model) is type(model), "outputs_equal": same,
                     "attributes_set": len(written.attributes)})  # fmt: skip
        logger.info("%-30s %s, outputs equal: %s", name, type(written.model).__name__, same)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--zoo", action="store_true", help="sweep the whole zoo instead of timing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fxmorph").setLevel(logging.WARNING)
    if args.zoo:
        rows = sweep_zoo()
        (HERE / "write_back_zoo.json").write_text(json.dumps(rows, indent=2) + "\n")
        kept = sum(1 for r in rows if r["kept_class"] and r.get("outputs_equal"))
        logger.info("%d of %d models given back as their own class with equal outputs", kept, len(rows))
        return
    rows = []
    for name in args.models:
        row = measure(name, args.repeats)
        rows.append(row)
        logger.info(
            "%-14s shrink %6.2f s (graph) %6.2f s (class)  write-back %5.2f s = %4.1f%% of a shrink, %d traces",
            name,
            row["shrink_graph_s"],
            row["shrink_class_s"],
            row["write_back_s"],
            100 * row["write_back_share_of_shrink"],
            row["traces"],
        )
    (HERE / "write_back.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
