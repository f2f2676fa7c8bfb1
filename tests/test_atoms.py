"""The atom table's layout arithmetic: chunks cut a layout in one pass, as slicing it chunk by chunk does."""

from __future__ import annotations

import pytest

from fxmorph.analysis.atoms import AtomTable, Layout


def _layout(table: AtomTable) -> Layout:
    """Two atoms of 6 and 4 channels, the second repeated twice per channel, then the first again (a head
    repeated further on), and one of a unified pair: 6 + 8 + 6 + 4 positions."""
    a, b, c, d = table.new(6), table.new(4), table.new(4), table.new(4)
    table.union(c, d)
    return ((a, 1), (b, 2), (a, 1), (c, 1))


def _pieces(table: AtomTable, layout: Layout) -> list[tuple[int, int]]:
    """A layout's leaf pieces as (channels, copies of each): equal for layouts cut alike."""
    return [(table.size(atom), inner) for atom, inner in table.expand(layout)]


@pytest.mark.parametrize("count", [1, 3, 12])
def test_chunks_are_the_slices_of_the_layout(count: int) -> None:
    ours, theirs = AtomTable(), AtomTable()
    layout = _layout(ours)
    assert _layout(theirs) == layout
    chunks = ours.chunks(layout, count)
    step = theirs.width(layout) // count
    slices = [theirs.slice(layout, k * step, (k + 1) * step) for k in range(count)]
    assert chunks is not None and all(s is not None for s in slices)
    assert [ours.width(c) for c in chunks] == [step] * count
    assert [_pieces(ours, c) for c in chunks] == [_pieces(theirs, s) for s in slices]  # type: ignore[arg-type]
    assert _pieces(ours, layout) == _pieces(theirs, layout)  # the repeated atom split alike in both


def test_chunks_that_would_separate_copies_of_a_channel_are_refused() -> None:
    table = AtomTable()
    a = table.new(3)
    assert table.chunks(((a, 2),), 2) is None  # 6 positions, each channel twice: a cut at 3 splits a pair
    assert table.chunks(((a, 2),), 3) is not None
    assert table.chunks(((a, 1),), 2) is None  # 3 positions do not halve
    assert table.chunks(_layout(table), 24) is None  # a cut inside the channel repeated twice
