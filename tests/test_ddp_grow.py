"""A data-driven grow step inside DistributedDataParallel training: both ranks end identical."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fxmorph

STEPS = 10


def _mlp() -> nn.Sequential:
    """A BatchNorm-ReLU group (dual init) and a GELU group (GradMax init)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(),
                         nn.Linear(16, 4))  # fmt: skip


def _batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(16, 20, generator=generator), torch.randint(0, 4, (16,), generator=generator)


def _train(ddp: nn.Module, reg: fxmorph.FlopsRegularizer, data: torch.Generator) -> None:
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)  # a fresh optimizer for each architecture
    for _ in range(STEPS):
        xb, yb = _batch(data)
        opt.zero_grad()
        (F.cross_entropy(ddp(xb), yb) + reg()).backward()
        opt.step()


def _run(rank: int, out: Path) -> None:
    model = _mlp()  # same seed, same initial weights on every rank
    x = torch.randn(1, 20)
    local = torch.Generator().manual_seed(100 + rank)  # each rank trains on its own batches
    _train(nn.parallel.DistributedDataParallel(model), fxmorph.FlopsRegularizer(model, (x,), strength=1e-4), local)
    # The grow step: BatchNorm running statistics are rank-local under DDP, and growth reads them (its
    # probes run in eval mode), so broadcast them first; then the same seed and the same data everywhere.
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    shared = torch.Generator().manual_seed(7)
    grow_data = [_batch(shared) for _ in range(2)]
    big, report = fxmorph.grow(model, (x,), budget_flops="160%", data=grow_data, loss_fn=F.cross_entropy,
                               round_to=2, seed=0, return_report=True)  # fmt: skip
    grown = {k: v.detach().clone() for k, v in big.state_dict().items()}
    _train(nn.parallel.DistributedDataParallel(big), fxmorph.FlopsRegularizer(big, (x,), strength=1e-4), local)
    rows = [(r["id"], r["before"], r["after"], r["init"]) for r in report.groups]
    final = {k: v.detach().clone() for k, v in big.named_parameters()}
    flops = (report.flops_before, report.flops_after)
    torch.save({"grown": grown, "final": final, "rows": rows, "flops": flops}, out / f"rank{rank}.pt")


def _worker(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    # a rendezvous file in the test's fresh folder: no TCP port to race other processes for
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        _run(rank, Path(out))
    finally:
        dist.destroy_process_group()


def test_ddp_grow_two_ranks_end_identical(tmp_path: Path) -> None:
    """2 CPU processes (gloo): train under DDP with the regularizer, grow by gradient (same seed and data
    on both ranks, BatchNorm statistics broadcast first), re-wrap in DDP, train on.

    Asserts: both ranks chose the same growth (groups, widths, inits) and built bit-identical grown models
    (parameters and buffers, compared *before* the new DDP wrapper would broadcast rank 0's state), and
    end with identical parameters; the model grew, with both inits, and training moved the new weights."""
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert a["rows"] == b["rows"] and a["flops"] == b["flops"]
    for key in ("grown", "final"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    before, after = a["flops"]
    assert before < after <= 1.6 * before
    assert {init for *_, init in a["rows"]} == {"dual", "gradmax"}, a["rows"]
    assert all(new > old for _, old, new, _ in a["rows"])
    assert any(not torch.equal(a["grown"][k], a["final"][k]) for k in a["final"])
