"""Analyse a torchvision model, halve every free channel group by L1 magnitude, and compare.

Run: python examples/analyze_and_resize.py [model_name]
"""

from __future__ import annotations

import sys
import time

import torch
import torchvision

import fxmorph
from fxmorph.plan import GroupPlan, WidthPlan


def l1_keep(cg: fxmorph.ChannelGraph, group: fxmorph.Group, keep: int) -> tuple[int, ...]:
    """Indices of the ``keep`` channels of ``group`` with the largest producer L1 norm."""
    score = torch.zeros(group.size, dtype=torch.float64)
    for member in group.producers:
        tensor = cg.gm.get_parameter(member.name) if "running" not in member.name else None
        if tensor is None or tensor.dim() < 2:
            continue
        per_channel = tensor.detach().abs().double().transpose(0, member.dim).reshape(tensor.shape[member.dim], -1)
        score += per_channel.sum(1).reshape(-1, group.size).sum(0) if per_channel.shape[0] != group.size else per_channel.sum(1)
    return tuple(sorted(torch.argsort(score, descending=True)[:keep].tolist()))


def main(name: str = "resnet50") -> None:
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    start = time.perf_counter()
    cg = fxmorph.analyze(model, (x,))
    print(cg.explain())
    plan = WidthPlan({g.id: GroupPlan(l1_keep(cg, g, max(1, g.size // 2))) for g in cg.free_groups})
    small = fxmorph.resize(cg, plan)
    fxmorph.check(small, (x,))
    elapsed = time.perf_counter() - start
    before, after = fxmorph.count_flops(model, (x,)), fxmorph.count_flops(small, (x,))
    predicted = fxmorph.CostModel(cg).flops({g: p.width for g, p in plan.items()})
    print(f"\n{name}: analyse + resize + check in {elapsed:.2f} s")
    print(f"FLOPs  {before / 1e9:8.3f} G -> {after / 1e9:8.3f} G  (cost model predicted {predicted / 1e9:.3f} G)")
    print(f"params {fxmorph.count_params(model) / 1e6:8.2f} M -> {fxmorph.count_params(small) / 1e6:8.2f} M")
    with torch.no_grad():
        print(f"output shape {tuple(model(x).shape)} -> {tuple(small(x).shape)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
