"""What each capture costs end to end: ``shrink`` to 50% through symbolic tracing and through ``torch.export``.

    python -m benchmarks.capture_speed                  # every case below, 3 repeats each
    python -m benchmarks.capture_speed --repeats 5 --cases resnet50 llama2

Cases (random weights, no download):

- ``resnet50`` at 1x3x224x224 with ``capture="auto"`` (symbolic tracing takes it: the default path must stay as
  fast as before the export frontend), ``"fx"`` and ``"export"`` side by side;
- ``llama2``: a two-layer Llama-shaped ``LlamaForCausalLM`` (hidden 512, MLP 1376, 8 query and 4 key/value
  heads, vocabulary 4096, 64 tokens), which needs export; the goal is under 10 s on 2 cores;
- ``bert``, ``gpt2`` (two layers each, hidden 256) and ``yolov8n`` (its yaml, 1x3x320x320), through export;
- ``fasterrcnn_mobilenet`` (``fasterrcnn_mobilenet_v3_large_320_fpn``, one 320x320 image) and ``fasterrcnn_resnet50``
  (``fasterrcnn_resnet50_fpn``, one image resized to 320): neither capture takes a detector whole, so ``"auto"``
  ends in regions, after symbolic tracing and export have failed (their time counts too).

Each row gives the median wall time of ``--repeats`` runs (each on a fresh copy of the same model), the FLOPs
kept against the budget, and whether the user's class came back. Results go to ``capture_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import fxmorph
from benchmarks.common import build, example_input, median_time

logger = logging.getLogger("benchmarks.capture_speed")
HERE = Path(__file__).parent


def _llama() -> tuple[torch.nn.Module, tuple[Any, ...]]:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=128,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval(), (torch.randint(0, 4096, (1, 64)),)


def _bert() -> tuple[torch.nn.Module, tuple[Any, ...]]:
    import transformers

    config = transformers.BertConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4
    )
    return transformers.BertForSequenceClassification(config).eval(), (torch.randint(0, 4096, (1, 64)),)


def _gpt2() -> tuple[torch.nn.Module, tuple[Any, ...]]:
    import transformers

    config = transformers.GPT2Config(vocab_size=4096, n_embd=256, n_layer=2, n_head=4, n_positions=128)
    return transformers.GPT2LMHeadModel(config).eval(), (torch.randint(0, 4096, (1, 64)),)


def _yolo() -> tuple[torch.nn.Module, tuple[Any, ...]]:
    from ultralytics import YOLO  # a test-only dependency (AGPL-3.0): benchmarks may use it, the package never

    return YOLO("yolov8n.yaml").model.eval(), (torch.randn(1, 3, 320, 320),)


def _detector(name: str, **options: Any) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    import torchvision.models.detection as detection

    model = getattr(detection, name)(weights=None, weights_backbone=None, num_classes=91, **options)
    return model.eval(), ([torch.rand(3, 320, 320)],)


def _resnet50() -> tuple[torch.nn.Module, tuple[Any, ...]]:
    return build("resnet50"), (example_input("resnet50"),)


CASES: dict[str, tuple[Callable[[], tuple[torch.nn.Module, tuple[Any, ...]]], tuple[str, ...]]] = {
    "resnet50": (_resnet50, ("auto", "fx", "export")),
    "llama2": (_llama, ("auto",)),
    "bert": (_bert, ("auto",)),
    "gpt2": (_gpt2, ("auto",)),
    "yolov8n": (_yolo, ("auto",)),
    "fasterrcnn_mobilenet": (lambda: _detector("fasterrcnn_mobilenet_v3_large_320_fpn"), ("auto",)),
    "fasterrcnn_resnet50": (lambda: _detector("fasterrcnn_resnet50_fpn", min_size=320, max_size=320), ("auto",)),
}


def measure(name: str, repeats: int) -> list[dict[str, object]]:
    """One row per capture of case ``name``."""
    torch.manual_seed(0)
    model, inputs = CASES[name][0]()
    rows = []
    for capture in CASES[name][1]:

        def run(capture: str = capture) -> tuple[torch.nn.Module, Any]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a config left as it was is reported in the row
                return fxmorph.shrink(model, 0.5, inputs, capture=capture, return_report=True)

        seconds, (small, report) = median_time(run, repeats)
        rows.append({
            "case": name, "capture": capture, "used": report.capture, "seconds": round(seconds, 2),
            "flops_over_budget": round(report.flops_after / report.budget_flops, 4),
            "class_back": type(small) is type(model), "config": list(report.delivery.config),
        })  # fmt: skip
        logger.info("%s", rows[-1])
    return rows


def _record(rows: list[dict[str, object]], command: str) -> None:
    """Write ``rows`` to ``capture_speed.json``, keeping the recorded rows of the cases not run this time (each
    row says the command that measured it)."""
    path = HERE / "capture_speed.json"
    old = json.loads(path.read_text()) if path.exists() else {"rows": []}
    ran = {row["case"] for row in rows}
    for row in old["rows"]:
        row.setdefault("command", old.get("command", ""))
    rows = [r for r in old["rows"] if r["case"] not in ran] + [{**r, "command": command} for r in rows]
    path.write_text(json.dumps({"rows": sorted(rows, key=lambda r: list(CASES).index(str(r["case"])))}, indent=1))


def main(argv: list[str] | None = None) -> int:
    """Run the cases and write ``capture_speed.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = [row for name in args.cases for row in measure(name, args.repeats)]
    command = "python -m benchmarks.capture_speed " + " ".join(sys.argv[1:] if argv is None else argv)
    _record(rows, command.strip())
    for row in rows:
        logger.info(
            "%-9s %-7s via %-7s %6.2f s  FLOPs/budget %.4f  class back %s",
            row["case"], row["capture"], row["used"], row["seconds"], row["flops_over_budget"], row["class_back"],
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
