"""The consistency checker: prove a (rewritten) model is self-consistent and keeps its interface.

Checks, in order: graph lint; every module's attributes agree with its parameter shapes; shape replay
of the whole graph on the example inputs; inputs and outputs keep their shapes and dtypes; the channel
analysis runs cleanly on the result. Any failure raises :class:`~fxmorph.errors.ConsistencyError`
naming the node, the module path, and what was expected against what was found.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx, nn

from fxmorph.capture.trace import as_inputs, interface, propagate_shapes, trace
from fxmorph.errors import ConsistencyError, FxmorphError
from fxmorph.meta import INTERFACE_KEY
from fxmorph.validate import frozen_mode

__all__ = ["check", "module_problems"]


def _conv(m: nn.modules.conv._ConvNd) -> list[str]:
    """The mismatches between a convolution's attributes and its weight and bias."""
    w = m.weight
    # A convolution's weight is [out, in / groups, *kernel]; a transposed one's is [in, out / groups, *kernel].
    out, per_group = (w.shape[1] * m.groups, w.shape[0]) if m.transposed else (w.shape[0], w.shape[1])
    problems = []
    if m.in_channels % m.groups or m.out_channels % m.groups:
        problems.append(f"groups={m.groups} must divide in_channels={m.in_channels} and out_channels={m.out_channels}")
    if out != m.out_channels:
        problems.append(f"out_channels={m.out_channels} but weight {tuple(w.shape)} gives {out}")
    if (per_group if not m.transposed else w.shape[0]) * (m.groups if not m.transposed else 1) != m.in_channels:
        problems.append(f"in_channels={m.in_channels} but weight {tuple(w.shape)} with groups={m.groups} disagrees")
    if m.bias is not None and m.bias.shape[0] != m.out_channels:
        problems.append(f"bias has {m.bias.shape[0]} entries for out_channels={m.out_channels}")
    return problems


def _linear(m: nn.Linear) -> list[str]:
    problems = []
    if tuple(m.weight.shape) != (m.out_features, m.in_features):
        shape = tuple(m.weight.shape)
        problems.append(f"weight {shape} but in_features={m.in_features}, out_features={m.out_features}")
    if m.bias is not None and m.bias.shape[0] != m.out_features:
        problems.append(f"bias has {m.bias.shape[0]} entries for out_features={m.out_features}")
    return problems


def _norm(m: nn.Module) -> list[str]:
    n = m.num_features if hasattr(m, "num_features") else getattr(m, "num_channels", None)
    if isinstance(m, nn.LayerNorm):
        # Over several dims the affine tensors are not vectors: not checked here.
        n = m.normalized_shape[-1] if len(m.normalized_shape) == 1 else None
    problems = []
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(m, name, None)
        if t is not None and n is not None and t.shape[0] != n:
            problems.append(f"{name} has {t.shape[0]} entries for width {n}")
    if isinstance(m, nn.GroupNorm) and m.num_channels % m.num_groups:
        problems.append(f"num_groups={m.num_groups} does not divide num_channels={m.num_channels}")
    return problems


def _mha(m: nn.MultiheadAttention) -> list[str]:
    problems = []
    if m.embed_dim != m.head_dim * m.num_heads:
        problems.append(f"embed_dim={m.embed_dim} != head_dim={m.head_dim} x num_heads={m.num_heads}")
    if m.in_proj_weight is not None and tuple(m.in_proj_weight.shape) != (3 * m.embed_dim, m.embed_dim):
        problems.append(f"in_proj_weight {tuple(m.in_proj_weight.shape)} for embed_dim={m.embed_dim}")
    problems += [f"out_proj: {p}" for p in _linear(m.out_proj)]
    return problems


def _embedding(m: nn.Embedding) -> list[str]:
    if m.weight.shape[1] != m.embedding_dim:
        return [f"weight {tuple(m.weight.shape)} for embedding_dim={m.embedding_dim}"]
    return []


_MODULE_CHECKS: list[tuple[type, Callable[[Any], list[str]]]] = [
    (nn.modules.conv._ConvNd, _conv),
    (nn.Linear, _linear),
    (nn.modules.batchnorm._NormBase, _norm),
    (nn.LayerNorm, _norm),
    (nn.GroupNorm, _norm),
    (nn.MultiheadAttention, _mha),
    (nn.Embedding, _embedding),
]


def module_problems(model: nn.Module) -> list[tuple[str, str]]:
    """Every ``(module path, problem)`` where a module's attributes disagree with its tensors."""
    found = []
    for path, m in model.named_modules():
        # a name held as both a parameter and a buffer: forward reads one, state_dict keeps the other
        found.extend(
            (path or "<root>", f"'{name}' is both a parameter and a buffer")
            for name in m._parameters.keys() & m._buffers.keys()
        )
        for kind, fn in _MODULE_CHECKS:
            if isinstance(m, kind):
                found.extend((path or "<root>", p) for p in fn(m))
    return found


def check(model: nn.Module, example_inputs: Any, *, expected_interface: Any = None, reanalyze: bool = True) -> None:
    """Raise :class:`ConsistencyError` unless ``model`` is consistent and keeps its interface.

    ``expected_interface`` defaults to the interface recorded when ``model`` (a GraphModule made by
    fxmorph) was traced; pass the original model's to compare a rewrite against it.
    """
    if isinstance(model, fx.GraphModule):
        try:
            model.graph.lint()
        except Exception as exc:
            raise ConsistencyError(f"graph lint failed: {exc}") from exc
        expected_interface = expected_interface or model.meta.get(INTERFACE_KEY)
    problems = module_problems(model)
    if problems:
        path, problem = problems[0]
        raise ConsistencyError(f"module '{path}' is inconsistent: {problem} ({len(problems)} problem(s) in all)")
    replayed = _replay(model, example_inputs)
    if expected_interface is not None:
        _compare_interface(expected_interface, interface(replayed))
    if reanalyze:
        from fxmorph.analysis import build_channel_graph

        try:
            build_channel_graph(replayed)
        except FxmorphError as exc:
            raise ConsistencyError(f"channel analysis of the result failed: {exc}") from exc


def _replay(model: nn.Module, example_inputs: Any) -> fx.GraphModule:
    """Shapes of ``model`` on the example inputs: a GraphModule is propagated in place, any other module traced."""
    try:
        if isinstance(model, fx.GraphModule):
            # Eval mode: the replay must not move BatchNorm running statistics.
            with frozen_mode(model):
                propagate_shapes(model, as_inputs(example_inputs))
            return model
        return trace(model, example_inputs)
    except FxmorphError as exc:
        node = _failing_node(exc)
        raise ConsistencyError(f"shape replay failed{node}: {exc}") from exc


def _failing_node(exc: BaseException) -> str:
    """The ``While executing %node`` line that torch.fx adds to the cause of a failed run, as `` at ...`` (""
    without one)."""
    text = str(exc.__cause__ or "")
    for line in text.splitlines():
        if "While executing" in line:
            return f" at {line.strip()}"
    return ""


def _compare_interface(expected: Any, actual: Any) -> None:
    """Raise :class:`ConsistencyError` where the ``(inputs, outputs)`` shapes and dtypes differ."""
    (exp_in, exp_out), (act_in, act_out) = expected, actual
    if exp_in != act_in:
        raise ConsistencyError(f"model inputs changed: expected {exp_in}, found {act_in}")
    if exp_out != act_out:
        raise ConsistencyError(f"model outputs changed: expected {exp_out}, found {act_out}")
