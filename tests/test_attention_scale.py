"""The default softmax scale of ``F.scaled_dot_product_attention`` when pruning narrows every head.

Without ``scale=``, attention divides its logits by ``sqrt(E)`` of the head width ``E`` it is given. Where the
heads stay whole (a class that states its head count and sizes each head from the stream's width, as CaiT's class
attention; a bias of fixed width per head, as CoAtNet's), pruning narrows the heads instead, and the shrunk
model's default would read the new width. The analysis folds the factor ``sqrt(E_new / E_old)`` into the
parameters that make the query (the rows of its Linear, only the query's rows of a packed projection, or the
affine weight and bias of a qk norm), so the result computes the original logits and the class's own forward,
which passes no scale, computes it too: the result comes back as its class. Where nothing can take the factor
(a qk norm without affine parameters), the original scale is passed as ``scale=`` and the result is a GraphModule.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxmorph
from fxmorph.analysis import ArgSlot, ScaleKeptRows
from fxmorph.analysis.plan import GroupPlan, WidthPlan
from tests.conftest import check_prune, written_back

DIM, HEADS = 16, 2


class HeadsFromWidth(nn.Module):
    """Self-attention with ``HEADS`` heads, each ``C // HEADS`` wide for the stream's width ``C``, under the default
    softmax scale. ``kind``: ``"separate"`` q, k, v Linears; ``"packed"`` one Linear whose rows hold each head's
    q, k and v in a row (CoAtNet's layout); ``"qk_norm"`` a LayerNorm on each head of q and k; ``"bare_norm"`` the
    same without affine parameters (nothing to fold the scale into)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.heads = kind, HEADS
        self.inp, self.proj, self.head = nn.Linear(6, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, 3)
        if kind == "packed":
            self.qkv = nn.Linear(DIM, 3 * DIM)
        else:
            self.q, self.k, self.v = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        norm = kind.endswith("norm")
        affine = kind == "qk_norm"
        self.q_norm = nn.LayerNorm(DIM // HEADS, elementwise_affine=affine) if norm else nn.Identity()
        self.k_norm = nn.LayerNorm(DIM // HEADS, elementwise_affine=affine) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        b, n, c = x.shape
        if self.kind == "packed":
            qkv = self.qkv(x).reshape(b, n, self.heads, 3, c // self.heads).permute(3, 0, 2, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            heads = (f(x).reshape(b, n, self.heads, c // self.heads) for f in (self.q, self.k, self.v))
            q, k, v = (t.transpose(1, 2) for t in heads)
        y = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.head(x + self.proj(y.transpose(1, 2).reshape(b, n, c)))


def _model(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = HeadsFromWidth(kind).eval()
    if kind == "qk_norm":  # LayerNorm starts at weight 1, bias 0: random values show a wrong or missing factor
        for norm in (model.q_norm, model.k_norm):
            nn.init.uniform_(norm.weight, 0.5, 1.5)
            nn.init.normal_(norm.bias)
    return model, torch.randn(2, 5, 6)


def _scale_rewrites(cg: fxmorph.ChannelGraph) -> list[object]:
    return [rw.location for rw in cg.rewrites if rw.node.startswith("scaled_dot_product_attention")]


def _half_plan(cg: fxmorph.ChannelGraph) -> WidthPlan:
    """Every other channel of every free group (the head width among them)."""
    return WidthPlan({g.id: GroupPlan(tuple(range(0, g.size, 2))) for g in cg.free_groups})


_FOLDS = {
    "separate": (("q.weight", "q.bias"), tuple(range(DIM))),
    # each head's rows are its q, k and v in a row: the q rows are the first third of each head's block
    "packed": (("qkv.weight", "qkv.bias"), (*range(8), *range(24, 32))),
    "qk_norm": (("q_norm.weight", "q_norm.bias"), tuple(range(DIM // HEADS))),
}


@pytest.mark.parametrize("kind", list(_FOLDS))
def test_narrower_heads_keep_the_default_scale_and_the_class(kind: str) -> None:
    model, x = _model(kind)
    cg = fxmorph.analyze(model, (x,))
    (fold,) = _scale_rewrites(cg)
    assert isinstance(fold, ScaleKeptRows) and (fold.paths, fold.rows) == _FOLDS[kind]
    # the mask oracle compares with the original's logits; written back == graph, bit for bit
    small = check_prune(cg, _half_plan(cg), x)
    written = written_back(cg, small)
    assert type(written) is HeadsFromWidth
    width = written.qkv.out_features // 3 if kind == "packed" else written.k.out_features
    assert width == DIM // 2, "the heads kept their count and lost half their width"
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxmorph.WriteBackWarning)
        shrunk = fxmorph.shrink(model, 0.5, (x,), round_to=1)
    assert type(shrunk) is HeadsFromWidth


def test_a_norm_without_affine_parameters_keeps_the_explicit_scale() -> None:
    """Nothing after the norm can take the factor (the norm undoes any before it): ``scale=`` keeps the logits,
    and the result is the graph, since the class passes no scale."""
    model, x = _model("bare_norm")
    cg = fxmorph.analyze(model, (x,))
    assert _scale_rewrites(cg) == [ArgSlot("scale")]
    check_prune(cg, _half_plan(cg), x)
    with pytest.warns(fxmorph.WriteBackWarning, match="scaled_dot_product_attention"):
        shrunk = fxmorph.shrink(model, 0.5, (x,), round_to=1)
    assert isinstance(shrunk, fx.GraphModule)
