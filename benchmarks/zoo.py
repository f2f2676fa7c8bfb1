"""fxmorph against Torch-Pruning and uniform width scaling at equal FLOPs, side by side in one run.

    python -m benchmarks.zoo                         # the 14 models of issue 5 -> zoo.json, ZOO.md, zoo_latency.png
    python -m benchmarks.zoo --models resnet50,vgg11_bn --rounds 40
    python -m benchmarks.zoo --no-tp                 # without Torch-Pruning (it is optional)

Per model (1x3x224x224, ``weights=None``, eval) the variants are: the original; ``fxmorph.shrink`` to
50% of the FLOPs with default settings and with ``round_to=1``; uniform width scaling at the same
budget (fxmorph's ``width`` pass: one multiplier for every group); Torch-Pruning's magnitude pruner
with one uniform ratio, bisected so its FLOPs match fxmorph's default result, plain and with
``round_to=8``. Every variant is counted with PyTorch's FLOP counter, checked with ``fxmorph.check``
against the original's interface, exported to ONNX and compared with torch in onnxruntime, and all
exported variants of a model are timed interleaved in one onnxruntime run. Shrink wall times are the
median of ``--repeats`` calls; peak memory is the resident-set high-water mark above the process's
size before the call. With a CUDA GPU a torch CUDA latency column is added (optional).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fxmorph
from benchmarks import tp_adapter
from benchmarks.common import build, median_time, peak_memory
from benchmarks.zoo_report import write_markdown, write_plot
from fxmorph.meta import INTERFACE_KEY

logger = logging.getLogger("benchmarks.zoo")
HERE = Path(__file__).parent
MODELS = (
    "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "densenet121", "regnet_x_400mf",
    "shufflenet_v2_x1_0", "convnext_tiny", "vit_b_16", "googlenet", "squeezenet1_0", "vgg11_bn", "mnasnet1_0",
)  # fmt: skip


@dataclass
class Variant:
    """One model to compare: how it was made, how long that took, and what it is."""

    model: nn.Module
    how: str
    seconds: float = 0.0
    peak_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _fxmorph(model: nn.Module, x: torch.Tensor, repeats: int, **kw: Any) -> Variant:
    seconds, small = median_time(lambda: fxmorph.shrink(model, 0.5, x, **kw), repeats)
    peak, _ = peak_memory(lambda: fxmorph.shrink(model, 0.5, x, **kw))
    settings = ", ".join(f"{k}={v}" for k, v in kw.items()) or "defaults"
    return Variant(small, f"fxmorph.shrink 50% ({settings})", seconds, peak)


def _tp(model: nn.Module, x: torch.Tensor, target: int, round_to: int | None, repeats: int) -> Variant:
    ratio, pruned = tp_adapter.match_flops(model, x, target, round_to)
    seconds, _ = median_time(lambda: tp_adapter.prune(model, x, ratio, round_to), repeats)
    peak, _ = peak_memory(lambda: tp_adapter.prune(model, x, ratio, round_to))
    return Variant(pruned, f"Torch-Pruning magnitude, ratio {ratio:.4f}, round_to={round_to}", seconds, peak,
                   {"tp_ratio": ratio})  # fmt: skip


def make_variants(name: str, model: nn.Module, x: torch.Tensor, repeats: int, with_tp: bool) -> dict[str, Variant]:
    """Every variant of ``model`` at half its FLOPs (Torch-Pruning matched to fxmorph's default result)."""
    out = {"original": Variant(model, "torchvision, weights=None")}
    out["fxmorph"] = _fxmorph(model, x, repeats)
    out["fxmorph_r1"] = _fxmorph(model, x, repeats, round_to=1)
    out["uniform"] = _fxmorph(model, x, repeats, strategy="width")
    if with_tp:
        target = fxmorph.count_flops(out["fxmorph"].model, (x,))
        for key, round_to in (("tp", None), ("tp_r8", 8)):
            try:
                out[key] = _tp(model, x, target, round_to, repeats)
            except Exception as exc:  # report Torch-Pruning's failures as they are
                logger.warning("%s: Torch-Pruning round_to=%s failed: %s", name, round_to, exc)
                out[key] = Variant(model, f"Torch-Pruning round_to={round_to} FAILED", extra={"error": str(exc)})
    return out


def _check(model: nn.Module, x: torch.Tensor, expected: Any) -> str:
    try:
        fxmorph.check(model, (x,), expected_interface=expected)
    except Exception as exc:  # a failed check is a result here, not a crash
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return "ok"


def _export(model: nn.Module, x: torch.Tensor, path: Path) -> tuple[str, float | None]:
    try:
        result = fxmorph.export_onnx(model, (x,), path)
    except Exception as exc:  # parity failures are reported, not raised
        return f"{type(exc).__name__}: {str(exc)[:200]}", None
    return "ok", result.max_abs_diff


def _cuda_ms(model: nn.Module, x: torch.Tensor, runs: int = 50) -> float | None:
    if not torch.cuda.is_available():
        return None
    import copy

    m, xc = copy.deepcopy(model).cuda().eval(), x.cuda()
    times = []
    with torch.inference_mode():
        for i in range(runs + 10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            m(xc)
            end.record()
            torch.cuda.synchronize()
            if i >= 10:
                times.append(start.elapsed_time(end))
    return float(torch.tensor(times).median())


def evaluate(name: str, x: torch.Tensor, variants: dict[str, Variant], workdir: Path, rounds: int) -> dict:
    """Count, check, export and time every variant; one record for the model."""
    original = variants["original"].model
    expected = fxmorph.trace(original, (x,)).meta[INTERFACE_KEY]
    requested = fxmorph.count_flops(original, (x,)) * 0.5
    rows, paths = {}, {}
    for key, v in variants.items():
        row: dict[str, Any] = {"how": v.how, "shrink_s": v.seconds, "peak_mb": v.peak_bytes / 2**20, **v.extra}
        if "error" not in v.extra:
            row["flops"] = fxmorph.count_flops(v.model, (x,))
            row["params"] = fxmorph.count_params(v.model)
            row["budget_ratio"] = row["flops"] / requested
            row["check"] = _check(v.model, x, expected)
            row["onnx"], row["onnx_max_abs_diff"] = _export(v.model, x, workdir / f"{name}_{key}.onnx")
            row["cuda_ms"] = _cuda_ms(v.model, x)
            if row["onnx"] == "ok":
                paths[key] = workdir / f"{name}_{key}.onnx"
        rows[key] = row
    report = fxmorph.measure_latency(paths, x, rounds=rounds)
    for lat in report.models:
        rows[lat.name].update(latency_ms=lat.median_ms, p90_ms=lat.p90_ms, latency_ratio=lat.ratio)
    tps = [rows[k]["latency_ms"] for k in ("tp", "tp_r8") if "latency_ms" in rows.get(k, {})]
    for row in rows.values():
        if tps and "latency_ms" in row:
            row["vs_tp_best"] = row["latency_ms"] / min(tps)
    settings = {k: v for k, v in report.to_dict().items() if k != "models"}
    return {"model": name, "input": list(x.shape), "variants": rows, "latency_settings": settings}


def main(argv: list[str] | None = None) -> None:
    """Run the comparison and write the JSON, the markdown table and the plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rounds", type=int, default=30, help="interleaved onnxruntime rounds")
    parser.add_argument("--repeats", type=int, default=3, help="shrink calls per wall-time median")
    parser.add_argument("--no-tp", action="store_true", help="leave Torch-Pruning out")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fxmorph-bench"))
    parser.add_argument("--out", type=Path, default=HERE / "zoo.json")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    warnings.filterwarnings("ignore")
    with_tp = not args.no_tp and tp_adapter.available()
    if not args.no_tp and not with_tp:
        logger.warning("torch_pruning is not installed (pip install --no-deps torch-pruning): leaving it out")
    args.workdir.mkdir(parents=True, exist_ok=True)
    records = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model, x = build(name), torch.randn(1, 3, 224, 224)
        records.append(evaluate(name, x, make_variants(name, model, x, args.repeats, with_tp), args.workdir,
                                args.rounds))  # fmt: skip
        args.out.write_text(json.dumps(records, indent=1))
        logger.info("%s done", name)
    write_markdown(records, args.out.with_name("ZOO.md"), command="python -m benchmarks.zoo " + " ".join(argv))
    write_plot(records, args.out.with_name("zoo_latency.png"))


if __name__ == "__main__":
    main()
