"""Channel rule for ``torch.einsum`` with one or two operands.

Every subscript letter names one axis shared by the operands that carry it. A letter kept in the
output passes its channels through (the batch and free axes of a product); a letter that appears in
both operands and not in the output is contracted, so both sides must hold the same channels, as the
``K`` of a matmul. Anything this rule cannot read (ellipsis, repeated letters inside one operand,
three or more operands) pins what it touches.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from fxmorph.analysis.atoms import Layout
from fxmorph.analysis.context import RuleContext, Spaces
from fxmorph.analysis.rules.compute import no_rule

__all__ = ["einsum", "parse_einsum"]


def parse_einsum(equation: str, count: int) -> tuple[list[str], str] | None:
    """The subscripts of each operand and of the output, or ``None`` when the rule does not cover it.

    Spaces are ignored (torchvision writes ``"B G H I D, B G H J D -> B G H I J"``). Without ``->``
    the output is every letter that appears exactly once, in alphabetical order (NumPy's implicit mode).
    """
    eq = equation.replace(" ", "")
    if "." in eq:  # an ellipsis: its dims have no letter to follow
        return None
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != count or not all(t.isalpha() for t in terms) or (out and not out.isalpha()):
        return None
    if not arrow:
        letters = "".join(terms)
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    # a repeated letter in one operand takes a diagonal; an output letter no operand has is invalid
    if any(len(set(t)) != len(t) for t in [*terms, out]) or not set(out) <= set("".join(terms)):
        return None
    return terms, out


def _operands(node: fx.Node) -> tuple[Any, list[Any]]:
    """The equation and the operands, passed either as ``einsum(eq, a, b)`` or ``einsum(eq, [a, b])``."""
    equation, rest = node.args[0], list(node.args[1:])
    if len(rest) == 1 and isinstance(rest[0], list | tuple):
        rest = list(rest[0])
    return equation, rest


def einsum(ctx: RuleContext, node: fx.Node) -> Spaces | None:
    """``torch.einsum(eq, a[, b])``: letters kept in the output carry their channels through; a
    letter contracted between the two operands unifies their channels (no growth, as for a matmul of
    two activations); a letter summed inside one operand, or one that meets a fixed-width axis, pins.

    Cost: PyTorch runs a two-operand einsum with a contraction as one batched matmul, ``2 x`` the
    product of the sizes of every letter that is kept or contracted (letters summed inside one operand
    are reduced first and cost nothing); without a contraction it is an elementwise product (no FLOPs).
    """
    equation, ops = _operands(node)
    parsed = parse_einsum(equation, len(ops)) if isinstance(equation, str) and len(ops) in (1, 2) else None
    shapes = [ctx.shape(op) for op in ops]
    if parsed is None or ctx.shape(node) is None or any(s is None for s in shapes):
        return no_rule(ctx, node)
    terms, out = parsed
    if any(len(s or ()) != len(t) for s, t in zip(shapes, terms, strict=True)):
        return no_rule(ctx, node)
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, shapes, strict=True):
        for letter, n in zip(term, shape or (), strict=True):
            sizes[letter] = max(sizes.get(letter, 1), n)  # an operand of size one there is broadcast
    factors: dict[str, Layout] = {}
    result: Spaces = {}
    for letter, size in sizes.items():
        merged = _letter(ctx, letter, size, terms, ops, shapes, out)
        if merged is None:
            continue
        factors[letter] = merged
        if letter in out:
            result[out.index(letter)] = merged
    # letters in both operands and not in the output; with one operand, nothing is a contraction
    contracted = [c for c in sizes if c not in out and all(c in t for t in terms)]
    if len(ops) == 2 and contracted:
        kept = [c for c in sizes if c in out or c in contracted]
        ctx.cost(2, *(factors.get(c, sizes[c]) for c in kept))
    return result


def _letter(
    ctx: RuleContext,
    letter: str,
    size: int,
    terms: list[str],
    ops: list[Any],
    shapes: list[Any],
    out: str,
) -> Layout | None:
    """The channels of one subscript letter across the operands (``None`` when it has none or pins)."""
    layouts: list[Layout] = []
    fixed = False
    for term, op, shape in zip(terms, ops, shapes, strict=True):
        if letter not in term:
            continue
        d = term.index(letter)
        layout = ctx.spaces(op).get(d)
        if shape[d] == 1 and size != 1:  # broadcast: this operand does not index the letter's channels
            if layout is not None:
                ctx.pin(layout, "a one-channel einsum operand is broadcast against a wider one")
            continue
        if layout is None:
            fixed = True
        else:
            layouts.append(layout)
    if not layouts:
        return None
    if fixed:
        for layout in layouts:
            ctx.pin(layout, "einsum combines channels with a fixed-width dim")
        return None
    merged = ctx.unify(layouts, "einsum combines channels that do not line up")
    if merged is None:
        return None
    if letter not in out:
        if len(layouts) < 2:  # summed inside one operand: a reduction over channels
            ctx.pin(merged, "einsum sums over channels")
            return None
        ctx.no_grow(merged, "new channels contracted by einsum of two activations would change it")
    return merged
