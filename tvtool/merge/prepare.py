"""The passes an operator needs over a tensor before its chunks are merged: one shared exact top-k, statistics.

`prepare` runs, per tensor, one streamed exact top-k (`tvtool.merge.topk`) for every operator's magnitude
ranks (`Operator.ranks`: trim, TIES, breadcrumbs share the passes), then each operator's own `prepare`
(della's rescale sums, slerp's norms and dot product). The merge stream and `MergedVector` use it alike.

`Blocks` makes such statistics independent of how a tensor is read: the stream reads row chunks (8M
elements), the in-engine load whole tensors, and a float32 reduction depends on how its terms are
grouped. So statistics are reduced over fixed blocks of `BLOCK` elements of the tensor's flat order (what
mergekit's slerp does), and the block results combined in block order: the same bytes on disk and in
the engine, and for a tensor of one block, mergekit's own reduction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

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


BLOCK = 1 << 20  # elements per block of a per-tensor reduction (mergekit's slerp scratch size)


class Blocks:
    """Per-block results of a reduction over fixed blocks of `BLOCK` elements in a tensor's flat order.

    Feed the flat pieces of one or more same-shaped arrays (e.g. θ1 and θ2) in flat order, in any
    chunking; `fn(*block_arrays)` runs on each full block and, at `close()`, on the last partial one.
    Memory: at most one block per array beyond the piece being fed."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn, self.parts, self.n, self.out = fn, [], 0, []

    def feed(self, *pieces: torch.Tensor) -> None:
        self.parts.append([p.reshape(-1) for p in pieces])
        self.n += pieces[0].numel()
        while self.n >= BLOCK:
            self._emit(BLOCK)

    def close(self) -> list:
        if self.n:
            self._emit(self.n)
        return self.out

    def _emit(self, k: int) -> None:
        take, rest, got = [], [], 0
        for arrays in self.parts:
            m = arrays[0].numel()
            if got >= k:
                rest.append(arrays)
            elif got + m <= k:
                take.append(arrays)
            else:  # split this piece at the block's end
                cut = k - got
                take.append([a[:cut] for a in arrays])
                rest.append([a[cut:] for a in arrays])
            got += m
        block = [torch.cat(col) if len(col) > 1 else col[0] for col in zip(*take)]
        self.out.append(self.fn(*block))
        self.parts, self.n = rest, self.n - k


__all__ = ["BLOCK", "Blocks", "Prepared", "prepare"]
