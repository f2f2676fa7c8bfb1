"""Random small architectures for property tests (a helper module, not collected as tests).

An architecture is a plain, printable description (nested tuples and dicts) drawn by hypothesis while
tracking the channel count, so every drawn description builds a valid model; :func:`build` turns it
into a :class:`RandomNet` whose ``forward`` interprets the list of blocks. Blocks: conv-BN-ReLU
chains, residual adds with and without a 1x1 projection (bodies are themselves random blocks), concat
and nested concat of branches (optionally with the input itself, DenseNet style), ``torch.split``
with sizes or an int, ``chunk`` (also uneven), with the pieces concatenated, reversed, added,
multiplied or partly dropped, depthwise convolutions with and without a channel multiplier, grouped
convolutions, SE gates (convolution and linear versions), channel shuffle (view/transpose/view and
``nn.ChannelShuffle``), a ShuffleNetV2 unit, a module called twice, pooling, attention on tokens
(Linear qkv, reshape into heads, matmul-softmax-matmul or SDPA, projection, residual), intermediate
outputs (tuple or dict) and heads (1x1 conv, flatten into a Linear, global pool into a Linear, raw);
parameters used directly through ``matmul`` and ``F.linear``, functional norms (``F.batch_norm``,
``F.group_norm``, ``F.layer_norm``), a ``BatchNorm2d`` subclass with a forward of its own (timm's
norm-activation layers), and ``nn.TransformerEncoderLayer``.

Used by ``test_random_architectures.py`` (plans applied directly) and ``test_fuzz_budgets.py`` (the
public entry points with random budgets).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

__all__ = ["NEW_KINDS", "SETTINGS", "Spec", "architectures", "build", "thorough"]

Spec = tuple[str, dict[str, Any]]
MAX_DEPTH = 2  # nesting of residual / concat / split bodies
SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


def thorough(test: Any, examples: int, **strategies: st.SearchStrategy) -> Callable[[], None]:
    """The ``-m slow`` twin of the hypothesis test ``test``: the same property on the same strategies with
    ``examples`` derandomized examples (the default run draws fewer; each property's seed comes from its
    code, so both runs are reproducible)."""
    run = settings(max_examples=examples, **SETTINGS)(given(**strategies)(test.hypothesis.inner_test))

    @pytest.mark.slow
    def twin() -> None:
        run()

    twin.__doc__ = f"{examples} examples of the property of ``{test.__name__}`` (``-m slow``)."
    return twin


# -- blocks -----------------------------------------------------------------------------------------


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3, bn: bool = True, groups: int = 1, relu: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=not bn)
        self.bn = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


class Seq(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class Residual(nn.Module):
    def __init__(self, body: Seq, proj: nn.Module | None) -> None:
        super().__init__()
        self.body = body
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.proj is None else self.proj(x)
        return F.relu(self.body(x) + skip)


class Concat(nn.Module):
    def __init__(self, branches: list[Seq], identity: bool, nested: bool) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.identity = identity
        self.nested = nested

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [branch(x) for branch in self.branches]
        if self.identity:
            parts.insert(0, x)
        if self.nested:
            return torch.cat([torch.cat(parts[:2], dim=1), *parts[2:]], dim=1)
        return torch.cat(parts, dim=1)


class Split(nn.Module):
    """Split channels (``torch.split`` with sizes or an int, or ``chunk``), a body per piece, combine."""

    def __init__(self, mode: str, arg: Any, bodies: list[Seq], combine: str) -> None:
        super().__init__()
        self.mode, self.arg, self.combine = mode, arg, combine
        self.bodies = nn.ModuleList(bodies)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.chunk(self.arg, dim=1) if self.mode == "chunk" else torch.split(x, self.arg, dim=1)
        outs = [body(parts[i]) for i, body in enumerate(self.bodies)]
        if self.combine == "add":
            y = outs[0]
            for o in outs[1:]:
                y = y + o
            return y
        if self.combine == "mul":
            return outs[0] * torch.sigmoid(outs[1])
        if self.combine == "reverse":
            return torch.cat(outs[::-1], dim=1)
        if self.combine == "drop":
            return torch.cat(outs[:-1], dim=1) if len(outs) > 2 else outs[0]
        return torch.cat(outs, dim=1)


class Shuffle(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.size()
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's basic unit: chunk in two, transform one half, concatenate, shuffle."""

    def __init__(self, c: int) -> None:
        super().__init__()
        h = c // 2
        self.branch = nn.Sequential(
            nn.Conv2d(h, h, 1, bias=False),
            nn.BatchNorm2d(h),
            nn.ReLU(),
            nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False),
            nn.BatchNorm2d(h),
            nn.Conv2d(h, h, 1, bias=False),
            nn.BatchNorm2d(h),
            nn.ReLU(),
        )
        self.shuffle = Shuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return self.shuffle(torch.cat((x1, self.branch(x2)), dim=1))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, hidden: int, linear: bool) -> None:
        super().__init__()
        self.linear = linear
        if linear:
            self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, c)
        else:
            self.fc1, self.fc2 = nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear:
            s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
            return x * s[:, :, None, None]
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class Reused(nn.Module):
    """The same convolution called twice."""

    def __init__(self, c: int, residual: bool) -> None:
        super().__init__()
        self.shared = nn.Conv2d(c, c, 3, padding=1)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.shared(F.relu(self.shared(x)))
        return x + y if self.residual else F.relu(y)


