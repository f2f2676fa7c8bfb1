"""Analysis coverage of every timm architecture (issue 16): a benchmark, not a test.

    python -m benchmarks.timm_all --jsonl /tmp/timm_all.jsonl           # the sweep (hours on 2 cores)
    python -m benchmarks.timm_all --jsonl /tmp/timm_all.jsonl --resume  # continue where it stopped
    python -m benchmarks.timm_all --jsonl /tmp/timm_all.jsonl --summarize
        # -> benchmarks/TIMM_ALL.md, timm_all.json and timm_all_share.png, from a complete or partial sweep
    python -m benchmarks.timm_all --jsonl /tmp/few.jsonl --models resnet18 vit_tiny_patch16_224

For every name of ``timm.list_models()``: the model with random weights (``pretrained=False``, default
classes), at the smallest square input it runs on (its ``img_size`` set to it where the constructor takes one,
a multiple of its patch size), found by running it on the meta device, and otherwise its default input size;
then ``fxmorph.analyze(model, (x,), capture="auto")``, analysis only. Recorded per model, one JSON line each:
the capture used (fx, export, or why both failed), groups (free / total), the share of the FLOPs in ops that
touch a free group (:meth:`fxmorph.CostModel.prunable_share`), the reasons that pin groups holding parameters
(as :func:`benchmarks.timm_coverage.pin_reasons` counts them; the summary groups them by
:func:`benchmarks.timm_all_report.reason_category`), parameters, times.

Each model runs in a forked child with a timeout (in CPU seconds) and a memory guard (RSS polled, and
``RLIMIT_DATA``), so a hang or a crash costs only that model. Models above ``--max-fp32-params`` parameters
are built in bfloat16 (fxmorph propagates shapes on fake tensors above 1 GiB of weights), above
``--max-params`` not at all (recorded as skipped); the parameter count comes from a build on the meta device.
The default order is a seeded shuffle, so a partial sweep is a fair sample of the whole.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import os
import random
import resource
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fxmorph
from benchmarks.timm_all_report import summarize
from benchmarks.timm_coverage import pin_reasons

logger = logging.getLogger("benchmarks.timm_all")
HERE = Path(__file__).parent
SIDES = (32, 64, 96, 128, 160, 192, 224, 256)  # candidate input sides, rounded up to a multiple of the patch
ROW = dict[str, Any]


@dataclass(frozen=True)
class Limits:
    """What one model may cost: CPU seconds (the machine is shared: wall time says little), wall seconds (for a
    hang that spends no CPU), resident memory, and parameters (fp32 builds, then bfloat16 ones)."""

    timeout_s: float = 120.0
    wall_timeout_s: float = 600.0
    mem_gib: float = 8.0
    max_fp32_params: float = 600e6
    max_params: float = 2.5e9


# -- one model, in the child -------------------------------------------------------------------------------
def _meta_model(name: str, **kwargs: Any) -> nn.Module:
    """The timm model ``name`` built on the meta device (no memory for its tensors), in eval mode."""
    import timm

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs).eval()


def _runs(model: nn.Module, shape: tuple[int, ...]) -> bool:
    """True when a meta tensor of ``(1, *shape)`` runs through ``model`` (shapes only, no compute)."""
    try:
        with torch.no_grad():
            model(torch.empty(1, *shape, device="meta"))
    except Exception:  # any failure means: not this size
        return False
    return True


def _patch_size(model: nn.Module) -> int:
    """The patch size of a patch-embedding model (the first ``patch_size`` attribute found), else 1."""
    for m in model.modules():
        size = getattr(m, "patch_size", None)
        if isinstance(size, int | tuple | list) and size:
            return int(max(size) if isinstance(size, tuple | list) else size)
    return 1


def candidate_sides(default: int, patch: int) -> list[int]:
    """Square sides to try, smallest first: :data:`SIDES` rounded up to a multiple of ``patch``, at least two
    patches, below ``default``."""
    rounded = {-(-s // patch) * patch for s in SIDES}
    return sorted(s for s in rounded if 2 * patch <= s < default)


def choose_input(name: str, meta: nn.Module, default: tuple[int, ...]) -> tuple[tuple[int, ...], dict[str, Any]]:
    """The smallest input shape (C, H, W) that ``name`` runs on, with the ``img_size`` option it needs; the
    default shape without options when no smaller one runs on the meta device."""
    takes_img_size = True
    for side in candidate_sides(min(default[1:]), _patch_size(meta)):
        shape = (default[0], side, side)
        if takes_img_size:
            try:
                sized = _meta_model(name, img_size=side)
            except TypeError as exc:  # the constructor has no img_size: the input alone varies
                takes_img_size = "img_size" not in str(exc)
                sized = None
            except Exception:  # the architecture refuses this size
                continue
            if sized is not None:
                if _runs(sized, shape):
                    return shape, {"img_size": side}
                continue
        if _runs(meta, shape):
            return shape, {}
    return default, {}


class _NoRandomFill(TorchDispatchMode):
    """Skips the in-place random fills of weight initialisers (the tensors keep the memory they were given)."""

    SKIPPED = frozenset(getattr(torch.ops.aten, op) for op in ("uniform_", "normal_", "erfinv_", "bernoulli_"))

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        """The op's output, or its first argument unchanged for a skipped random fill."""
        if func.overloadpacket in self.SKIPPED:
            return args[0]
        return func(*args, **(kwargs or {}))


