"""The passes an operator needs over a tensor before its chunks are merged: one shared exact top-k, statistics.

`prepare` runs, per tensor, one streamed exact top-k (`tvtool.merge.topk`) for every operator's magnitude
ranks (`Operator.ranks`: trim, TIES, breadcrumbs share the passes), then each operator's own `prepare`
(della's rescale sums, slerp's norms and dot product). The merge stream and `MergedVector` use it alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from tvtool.merge.registry import Operator, Read, TensorInfo
from tvtool.merge.topk import top_cuts


@dataclass
class Prepared:
    """One tensor's per-operator state (magnitude cuts, statistics), computed before its chunks."""

    tensor: TensorInfo
    states: dict[Operator, Any]

    @property
    def name(self) -> str:
        return self.tensor.name


def prepare(ops: Sequence[Operator], *, tensor: TensorInfo, ranges: list[tuple[int, int]], read: Read) -> Prepared:
    """Run the passes every operator in `ops` needs over `tensor` before its chunks: one shared exact
    top-k pass for all their magnitude ranks (`Operator.ranks`, `tvtool.merge.topk`), then each one's own
    `prepare` (none for task arithmetic and DARE). `read(start, stop)` gives the rows of row chunk
    [start, stop) (`ranges`)."""
    ops, n = list(dict.fromkeys(ops)), tensor.n_vectors
    want = {op: w for op in ops if (w := op.ranks(tensor)) is not None}
    ks = [sorted({k for w in want.values() for k in w[v] if k is not None}) for v in range(n)]
    found = top_cuts(ks=ks, numel=tensor.numel, ranges=ranges, row_size=tensor.row_size,
                     read=lambda s, e: read(s, e).deltas) if any(ks) else [[]] * n
    cut = [dict(zip(ks[v], found[v])) for v in range(n)]
    states = {}
    for op in ops:
        cuts = [(cut[v][a], cut[v][b] if b is not None else None) for v, (a, b) in enumerate(want[op])] \
            if op in want else None
        states[op] = op.prepare(tensor, cuts, ranges, read)
    return Prepared(tensor, states)


__all__ = ["Prepared", "prepare"]
