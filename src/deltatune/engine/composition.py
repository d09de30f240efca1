"""Composition of adapters as data: which adapters a forward uses and how their changes combine.

A setup is a tree of blocks over adapter names, as in AdapterHub `adapters` (arXiv 2311.11077), and
saved in the same dict form ({"type", "children", "kwargs"}):

| block | the layer's output | for |
|---|---|---|
| Stack(a, b) | b applied to a's output (additive weight deltas: their changes summed) | every method |
| Average(a, b, weights=) | Σ wᵢ · outputᵢ, the weights normalised to sum 1 | every additive method |
| BatchSplit(a, b, batch_sizes=) | rows [0, n₀) through a, the next n₁ through b | every method |
| Parallel(a, b) | the batch repeated once per child, copy i through child i (outputs n·k rows) | every method |
| Split(a, b, splits=) | tokens [0, s₀) through a, the next s₁ through b | token-wise methods |
| Fuse(a, b) | AdapterFusion (arXiv 2005.00247): attention over the adapters' outputs | bottleneck adapters |

Which block may hold which is the table ALLOWED_NESTINGS, not code.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Union

Setup = Union[str, "Block"]


class Block:
    """A composition block: ordered children (adapter names or blocks) and the block's own options."""

    options: ClassVar[tuple[str, ...]] = ()  # keyword options saved in to_dict()["kwargs"]

    def __init__(self, *children: Setup):
        if not children:
            raise ValueError(f"{type(self).__name__}() needs at least one adapter or block")
        self.children: tuple[Setup, ...] = tuple(_child(c) for c in children)

    def __iter__(self) -> Iterator[Setup]:
        return iter(self.children)

    def __len__(self) -> int:
        return len(self.children)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()  # type: ignore[union-attr]

    def __hash__(self) -> int:
        return hash(repr(self))

    def __repr__(self) -> str:
        kw = "".join(f", {k}={getattr(self, k)!r}" for k in self.options)
        return f"{type(self).__name__}({', '.join(map(repr, self.children))}{kw})"

    def names(self) -> list[str]:
        """Every adapter name in the block, in order, once."""
        out: dict[str, None] = {}
        for c in self.children:
            out.update(dict.fromkeys([c] if isinstance(c, str) else c.names()))
        return list(out)

    def first(self) -> str:
        c = self.children[0]
        return c if isinstance(c, str) else c.first()

    def last(self) -> str:
        c = self.children[-1]
        return c if isinstance(c, str) else c.last()

    @property
    def copies(self) -> int:
        """How many times a Parallel inside repeats the batch (1: none)."""
        return max(1 if isinstance(c, str) else c.copies for c in self.children)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": type(self).__name__,
                             "children": [{"type": "single", "children": [c]} if isinstance(c, str) else c.to_dict()
                                          for c in self.children]}
        if self.options:
            d["kwargs"] = {k: getattr(self, k) for k in self.options}
        return d

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Block:
        """The block saved by to_dict() (AdapterHub's own saved form reads too)."""
        if not isinstance(data, dict) or data.get("type") not in BLOCKS:
            raise ValueError(f"not a composition block: {data!r}; expected {{'type': one of {sorted(BLOCKS)}, "
                             "'children': [...]}")
        children = [c["children"][0] if c.get("type") == "single" else Block.from_dict(c) for c in data["children"]]
        return BLOCKS[data["type"]](*children, **data.get("kwargs", {}))


class Stack(Block):
    """Each child transforms the output of the one before (AdapterHub's Stack)."""


class Parallel(Block):
    """The same input through every child: the batch is repeated len(children) times, copy i through child i."""

    @property
    def copies(self) -> int:
        return len(self.children)


class Fuse(Block):
    """AdapterFusion over the children's outputs; its trainable attention is the fusion adapter `name`
    (added with DeltaModel.add_fusion, by default named after the children: 'a,b')."""

    options = ("name",)

    def __init__(self, *children: Setup, name: str | None = None):
        super().__init__(*children)
        self.name = name or ",".join(c if isinstance(c, str) else c.last() for c in self.children)