class Attention(nn.Module):
    """Image to tokens, embed, pre-norm multi-head self-attention with a residual, back to an image."""

    def __init__(self, cin: int, heads: int, head_dim: int, ln: bool, sdpa: bool) -> None:
        super().__init__()
        d = heads * head_dim
        self.heads, self.scale, self.sdpa = heads, head_dim**-0.5, sdpa
        self.embed = nn.Linear(cin, d)
        self.ln = nn.LayerNorm(d) if ln else nn.Identity()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        t = self.embed(x.flatten(2).transpose(1, 2))
        b, length, d = t.shape
        qkv = self.qkv(self.ln(t)).reshape(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.sdpa:
            q, k, v = qkv.unbind(0)
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            q, k, v = qkv[0], qkv[1], qkv[2]
            y = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1) @ v
        t = t + self.proj(y.transpose(1, 2).reshape(b, length, d))
        return t.transpose(1, 2).reshape(n, d, h, w)


class ParamProduct(nn.Module):
    """A parameter used directly on the channels: ``x @ w`` (``w`` is ``[c, cout]``), ``F.linear(x, w, b)``
    (``[cout, c]``) on channels-last pixels, or ``w @ x`` on ``[n, c, h*w]`` (the parameter's first dim
    is the new channel dim)."""

    def __init__(self, c: int, cout: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        shape = (c, cout) if mode == "matmul" else (cout, c)
        self.w = nn.Parameter(torch.randn(shape) / c**0.5)
        self.b = nn.Parameter(torch.randn(cout) * 0.1) if mode == "linear" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if self.mode == "matmul":
            return F.relu(x.permute(0, 2, 3, 1) @ self.w).permute(0, 3, 1, 2)
        if self.mode == "linear":
            return F.relu(F.linear(x.permute(0, 2, 3, 1), self.w, self.b)).permute(0, 3, 1, 2)
        return F.relu(self.w @ x.flatten(2)).reshape(n, -1, h, w)


class FunctionalNorm(nn.Module):
    """A norm called through ``torch.nn.functional`` with parameters of its own (``batch_norm`` with
    running statistics, ``group_norm``, or ``layer_norm`` over channels-last pixels)."""

    def __init__(self, c: int, kind: str, groups: int) -> None:
        super().__init__()
        self.kind, self.groups = kind, groups
        self.weight = nn.Parameter(torch.empty(c).uniform_(0.5, 1.5))
        self.bias = nn.Parameter(torch.randn(c) * 0.5)
        if kind == "batch_norm":
            self.register_buffer("running_mean", torch.randn(c) * 0.5)
            self.register_buffer("running_var", torch.empty(c).uniform_(0.5, 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "batch_norm":
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, 1e-5)
        if self.kind == "group_norm":
            return F.group_norm(x, self.groups, self.weight, self.bias)
        c = x.shape[1]
        return F.layer_norm(x.permute(0, 2, 3, 1), (c,), self.weight, self.bias).permute(0, 3, 1, 2)


class BatchNormAct(nn.BatchNorm2d):
    """A norm-activation layer in timm's style: a ``BatchNorm2d`` subclass with a forward of its own that
    calls ``F.batch_norm`` and an activation (so the tracer enters it instead of keeping it a leaf)."""

    def __init__(self, c: int, act: str) -> None:
        super().__init__(c)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return F.silu(x) if self.act == "silu" else F.relu(x)


class Encoder(nn.Module):
    """Image to tokens, ``nn.TransformerEncoderLayer`` (sequence- or batch-first, pre- or post-norm), back."""

    def __init__(self, cin: int, heads: int, head_dim: int, ffn: int, norm_first: bool, batch_first: bool,
                 activation: str) -> None:  # fmt: skip
        super().__init__()
        d = heads * head_dim
        self.batch_first = batch_first
        self.embed = nn.Linear(cin, d)
        self.layer = nn.TransformerEncoderLayer(d, heads, ffn, dropout=0.0, activation=activation,
                                                batch_first=batch_first, norm_first=norm_first)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        t = self.embed(x.flatten(2).transpose(1, 2))  # [n, hw, d]
        t = self.layer(t) if self.batch_first else self.layer(t.transpose(0, 1)).transpose(0, 1)
        return t.transpose(1, 2).reshape(n, -1, h, w)


class GapLinear(nn.Module):
    def __init__(self, c: int, out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


class FlattenLinear(nn.Module):
    def __init__(self, features: int, out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(features, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(x, 1))


class RandomNet(nn.Module):
    """Interprets a list of blocks; taps add intermediate outputs, the head the last one."""

    def __init__(self, blocks: list[nn.Module], taps: list[bool], head: nn.Module, container: str) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.taps = taps
        self.head = head
        self.container = container

    def forward(self, x: torch.Tensor) -> Any:
        outs = []
        for block, tap in zip(self.blocks, self.taps, strict=True):
            if tap:
                outs.append(block(x))
            else:
                x = block(x)
        outs.append(self.head(x))
        if len(outs) == 1:
            return outs[0]
        if self.container == "dict":
            return {f"out{i}": o for i, o in enumerate(outs)}
        return tuple(outs)


# -- building a described architecture -------------------------------------------------------------


def _build_seq(specs: list[Spec], c: int) -> tuple[Seq, int]:
    blocks = []
    for spec in specs:
        block, c = _build_block(spec, c)
        blocks.append(block)
    return Seq(blocks), c


def _build_block(spec: Spec, c: int) -> tuple[nn.Module, int]:
    kind, p = spec
    if kind == "conv":
        return ConvBNReLU(c, p["cout"], p["k"], p["bn"]), p["cout"]
    if kind == "depthwise":
        return ConvBNReLU(c, c * p["mult"], 3, p["bn"], groups=c), c * p["mult"]
    if kind == "grouped":
        return ConvBNReLU(c, p["cout"], p["k"], p["bn"], groups=p["groups"]), p["cout"]
    if kind == "se":
        return SqueezeExcite(c, p["hidden"], p["linear"]), c
    if kind == "shuffle":
        return (nn.ChannelShuffle(p["groups"]) if p["module"] else Shuffle(p["groups"])), c
    if kind == "shuffle_unit":
        return ShuffleUnit(c), c
    if kind == "reuse":
        return Reused(c, p["residual"]), c
    if kind == "attention":
        return Attention(c, p["heads"], p["head_dim"], p["ln"], p["sdpa"]), p["heads"] * p["head_dim"]
    if kind == "param_product":
        return ParamProduct(c, p["cout"], p["mode"]), p["cout"]
    if kind == "functional_norm":
        return FunctionalNorm(c, p["kind"], p["groups"]), c
    if kind == "norm_act":
        return Seq([nn.Conv2d(c, p["cout"], 3, padding=1, bias=False), BatchNormAct(p["cout"], p["act"])]), p["cout"]
    if kind == "encoder":
        keys = ("heads", "head_dim", "ffn", "norm_first", "batch_first", "activation")
        return Encoder(c, *(p[k] for k in keys)), p["heads"] * p["head_dim"]
    if kind == "pool":
        return (nn.MaxPool2d(2) if p["max"] else nn.AvgPool2d(2)), c
    if kind == "residual":
        body, cout = _build_seq(p["body"], c)
        proj = ConvBNReLU(c, cout, 1, p["proj_bn"], relu=False) if p["proj"] else None
        return Residual(body, proj), cout
    if kind == "concat":
        branches = [_build_seq(b, c) for b in p["branches"]]
        cout = sum(w for _, w in branches) + (c if p["identity"] else 0)
        return Concat([s for s, _ in branches], p["identity"], p["nested"]), cout
    if kind == "split":
        bodies = [_build_seq(b, w) for b, w in zip(p["bodies"], p["sizes"], strict=True)]
        widths = [w for _, w in bodies]
        combine = p["combine"]
        cout = {"add": widths[0], "mul": widths[0], "drop": sum(widths[:-1]) if len(widths) > 2 else widths[0]}
        return Split(p["mode"], p["arg"], [s for s, _ in bodies], combine), cout.get(combine, sum(widths))
    raise AssertionError(f"unknown block {kind}")


def _build_head(spec: Spec, c: int, s: int) -> nn.Module:
    kind, p = spec
    if kind == "conv":
        return nn.Conv2d(c, p["out"], 1)
    if kind == "gap_linear":
        return GapLinear(c, p["out"])
    if kind == "flatten_linear":
        return FlattenLinear(c * s * s, p["out"])
    return nn.Identity()


def build(arch: dict[str, Any]) -> tuple[nn.Module, torch.Tensor]:
    """The model and its input for a drawn architecture, with random non-trivial BatchNorm statistics."""
    torch.manual_seed(arch["seed"])
    c, s = 3, 8
    blocks, taps = [], []
    for spec in arch["blocks"]:
        if spec[0] == "tap":
            blocks.append(_build_head(spec[1]["head"], c, s))
            taps.append(True)
            continue
        block, c = _build_block(spec, c)
        blocks.append(block)
        taps.append(False)
        if spec[0] == "pool":
            s //= 2
    model = RandomNet(blocks, taps, _build_head(arch["head"], c, s), arch["container"])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.5)
            elif isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.5)
    return model.eval(), torch.randn(2, 3, 8, 8)


# -- drawing architectures --------------------------------------------------------------------------


def _divisors(c: int, low: int = 2) -> list[int]:
    return [d for d in range(low, c + 1) if c % d == 0]


def _split_sizes(mode: str, arg: Any, c: int) -> list[int]:
    if mode == "chunk":
        return [len(p) for p in torch.arange(c).chunk(arg)]
    return [len(p) for p in torch.arange(c).split(arg)]


Drawn = tuple[Spec, int]  # description, output width


@st.composite
def _seq(draw: Any, c: int, depth: int, min_len: int = 1, max_len: int = 2) -> tuple[list[Spec], int]:
    specs = []
    for _ in range(draw(st.integers(min_len, max_len))):
        spec, c = draw(_block(c, depth))
        specs.append(spec)
    return specs, c


@st.composite
def _block(draw: Any, c: int, depth: int) -> Drawn:
    # repeated kinds are drawn more often: the ones with the most intricate channel maps
    kinds = ["conv", "depthwise", "se", "attention", "reuse", *NEW_KINDS]
    if c >= 2:
        kinds += ["grouped", "split", "split"]
    if [d for d in _divisors(c) if d < c]:
        kinds += ["shuffle", "shuffle"]
    if c % 2 == 0:
        kinds += ["shuffle_unit", "shuffle_unit"]
    if depth < MAX_DEPTH:
        kinds += ["residual", "concat"]
    if c > 24:  # keep models small: only a reducing convolution
        kinds = ["conv"]
    kind = draw(st.sampled_from(kinds))
    if kind in NEW_KINDS:
        return draw(_new_block(c, kind))
    bn = st.booleans()
    if kind == "conv":
        cout = draw(st.integers(2, 16))
        return ("conv", {"cout": cout, "k": draw(st.sampled_from([1, 3])), "bn": draw(bn)}), cout
    if kind == "depthwise":
        mult = draw(st.integers(1, max(1, min(3, 24 // c))))
        return ("depthwise", {"mult": mult, "bn": draw(bn)}), c * mult
    if kind == "grouped":
        groups = draw(st.sampled_from(_divisors(c)))
        cout = groups * draw(st.integers(1, max(1, 16 // groups)))
        p = {"groups": groups, "cout": cout, "k": draw(st.sampled_from([1, 3])), "bn": draw(bn)}
        return ("grouped", p), cout
    if kind == "se":
        return ("se", {"hidden": draw(st.integers(2, 8)), "linear": draw(st.booleans())}), c
    if kind == "shuffle":
        groups = draw(st.sampled_from([d for d in _divisors(c) if d < c]))
        return ("shuffle", {"groups": groups, "module": draw(st.booleans())}), c
    if kind == "shuffle_unit":
        return ("shuffle_unit", {}), c
    if kind == "reuse":
        return ("reuse", {"residual": draw(st.booleans())}), c
    if kind == "attention":
        heads = draw(st.sampled_from([1, 2, 4]))
        head_dim = max(draw(st.integers(1, 4)), 2 // heads)
        p = {"heads": heads, "head_dim": head_dim, "ln": draw(st.booleans()), "sdpa": draw(st.booleans())}
        return ("attention", p), heads * head_dim
    if kind == "residual":
        body, cout = draw(_seq(c, depth + 1))
        proj = cout != c or draw(st.booleans())
        return ("residual", {"body": body, "proj": proj, "proj_bn": draw(bn)}), cout
    if kind == "concat":
        branches, total = [], 0
        for _ in range(draw(st.integers(2, 3))):
            body, w = draw(_seq(c, depth + 1, max_len=1))
            branches.append(body)
            total += w
        identity = draw(st.booleans())
        nested = len(branches) + identity >= 3 and draw(st.booleans())
        p = {"branches": branches, "identity": identity, "nested": nested}
        return ("concat", p), total + (c if identity else 0)
    return draw(_split(c, depth))


NEW_KINDS = ("param_product", "functional_norm", "norm_act", "encoder")
"""Blocks added after timm and ``nn.TransformerEncoderLayer`` models came out pinned or crashed (issue 18):
parameters used directly through ``matmul``/``F.linear``, functional norms, norm-activation subclasses
with a forward of their own, and ``nn.TransformerEncoderLayer``."""


@st.composite
def _new_block(draw: Any, c: int, kind: str | None = None) -> Drawn:
    kind = kind or draw(st.sampled_from(NEW_KINDS))
    if kind == "param_product":
        cout = draw(st.integers(2, 12))
        return ("param_product", {"cout": cout, "mode": draw(st.sampled_from(["matmul", "linear", "rmatmul"]))}), cout
    if kind == "functional_norm":
        norm = draw(st.sampled_from(["batch_norm", "group_norm", "layer_norm"]))
        groups = draw(st.sampled_from([1, *_divisors(c)])) if norm == "group_norm" else 1
        return ("functional_norm", {"kind": norm, "groups": groups}), c
    if kind == "norm_act":
        cout = draw(st.integers(2, 12))
        return ("norm_act", {"cout": cout, "act": draw(st.sampled_from(["relu", "silu"]))}), cout
    heads, head_dim = draw(st.sampled_from([1, 2])), draw(st.integers(2, 4))
    p = {"heads": heads, "head_dim": head_dim, "ffn": draw(st.integers(4, 12)), "norm_first": draw(st.booleans()),
         "batch_first": draw(st.booleans()), "activation": draw(st.sampled_from(["relu", "gelu"]))}  # fmt: skip
    return ("encoder", p), heads * head_dim


@st.composite
def _split(draw: Any, c: int, depth: int) -> Drawn:
    mode = draw(st.sampled_from(["sizes", "chunk", "int"]))
    if mode == "sizes":
        n = draw(st.integers(2, min(3, c)))
        cuts = sorted(draw(st.lists(st.integers(1, c - 1), min_size=n - 1, max_size=n - 1, unique=True)))
        arg: Any = [b - a for a, b in zip([0, *cuts], [*cuts, c], strict=True)]
    elif mode == "chunk":
        arg = draw(st.integers(2, min(4, c)))
    else:
        arg = draw(st.integers(max(1, c // 4), c - 1))
    sizes = _split_sizes(mode, arg, c)
    combine = draw(st.sampled_from(["cat", "reverse", "add", "mul", "drop"]))
    if combine == "mul" and len(sizes) != 2:
        combine = "add"
    bodies, widths = [], []
    width = draw(st.integers(2, 12))
    for w in sizes:
        body, w_out = draw(_seq(w, depth + 1, min_len=0, max_len=1))
        if combine in ("add", "mul"):  # the pieces must end at one width: end each body with a conv
            body, w_out = [*body, ("conv", {"cout": width, "k": 1, "bn": draw(st.booleans())})], width
        bodies.append(body)
        widths.append(w_out)
    p = {"mode": mode, "arg": arg, "sizes": sizes, "bodies": bodies, "combine": combine}
    if combine in ("add", "mul"):
        cout = widths[0]
    elif combine == "drop":
        cout = sum(widths[:-1]) if len(widths) > 2 else widths[0]
    else:
        cout = sum(widths)
    return ("split", p), cout


@st.composite
def architectures(draw: Any, new_blocks: int = 0) -> dict[str, Any]:
    """A printable description of a random small image model for a 2x3x8x8 input; with ``new_blocks``,
    that many of the blocks of :data:`NEW_KINDS` are placed among the others at drawn positions."""
    c, s = 3, 8
    blocks: list[Spec] = []
    extra = sorted(draw(st.lists(st.integers(0, 5), min_size=new_blocks, max_size=new_blocks)))
    heads = st.sampled_from(["conv", "gap_linear", "flatten_linear", "identity"])
    for i in range(draw(st.integers(2, 6))):
        step = draw(st.sampled_from(["block", "block", "block", "tap", "pool"])) if i else "block"
        if step == "tap":
            blocks.append(("tap", {"head": (draw(heads), {"out": draw(st.integers(1, 5))})}))
        elif step == "pool" and s == 8:
            blocks.append(("pool", {"max": draw(st.booleans())}))
            s //= 2
        else:
            spec, c = draw(_block(c, 0))
            blocks.append(spec)
        while extra and extra[0] <= i:
            extra.pop(0)
            spec, c = draw(_new_block(c))
            blocks.append(spec)
    for _ in extra:  # positions past the last block go at the end
        spec, c = draw(_new_block(c))
        blocks.append(spec)
    return {
        "blocks": blocks,
        "head": (draw(heads), {"out": draw(st.integers(1, 5))}),
        "container": draw(st.sampled_from(["tuple", "dict"])),
        "seed": draw(st.integers(0, 2**16)),
    }
