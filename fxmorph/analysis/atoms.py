"""Channel atoms: a union-find over contiguous runs of channels, split and coarsened lazily.

An *atom* is a run of channels that always moves as a unit. A *layout* describes one channel axis of
one tensor as a sequence of pieces ``(atom, inner)``: the axis holds the atom's channels in order,
each channel repeated ``inner`` times consecutively (``inner > 1`` after ``flatten`` of C x H x W into
a Linear, or in the output of a channel shuffle). The same atom may appear several times in one layout
(the heads of an attention block). Atoms that must keep the same index set are unioned into a *class*;
the classes of leaf atoms are the channel groups.

When a ``cat``/``split`` boundary falls inside an atom, the atom's whole class is split at that offset
(MorphNet's OpSlice). When an op needs blocks of ``k`` channels to move together (PixelShuffle), the
whole class is *coarsened*: every member becomes a new atom of ``size / k`` channels with ``inner * k``.
Old atoms stay valid as names: :meth:`AtomTable.expand` resolves them to their current leaves.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["AtomTable", "Layout", "Piece", "Pin"]

Piece = tuple[int, int]
Layout = tuple[Piece, ...]


@dataclass(frozen=True)
class Pin:
    """Why a group of channels must keep its width: a human-readable reason and the node at fault.

    ``kind`` is ``"frozen"`` (the width may not change) or ``"no-grow"`` (channels may be removed, but
    adding channels would change the function, for example through a LayerNorm's statistics).
    """

    reason: str
    node: str
    kind: str = "frozen"

    def __str__(self) -> str:
        return f"{self.reason} (at {self.node})"


class AtomTable:
    """Union-find of channel atoms with lazy splitting and coarsening."""

    def __init__(self) -> None:
        """An empty table. Atoms are integer ids; a split or coarsened atom keeps its id and gains
        ``_children`` (the pieces ``(atom, inner)`` it now stands for); ``_members`` and ``_pins`` are kept
        for class roots only."""
        self._size: list[int] = []
        self._parent: list[int] = []
        self._children: dict[int, tuple[Piece, ...]] = {}
        self._members: dict[int, list[int]] = {}
        self._pins: dict[int, list[Pin]] = {}

    # -- atoms and classes -------------------------------------------------------------------------
    def new(self, size: int) -> int:
        """Create a fresh atom of ``size`` channels in a class of its own."""
        atom = len(self._size)
        self._size.append(size)
        self._parent.append(atom)
        self._members[atom] = [atom]
        return atom

    def find(self, atom: int) -> int:
        """Root of the class of ``atom``."""
        parent = self._parent
        while parent[atom] != atom:
            parent[atom] = parent[parent[atom]]  # path halving: each visited atom skips to its grandparent
            atom = parent[atom]
        return atom

    def size(self, atom: int) -> int:
        """Number of channels of ``atom``."""
        return self._size[atom]

    def is_leaf(self, atom: int) -> bool:
        """True if ``atom`` has not been split or coarsened."""
        return atom not in self._children

    def union(self, a: int, b: int) -> None:
        """Merge the classes of two leaf atoms of equal size."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self._size[ra] != self._size[rb]:  # unify splits first: unequal sizes are a bug
            raise AssertionError(f"union of atoms of sizes {self._size[ra]} and {self._size[rb]}")
        # union by size: the smaller member list joins the larger, so each atom moves O(log n) times in all
        if len(self._members[ra]) < len(self._members[rb]):
            ra, rb = rb, ra
        self._parent[rb] = ra
        self._members[ra].extend(self._members.pop(rb))
        pins = self._pins.pop(rb, [])
        if pins:
            self._pins.setdefault(ra, []).extend(pins)

    def _replace_class(self, atom: int, parts: list[tuple[int, int]]) -> None:
        """Give every member of ``atom``'s class children of the sizes/inners in ``parts``."""
        root = self.find(atom)
        members = self._members.pop(root)
        pins = self._pins.pop(root, [])
        # Every member of a class holds the same channels, so all are cut the same way, and the k-th pieces
        # of all members form one new class. A pinned class stays pinned in every piece.
        new_classes: list[list[int]] = [[] for _ in parts]
        for member in members:
            kids = []
            for k, (size, inner) in enumerate(parts):
                kid = self.new(size)
                new_classes[k].append(kid)
                kids.append((kid, inner))
            self._children[member] = tuple(kids)
        for cls in new_classes:
            for other in cls[1:]:
                self.union(cls[0], other)
            if pins:
                self._pins[self.find(cls[0])] = list(pins)

    def split(self, atom: int, offset: int) -> tuple[int, int]:
        """Split the class of leaf ``atom`` at channel ``offset``; return ``atom``'s two halves."""
        size = self._size[atom]
        if not 0 < offset < size:
            raise AssertionError(f"split of an atom of size {size} at {offset}")
        self._replace_class(atom, [(offset, 1), (size - offset, 1)])
        (left, _), (right, _) = self._children[atom]
        return left, right

    def coarsen(self, atom: int, block: int) -> int:
        """Regroup the class of leaf ``atom`` into blocks of ``block`` channels; return the new atom."""
        # callers check that ``block`` divides the size; the new atom has one channel per block
        self._replace_class(atom, [(self._size[atom] // block, block)])
        return self._children[atom][0][0]

    # -- layouts -----------------------------------------------------------------------------------
    def expand(self, layout: Layout) -> Layout:
        """Resolve every piece of ``layout`` to current leaf atoms."""
        out: list[Piece] = []
        stack = list(reversed(layout))  # reversed, so popping yields the pieces in order
        while stack:
            atom, inner = stack.pop()
            kids = self._children.get(atom)
            if kids is None:
                out.append((atom, inner))
            else:
                # a block of k channels, each repeated ``inner`` times, spans ``inner * k`` positions
                stack.extend((kid, inner * k) for kid, k in reversed(kids))
        return tuple(out)

    def width(self, layout: Layout) -> int:
        """Number of positions the layout spans."""
        return sum(self._size[a] * inner for a, inner in layout)

    def slice(self, layout: Layout, start: int, stop: int) -> Layout | None:
        """Sub-layout of positions ``[start, stop)``, splitting atoms as needed.

        Returns ``None`` when a boundary falls inside the ``inner`` repetition of one channel.
        """
        out: list[Piece] = []
        pos = 0
        for atom, inner in self._leaf_pieces(layout):
            span = self._size[atom] * inner
            lo, hi = max(start - pos, 0), min(stop - pos, span)
            pos += span
            if lo >= hi:
                continue
            if lo % inner or hi % inner:  # the cut would separate copies of one channel
                return None
            out.append((self._cut(atom, lo // inner, hi // inner), inner))
        return tuple(out)

    def _leaf_pieces(self, layout: Layout) -> Iterator[Piece]:
        """Iterate leaf pieces, re-expanding atoms that an earlier step split meanwhile."""
        stack = list(reversed(self.expand(layout)))
        while stack:
            atom, inner = stack.pop()
            # the same atom can appear again further on (one per attention head), and a _cut made for an
            # earlier piece splits its whole class: look its children up at the moment it is reached
            kids = self._children.get(atom)
            if kids is None:
                yield atom, inner
            else:
                stack.extend((kid, inner * k) for kid, k in reversed(kids))

    def _cut(self, atom: int, lo: int, hi: int) -> int:
        """Leaf atom covering exactly channels ``[lo, hi)`` of leaf ``atom``."""
        if lo > 0:
            atom = self.split(atom, lo)[1]
            hi -= lo
        if hi < self._size[atom]:
            atom = self.split(atom, hi)[0]
        return atom

    def chunks(self, layout: Layout, count: int) -> list[Layout] | None:
        """Cut ``layout`` into ``count`` equal consecutive chunks (``None`` if impossible)."""
        width = self.width(layout)
        if count <= 0 or width % count:
            return None
        step = width // count
        # one pass over the leaf pieces, each cut where chunks end (slicing chunk by chunk re-walked the layout
        # for every chunk: quadratic, minutes for CondConv's flattened expert weights viewed as filters)
        parts: list[list[Piece]] = [[] for _ in range(count)]
        pos = 0
        for atom, inner in self._leaf_pieces(layout):
            end = pos + self._size[atom] * inner
            rest: int | None = atom  # the leaf holding positions [pos, end) not yet given to a chunk
            while rest is not None:
                k = pos // step
                stop = min(end, (k + 1) * step)
                if (stop - pos) % inner:  # the cut would separate copies of one channel
                    return None
                taken = (stop - pos) // inner
                if taken < self._size[rest]:
                    piece, rest = self.split(rest, taken)
                else:
                    piece, rest = rest, None
                parts[k].append((piece, inner))
                pos = stop
        return [tuple(p) for p in parts]

    def unify(self, x: Layout, y: Layout) -> bool:
        """Make two layouts position-wise identical channel sets. False if they cannot be aligned."""
        if self.width(x) != self.width(y):
            return False
        qa, qb = list(self.expand(x)), list(self.expand(y))
        # Walk both piece lists in step, cutting the larger of two facing atoms so they match, then union
        # them. Equal widths make the lists end together. Unions already made are not undone on failure:
        # callers pin every layout involved (RuleContext.unify).
        i = 0
        while i < len(qa):
            (a, ia), (b, ib) = qa[i], qb[i]
            # a split made earlier in this walk cuts whole classes, so atoms further along either list may
            # have been split meanwhile: re-expand the remainder
            if not self.is_leaf(a) or not self.is_leaf(b):
                qa[i:] = self.expand(tuple(qa[i:]))
                qb[i:] = self.expand(tuple(qb[i:]))
                continue
            if ia != ib:
                if not self._match_inner(qa, qb, i):
                    return False
                continue
            sa, sb = self._size[a], self._size[b]
            if sa > sb:
                left, right = self.split(a, sb)
                qa[i : i + 1] = [(left, ia), (right, ia)]
            elif sb > sa:
                left, right = self.split(b, sa)
                qb[i : i + 1] = [(left, ib), (right, ib)]
            self.union(qa[i][0], qb[i][0])
            i += 1
        return len(qa) == len(qb)

    def _match_inner(self, qa: list[Piece], qb: list[Piece], i: int) -> bool:
        """Make pieces ``qa[i]`` and ``qb[i]`` repeat their channels equally, in place, before a union.

        Where one side repeats each channel ``k`` times as often as the other (a depthwise convolution
        with a channel multiplier added to a plain convolution's output, or followed by a norm whose
        parameters are used directly), the finer side's class is coarsened into blocks of ``k`` channels
        over the positions both cover. False if the repetitions or the boundaries do not line up.
        """
        big, small = (qa, qb) if qa[i][1] > qb[i][1] else (qb, qa)
        (x, ix), (y, iy) = big[i], small[i]
        # one class cannot repeat its channels at two rates, and repetition counts must divide
        if ix % iy or self.find(x) == self.find(y):
            return False
        # cut the longer piece where the shorter ends, as unify does, so both cover the same positions
        px, py = self._size[x] * ix, self._size[y] * iy
        if px > py:
            if py % ix:  # the cut would fall inside one repeated channel of the coarse side
                return False
            left, right = self.split(x, py // ix)
            big[i : i + 1] = [(left, ix), (right, ix)]
        elif py > px:
            left, right = self.split(y, px // iy)
            small[i : i + 1] = [(left, iy), (right, iy)]
        y, iy = small[i]
        if not self.is_leaf(y) or not self.is_leaf(big[i][0]):
            return True  # a split reached the other side's class: the caller re-expands and retries
        small[i] = (self.coarsen(y, ix // iy), ix)
        return True

    def unchunk(self, layout: Layout, block: int) -> Layout | None:
        """View ``layout`` as blocks of ``block`` consecutive positions that move together.

        Each piece must hold whole blocks; a piece with ``inner < block`` is coarsened. Returns the
        layout of the blocks (``None`` if a block straddles two atoms).
        """
        out: list[Piece] = []
        for atom, inner in self._leaf_pieces(layout):
            if inner % block == 0:  # each channel already fills whole blocks
                out.append((atom, inner // block))
                continue
            # otherwise a block must be a whole number of this atom's channels, and the atom whole blocks
            if block % inner or (self._size[atom] * inner) % block:
                return None
            out.append((self.coarsen(atom, block // inner), 1))
        return tuple(out)

    # -- pins --------------------------------------------------------------------------------------
    def pin(self, layout: Layout, pin: Pin) -> None:
        """Freeze every class that appears in ``layout``."""
        for atom, _ in self.expand(layout):
            root = self.find(atom)
            pins = self._pins.setdefault(root, [])
            if pin not in pins:  # a layout may list one class many times (heads); record each reason once
                pins.append(pin)

    def pins(self, atom: int) -> list[Pin]:
        """Pins of the class of leaf ``atom``."""
        return self._pins.get(self.find(atom), [])

    def classes(self) -> dict[int, list[int]]:
        """Every class of leaf atoms: root -> members."""
        return {r: m for r, m in self._members.items() if all(self.is_leaf(a) for a in m)}