def build(name: str, kwargs: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """The timm model ``name`` with random weights (seed 0) in ``dtype``, in eval mode.

    A bfloat16 model (a huge one) is built in bfloat16 from the start and without drawing random weights, which
    take minutes for a billion parameters on two cores: fxmorph analyses it on fake tensors (above 1 GiB of
    weights), where values play no part.
    """
    import timm

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with _NoRandomFill() if dtype != torch.float32 else contextlib.nullcontext():
            return timm.create_model(name, pretrained=False, **kwargs).eval()
    finally:
        torch.set_default_dtype(previous)


def analyse(name: str, limits: Limits, stage: Callable[[str], None], row: ROW) -> ROW:
    """The JSON row of ``name``: build it, choose its input, analyse it (see the module docstring). ``row`` is
    filled as facts are known, so that it tells how far a model that fails got."""
    import timm

    start = time.perf_counter()
    stage("meta build")
    default = tuple(timm.models.get_pretrained_cfg(name).input_size)
    try:
        meta = _meta_model(name)
    except Exception as exc:  # no meta build: the real build below says whether the model builds at all
        meta, row["meta_error"] = None, _first_line(exc)
    if meta is not None:
        row["params"] = sum(p.numel() for p in meta.parameters())
        if row["params"] > limits.max_params:
            row.update(status="skipped", error=f"more than {limits.max_params / 1e9:g} G parameters")
            return row
        stage("input search")
        shape, kwargs = choose_input(name, meta, default)
        del meta
    else:
        shape, kwargs = default, {}
    dtype = torch.bfloat16 if row.get("params", 0) > limits.max_fp32_params else torch.float32
    row.update(default_input=list(default), input=list(shape), kwargs=kwargs, dtype=str(dtype).split(".")[1])
    for attempt in range(2):
        stage("build")
        model = build(name, kwargs, dtype)
        row["params"] = sum(p.numel() for p in model.parameters())
        row["build_s"] = round(time.perf_counter() - start, 2)
        x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        stage("analyze")
        t0 = time.perf_counter()
        try:
            cg = fxmorph.analyze(model, example_inputs=(x,), capture="auto")
            break
        except fxmorph.TraceError as exc:  # a small input that the meta run allowed but the real one refuses
            if attempt or shape == default or "do not run through" not in str(exc):
                raise
            del model
            shape, kwargs, row["input_fallback"] = default, {}, True
            row["input"], row["kwargs"] = list(shape), kwargs
    stage("cost model")
    cost = fxmorph.CostModel(cg)
    reasons = pin_reasons(cg)
    row.update(
        status="ok",
        capture=cg.gm.meta.get("fxmorph.capture", "?"),
        groups=len(cg.groups),
        free_groups=len(cg.free_groups),
        prunable_share=round(cost.prunable_share(), 5),
        gflops=round(cost.flops() / 1e9, 4),
        analyze_s=round(time.perf_counter() - t0, 2),
        pins={reason[:200]: count for reason, count in reasons.most_common()},
    )
    return row


def _first_line(exc: BaseException) -> str:
    """``Type: first line`` of ``exc``, at most 300 characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _child(name: str, limits: Limits, conn: Connection) -> None:
    """Entry of the forked child: analyse ``name`` and send its row (stages first, as they start)."""
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    with open("/proc/self/status") as f:
        data = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData"))
    resource.setrlimit(resource.RLIMIT_DATA, (data + int(limits.mem_gib * 2**30), hard))
    current = ["start"]

    def stage(what: str) -> None:
        current[0] = what
        conn.send(("stage", what))

    row: ROW = {"model": name}
    try:
        analyse(name, limits, stage, row)
    except MemoryError:
        row.update(status="oom", stage=current[0], error="MemoryError")
    except Exception as exc:
        row.update(status="failed", stage=current[0], error=_first_line(exc))
        if isinstance(exc, fxmorph.FxmorphError):
            export = next((ln.strip() for ln in str(exc).splitlines() if ln.startswith("cannot capture")), None)
            row.update(error_type=type(exc).__name__, export_error=export and export[:300])
        else:  # a raw exception: timm's (build) or fxmorph's own (analyze: a crash to report)
            row["status"] = "crash" if current[0] in ("analyze", "cost model") else "build failed"
            row["traceback"] = traceback.format_exc().strip().splitlines()[-6:]
        if "can't allocate memory" in str(exc) or "not enough memory" in str(exc):  # RLIMIT_DATA reached
            row["status"] = "oom"
    conn.send(("row", row))
    conn.close()


# -- the sweep, in the parent ------------------------------------------------------------------------------
def _rss(pid: int) -> int:
    """Resident bytes of process ``pid`` (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS")), 0)
    except OSError:
        return 0


def _cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of process ``pid`` so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15


def run_one(name: str, limits: Limits) -> ROW:
    """The row of ``name`` from a forked child, or a timeout / memory / crash row when the child fails."""
    ctx = multiprocessing.get_context("fork")  # the child inherits torch, timm and fxmorph already imported
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(name, limits, send), daemon=True)
    start, stage, peak, cpu, row = time.monotonic(), "start", 0, 0.0, None
    proc.start()
    send.close()
    while row is None:
        if receive.poll(0.2):
            try:
                kind, value = receive.recv()
            except EOFError:  # the child died without a row
                break
            if kind == "row":
                row = value
            stage = value if kind == "stage" else stage
            continue
        rss, cpu = _rss(proc.pid), max(cpu, _cpu_seconds(proc.pid))
        peak = max(peak, rss)
        elapsed = time.monotonic() - start
        if rss > limits.mem_gib * 2**30 or cpu > limits.timeout_s or elapsed > limits.wall_timeout_s:
            os.kill(proc.pid, signal.SIGKILL)
            status = "oom" if rss > limits.mem_gib * 2**30 else "timeout"
            what = f"RSS {rss / 2**30:.1f} GiB" if status == "oom" else f"{cpu:.0f} CPU s, {elapsed:.0f} s"
            row = {"model": name, "status": status, "stage": stage, "error": f"{what} during {stage}"}
        elif not proc.is_alive() and not receive.poll(0):
            break
    proc.join(10)
    if row is None:
        row = {"model": name, "status": "crash", "stage": stage, "error": f"child exited ({proc.exitcode})"}
    row["total_s"] = round(time.monotonic() - start, 2)
    row["cpu_s"] = round(cpu, 1)  # as last polled: a child that finishes between polls did a little more
    row["peak_rss_mib"] = round(peak / 2**20)
    return row


def read_rows(jsonl: Path) -> list[ROW]:
    """The rows of ``jsonl``, the last one of each model (a partial last line, from a killed run, is skipped)."""
    rows: dict[str, ROW] = {}
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[row["model"]] = row
    return list(rows.values())


def sweep(names: Iterable[str], jsonl: Path, limits: Limits) -> None:
    """Analyse every model of ``names`` in turn, appending its row to ``jsonl`` as soon as it is known."""
    names = list(names)
    with jsonl.open("a") as out:
        for i, name in enumerate(names, 1):
            row = run_one(name, limits)
            out.write(json.dumps(row) + "\n")
            out.flush()
            if row["status"] == "ok":
                what = f"{row['capture']:6s} {100 * row['prunable_share']:5.1f}%  {row['free_groups']}/{row['groups']}"
            else:
                what = f"{row['status']}: {row.get('error', '')[:150]}"
            logger.info("[%d/%d] %-40s %s (%.0f s)", i, len(names), name, what, row["total_s"])


# -- the summary --------------------------------------------------------------------------------------------
def main() -> None:
    """Run the sweep (fresh or resumed) or summarise its JSONL; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jsonl", type=Path, default=HERE / "timm_all.jsonl", help="rows, one JSON line a model")
    parser.add_argument("--resume", action="store_true", help="skip the models the JSONL already holds")
    parser.add_argument("--retry", nargs="*", default=(), help="with --resume: run again the models of these "
                        "statuses (failed, crash, build failed, timeout, oom, skipped)")  # fmt: skip
    parser.add_argument("--summarize", action="store_true", help="write the summary of the JSONL, run nothing")
    parser.add_argument("--models", nargs="*", help="these names only (default: every timm.list_models())")
    parser.add_argument("--order", choices=("shuffled", "alpha"), default="shuffled")
    parser.add_argument("--out", type=Path, default=HERE, help="where --summarize writes")
    parser.add_argument("--timeout", type=float, default=Limits.timeout_s, help="CPU seconds per model")
    parser.add_argument("--wall-timeout", type=float, default=Limits.wall_timeout_s, help="seconds per model")
    parser.add_argument("--mem-gib", type=float, default=Limits.mem_gib, help="resident memory per model")
    parser.add_argument("--max-fp32-params", type=float, default=Limits.max_fp32_params)
    parser.add_argument("--max-params", type=float, default=Limits.max_params, help="above: skipped")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("fxmorph").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    import timm

    sys.path.insert(0, str(HERE.parent))
    names = args.models or timm.list_models()
    if args.summarize:
        bounds = (f"a timeout of {args.timeout:g} CPU s ({args.wall_timeout:g} s), a memory guard of "
                  f"{args.mem_gib:g} GiB, at most {args.max_fp32_params / 1e6:g} M / {args.max_params / 1e6:g} M "
                  "parameters")  # fmt: skip
        summarize(read_rows(args.jsonl), len(timm.list_models()), args.out, bounds)
        return
    if args.jsonl.exists() and args.jsonl.stat().st_size and not args.resume:
        parser.error(f"{args.jsonl} exists: pass --resume to continue it, or remove it to start over")
    if args.order == "shuffled":
        random.Random(0).shuffle(names)
    done = {r["model"] for r in read_rows(args.jsonl) if r["status"] not in args.retry} if args.resume else set()
    todo = [n for n in names if n not in done]
    limits = Limits(args.timeout, args.wall_timeout, args.mem_gib, args.max_fp32_params, args.max_params)
    logger.info("%d models to analyse (%d done before); %s; pid %d", len(todo), len(done), asdict(limits), os.getpid())
    sweep(todo, args.jsonl, limits)


if __name__ == "__main__":
    main()
