"""Exact per-tensor magnitude ranks from a stream of row chunks (radix select on float bits).

For x ≥ 0, the IEEE-754 bits of a float32 are monotone as unsigned integers, so the k-th
largest |Δ| is found with two histograms of the 31 bits of |Δ|: pass 1 counts the high 16
bits (65536 bins) and finds the bin holding rank k; pass 2 counts the low 16 bits of the
elements in that bin and finds the exact value t. Memory: 512 KB per histogram, never the
tensor.

Ties. Elements are ordered by (|Δ| descending, flat row-major index ascending) and the top
k are kept, so exactly k elements survive: all with |Δ| > t and the first k − #(|Δ| > t)
with |Δ| = t in index order. The cut is stored as (t, last kept index of the ties), so any
chunk, slice or worker decides membership from its own elements. To find that index,
pass 2 also keeps per-chunk counts of the bin's low bits, and one chunk is read again
(only when the ties straddle the cut). mergekit sorts the whole tensor with a non-stable
`torch.argsort`, so it keeps an arbitrary k of the tied elements; the two tools agree
everywhere else (tests/test_mergekit_operators.py counts the tied elements that differ).
NaN sorts above +inf (its bits are larger), as in torch's descending sort.

Cost in reads of Δ: 1 when the tensor fits one chunk (it is kept), else 2 passes
(+ 1 chunk when ties straddle the cut). Several ranks of one tensor share the passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from tvtool.merge import kernels

ALL = -1  # Cut.key for "keep everything"


@dataclass(frozen=True)
class Cut:
    """Keep element e iff bits(|Δ_e|) > key, or == key and e ≤ last_tie (flat index)."""

    key: int
    last_tie: int

    def keep(self, x: torch.Tensor, flat_start: int) -> torch.Tensor:
        """Bool mask [x.shape] of kept elements of the rows starting at flat index `flat_start`."""
        if self.key == ALL:
            return torch.ones(x.shape, dtype=torch.bool)
        return kernels.keep_by_cut(x, flat_start, self.key, self.last_tie)


KEEP_ALL = Cut(ALL, -1)
KEEP_NONE = Cut(1 << 32, -1)  # no 31-bit value exceeds it


def top_cuts(*, ks: list[list[int]], numel: int, ranges: list[tuple[int, int]], row_size: int,
             read: Callable[[int, int], list[torch.Tensor]]) -> list[list[Cut]]:
    """For each vector v and each k in ks[v]: the Cut keeping the top k elements of |x_v|.

    `read(start, stop)` returns the float32 rows [start, stop) of every vector (one read
    serves all of them); `ranges` are the row chunks and `row_size` the elements per row.
    """
    nv = len(ks)
    out: list[dict[int, Cut]] = [{} for _ in range(nv)]
    for v in range(nv):
        for k in ks[v]:
            if k >= numel:
                out[v][k] = KEEP_ALL
            elif k <= 0:
                out[v][k] = KEEP_NONE
    todo = [sorted(k for k in set(ks[v]) if k not in out[v]) for v in range(nv)]
    if not any(todo):
        return [[out[v][k] for k in ks[v]] for v in range(nv)]
    cache = {}

    def chunks():
        if len(ranges) == 1:  # one chunk: read once, keep it for the next pass
            if not cache:
                cache[0] = read(*ranges[0])
            yield ranges[0][0] * row_size, cache[0]
            return
        for s, e in ranges:
            yield s * row_size, read(s, e)

    def chunk(i):
        return cache[0] if cache else read(*ranges[i])

    hist = np.zeros((nv, kernels.N_BINS), dtype=np.int64)
    for _, xs in chunks():  # pass 1: high 16 bits
        for v in range(nv):
            if todo[v]:
                kernels.hist_hi(xs[v], hist[v])
    above = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # above[v, b] = #elements with high bits ≥ b
    # the bin holding rank k (1-based from the top): the largest b with above[b] ≥ k
    bins = [{k: int(np.nonzero(above[v] >= k)[0][-1]) for k in todo[v]} for v in range(nv)]
    slots = [sorted(set(bins[v].values())) for v in range(nv)]
    slot_of = np.full((nv, kernels.N_BINS), -1, dtype=np.int32)
    for v in range(nv):
        slot_of[v, slots[v]] = np.arange(len(slots[v]), dtype=np.int32)
    per_chunk = []  # per chunk, per vector: [slot, low bits] counts (for locating the tie cut)
    for _, xs in chunks():  # pass 2: low 16 bits inside the target bins
        hs = [np.zeros((len(slots[v]), kernels.N_BINS), dtype=np.int32) for v in range(nv)]  # chunks < 2³¹
        for v in range(nv):
            if todo[v]:
                kernels.hist_lo(xs[v], slot_of[v], hs[v])
        per_chunk.append(hs)
    for v in range(nv):
        total = sum(hs[v].astype(np.int64) for hs in per_chunk)
        for k in todo[v]:
            b = bins[v][k]
            sl = slots[v].index(b)
            greater_bins = int(above[v, b + 1]) if b + 1 < kernels.N_BINS else 0
            lo_above = np.cumsum(total[sl][::-1])[::-1]  # within the bin: #elements with low bits ≥ l
            lo = int(np.nonzero(greater_bins + lo_above >= k)[0][-1])
            key = (b << 16) | lo
            greater = greater_bins + (int(lo_above[lo + 1]) if lo + 1 < kernels.N_BINS else 0)
            need, equal = k - greater, int(total[sl][lo])  # keep the first `need` of `equal` ties
            if need == equal:
                out[v][k] = Cut(key, numel)
                continue
            seen = 0
            for i, hs in enumerate(per_chunk):
                c = int(hs[v][sl][lo])
                if seen + c >= need:  # the need-th tie is in this chunk: read it once more
                    pos = kernels.nth_equal(chunk(i)[v], key, need - seen - 1)
                    out[v][k] = Cut(key, ranges[i][0] * row_size + pos)
                    break
                seen += c
    return [[out[v][k] for k in ks[v]] for v in range(nv)]


def count_keep(density: float, numel: int) -> int:
    """mergekit's k for a magnitude trim: max(1, ⌊density·n⌋) (density < 1), all for density ≥ 1."""
    return numel if density >= 1 else max(1, int(density * numel))