class Split(Block):
    """Child i takes the next splits[i] tokens of every sequence (sum(splits) = sequence length)."""

    options = ("splits",)

    def __init__(self, *children: Setup, splits: int | Sequence[int]):
        super().__init__(*children)
        self.splits = _sizes(splits, len(self.children), "splits")


class BatchSplit(Block):
    """Child i takes the next batch_sizes[i] rows of the batch (sum(batch_sizes) = batch size)."""

    options = ("batch_sizes",)

    def __init__(self, *children: Setup, batch_sizes: int | Sequence[int]):
        super().__init__(*children)
        self.batch_sizes = _sizes(batch_sizes, len(self.children), "batch_sizes")


class Average(Block):
    """Σ wᵢ · (child i's output); weights default to uniform and are normalised to sum 1 unless told not to."""

    options = ("weights",)

    def __init__(self, *children: Setup, weights: Sequence[float] | None = None, normalize_weights: bool = True):
        super().__init__(*children)
        w = [1.0] * len(self.children) if weights is None else [float(v) for v in weights]
        if len(w) != len(self.children):
            raise ValueError(f"Average has {len(self.children)} children but {len(w)} weights")
        if normalize_weights or weights is None:
            total = sum(w)
            if total == 0:
                raise ValueError(f"Average weights {w} sum to 0: they cannot be normalised")
            w = [v / total for v in w]
        self.weights = w


BLOCKS: dict[str, type[Block]] = {b.__name__: b for b in (Stack, Parallel, Fuse, Split, BatchSplit, Average)}

# Which children each block may hold ("single": an adapter name). As AdapterHub's table, less MultiTask
# (a BatchSplit behind a sort: deltatune's mixed batches do that per row already).
ALLOWED_NESTINGS: dict[type[Block], tuple[type, ...]] = {
    Stack: (str, Stack, Fuse, Split, Parallel, BatchSplit, Average),
    Fuse: (str, Stack),
    Split: (str, Split, Stack, BatchSplit, Average),
    Parallel: (str, Stack, BatchSplit, Average),
    BatchSplit: (str, Stack, Split, BatchSplit, Average),
    Average: (str, Stack, Split, BatchSplit),
}


def _child(c: Any) -> Setup:
    if isinstance(c, (str, Block)):
        return c
    raise TypeError(f"a composition child must be an adapter name or a block, got {c!r}")


def _sizes(sizes: int | Sequence[int], n: int, what: str) -> list[int]:
    out = [int(sizes)] * n if isinstance(sizes, int) else [int(s) for s in sizes]
    if len(out) != n or any(s < 0 for s in out):
        raise ValueError(f"{what}={sizes!r} must give one size >= 0 per child ({n} children)")
    return out


def validate(block: Block, depth: int = 0) -> None:
    """Raise a clear error for a nesting the table does not allow (or nested Parallels)."""
    for child in block:
        kind = type(child)
        if kind not in ALLOWED_NESTINGS[type(block)]:
            allowed = ", ".join("an adapter name" if t is str else t.__name__ for t in ALLOWED_NESTINGS[type(block)])
            raise ValueError(f"cannot nest {kind.__name__} inside {type(block).__name__} ({block!r}); "
                             f"{type(block).__name__} may hold: {allowed}")
        if isinstance(child, Block):
            if isinstance(child, Parallel) and depth > 0:
                raise ValueError(f"{child!r}: a Parallel block must be at the top of the setup or right under it")
            validate(child, depth + 1)
    if isinstance(block, Parallel) and any(isinstance(c, Block) and c.copies > 1 for c in block):
        raise ValueError(f"{block!r}: Parallel blocks cannot be nested")


def parse(setup: Any) -> Block:
    """A setup as a validated block: a name or a list of names is a Stack (set_active's old forms)."""
    if isinstance(setup, str):
        return Stack(setup)
    if isinstance(setup, Block):
        validate(Stack(setup) if not isinstance(setup, Stack) else setup)
        return setup
    if isinstance(setup, dict):
        return parse(Block.from_dict(setup))
    if isinstance(setup, Sequence) and setup and all(isinstance(s, (str, Block)) for s in setup):
        return parse(Stack(*setup))
    raise TypeError(f"cannot read {setup!r} as an adapter setup: give an adapter name, a list of names (a Stack) "
                    f"or a block ({', '.join(BLOCKS)})")
