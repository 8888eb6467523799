"""Merge operators over one or more task vectors of one base: TA, trim, TIES, DARE, breadcrumbs.

A configuration is a `Merge` (how the task vectors Δ_1..Δ_n become one merged Δ, M) and a
global α (mergekit's λ), optionally scaled per module (regex rules) and per layer (a
schedule). Output = θ1 + α_eff·M, float32, rounded once. M follows mergekit's
generalized task arithmetic step for step, in the same float32 operation order, so its
bits equal mergekit's wherever both keep the same elements:

    d_i = sparsify(Δ_i)                       magnitude (trim/TIES), random (DARE), breadcrumbs
    d_i = w_i · d_i                           per-vector weight (float32)
    consensus (TIES): s = Σ_i d_i; keep d_i only where sign(d_i) = (s ≥ 0 ? +1 : −1)
    M = Σ_i d_i [/ Σ_i w_i·kept_i if normalize]          (TIES normalises by default)

Everything after sparsify is elementwise, so a chunk of rows is computed on its own. The
sparsifiers are elementwise given a per-tensor cut (`select.Cut`, from a streaming radix
select) or a per-element hash (DARE, `kernels.dare_keep`). Differences from mergekit:
magnitude ties are kept in index order (mergekit: arbitrary, non-stable argsort); DARE
rescales kept elements by 1/(1 − p), computed in float64 and rounded once, as in the DARE
paper (mergekit's `rescale` matches L1 norms of the whole tensor instead) and draws its
mask from the hash, not torch's RNG.

Vocabulary tensors whose rows differ between the task vectors (--vocab intersect,
`shared_vectors`) are merged over the rows all share: the magnitude cut, the sign election and
the weights see only those rows, DARE hashes the same flat indices, the other rows stay θ1.

Reads of each input per tensor (a tensor that fits one chunk is always read once):
  task_arithmetic, dare_linear, dare_ties: 1 pass.
  trim, ties, breadcrumbs(_ties): 3 passes (2 to select, 1 to write; + 1 chunk when
  magnitude ties straddle the cut). All configurations of a run share the passes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch

from tvtool.merge import kernels
from tvtool.errors import MismatchError, OptionsError
from tvtool.io.layout import is_vocab_tensor
from tvtool.merge.topk import Cut, count_keep, top_cuts

Method = Literal["task_arithmetic", "trim", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties"]
#              sparsify, consensus, normalize by default
METHODS = {"task_arithmetic": (None, False, False), "trim": ("magnitude", False, False),
           "ties": ("magnitude", True, True), "dare_linear": ("random", False, False),
           "dare_ties": ("random", True, False), "breadcrumbs": ("breadcrumbs", False, False),
           "breadcrumbs_ties": ("breadcrumbs", True, False)}
LAYER = r"(?:^|\.)layers\.(\d+)\."


@dataclass(frozen=True)
class Merge:
    """How n task vectors become one Δ. Per-vector values may be one number or a tuple of n."""

    method: Method = "task_arithmetic"
    weights: tuple[float, ...] | float = 1.0  # w_i (mergekit `weight`)
    density: tuple[float, ...] | float = 1.0  # trim/TIES: fraction of |Δ_i| kept, in (0, 1]
    p: tuple[float, ...] | float = 0.0  # DARE: drop probability, in [0, 1)
    beta: float = 0.0  # breadcrumbs: largest fraction of |Δ_i| dropped
    gamma: float = 0.0  # breadcrumbs: smallest fraction of |Δ_i| dropped
    seed: int = 0  # DARE mask seed
    normalize: bool | None = None  # divide by the summed weights (None: the method's default)

    def per(self, field_name: str, n: int) -> tuple[float, ...]:
        v = getattr(self, field_name)
        vals = tuple(float(x) for x in v) if isinstance(v, (tuple, list)) else (float(v),) * n
        if len(vals) != n:
            raise OptionsError(f"merge {field_name} has {len(vals)} values for {n} task vectors",
                               where=f"merge.{field_name}", fix="give one value, or one per task vector")
        return vals

    def check(self, n: int) -> None:
        """Raise OptionsError on a bad setting, naming the field."""
        if self.method not in METHODS:
            raise OptionsError(f"unknown merge method {self.method!r}", where="merge.method",
                               fix=f"use one of {', '.join(METHODS)}")
        sp = METHODS[self.method][0]
        for w in self.per("weights", n):
            if not math.isfinite(w):
                raise OptionsError(f"weight must be finite, got {w}", where="merge.weights")
        for d in self.per("density", n):
            if not 0.0 < d <= 1.0:
                raise OptionsError(f"density must be in (0, 1], got {d}", where="merge.density",
                                   fix="density is the fraction of each Δ kept, e.g. 0.2")
        for p in self.per("p", n):
            if not 0.0 <= p < 1.0:
                raise OptionsError(f"DARE drop probability p must be in [0, 1), got {p}", where="merge.p",
                                   fix="p is the fraction of Δ dropped, e.g. 0.9")
        if sp == "breadcrumbs" and not (0 <= self.beta and 0 <= self.gamma and self.beta + self.gamma < 1):
            raise OptionsError(f"breadcrumbs needs beta, gamma ≥ 0 with beta + gamma < 1, got {self.beta}, "
                               f"{self.gamma}", where="merge.beta", fix="e.g. beta 0.01, gamma 0.1")

    @property
    def normalized(self) -> bool:
        return METHODS[self.method][2] if self.normalize is None else self.normalize

    def passes(self, numel: int, chunk: int = 1 << 23) -> int:
        """Reads of each input for a tensor of `numel` elements read in `chunk`-element chunks."""
        return 1 if METHODS[self.method][0] in (None, "random") or numel <= chunk else 3


@dataclass(frozen=True)
class LayerSchedule:
    """α factor per layer: linear from `first` (layer 0) to `last` (the last layer), or `values`."""

    first: float = 1.0
    last: float = 1.0
    values: tuple[float, ...] = ()  # explicit factor per layer (overrides first/last)
    pattern: str = LAYER  # regex whose group 1 is the layer index
    other: float = 1.0  # factor of tensors outside the layers (embeddings, final norm, lm_head)

    def factors(self, names: Sequence[str]) -> dict[str, float]:
        rx = re.compile(self.pattern)
        layer = {n: int(m.group(1)) for n in names if (m := rx.search(n))}
        if not layer:
            raise OptionsError(f"the layer schedule names no layer: no tensor name matches {self.pattern!r}",
                               where="schedule.pattern", fix="give a pattern whose group 1 is the layer index")
        n_layers = max(layer.values()) + 1
        if self.values and len(self.values) != n_layers:
            raise OptionsError(f"the layer schedule has {len(self.values)} values for {n_layers} layers",
                               where="schedule.values", fix=f"give {n_layers} values, or first/last")

        def f(i):
            if self.values:
                return float(self.values[i])
            return self.first if n_layers == 1 else self.first + (self.last - self.first) * i / (n_layers - 1)

        return {n: f(layer[n]) if n in layer else self.other for n in names}


@dataclass(frozen=True)
class Config:
    """One output: merge, global α (λ), per-module rules (first matching regex → factor), schedule."""

    merge: Merge = field(default_factory=Merge)
    alpha: float = 1.0
    rules: tuple[tuple[str, float], ...] = ()
    schedule: LayerSchedule | None = None

    def alphas(self, names: Sequence[str]) -> dict[str, float]:
        """α_eff per tensor: α · rule factor · layer factor (unmatched rules: factor 1)."""
        rules = []
        for rx, a in self.rules:
            try:
                rules.append((re.compile(rx), float(a)))
            except re.error as e:
                raise OptionsError(f"bad regex in α rules: {e}", where=rx) from None
        layer = self.schedule.factors(names) if self.schedule else {}
        out = {}
        for n in names:
            a = self.alpha
            r = next((f for rx, f in rules if rx.search(n)), None)
            a = a if r is None else a * r
            out[n] = a if n not in layer or layer[n] == 1.0 else a * layer[n]
        return out


def check_vectors(shapes: Sequence[dict[str, tuple[int, ...]]], *, vocab: str = "error",
                  base_rows: dict[str, int] | None = None, where: Sequence[str] = ()) -> dict[str, int]:
    """Task vectors must have the same tensor names and shapes (one architecture), save the rows of
    vocabulary tensors (embed_tokens, lm_head) under the vocab policy of one pair (`taskvector._pair`):
    "error" refuses different row counts; "intersect" returns {tensor: rows shared by every vector
    and the base (`base_rows`)} for each vocab tensor some vector has more rows of (the merge runs
    over those rows; the others keep θ1). `where[i]`: vector i's source, named in errors."""
    for i, s in enumerate(shapes[1:], 1):
        if set(s) != set(shapes[0]):
            diff = sorted(set(s) ^ set(shapes[0]))
            raise MismatchError(f"task vectors 1 and {i + 1} have different tensors, e.g. {diff[:3]}",
                                fix="merge only task vectors of one architecture from one base")
    shared = {}
    for n, first in shapes[0].items():
        got = [tuple(s[n]) for s in shapes]
        bad = next((i for i, g in enumerate(got) if g != tuple(first)), None)
        if is_vocab_tensor(n) and first and all(g and g[1:] == tuple(first[1:]) for g in got):
            if bad is not None and vocab != "intersect":
                raise MismatchError(f"vocabulary size differs for tensor {n!r}: task vector 1 has {first[0]} rows, "
                                    f"task vector {bad + 1} {got[bad][0]}",
                                    where=where[bad] if len(where) > bad else None,
                                    fix="pass --vocab intersect to merge over the rows all task vectors share "
                                        "(the other rows keep the base's values)")
            rows = [g[0] for g in got] + ([base_rows[n]] if vocab == "intersect" and n in (base_rows or {}) else [])
            if min(rows) < max(g[0] for g in got):
                shared[n] = min(rows)
        elif bad is not None:
            raise MismatchError(f"task vectors 1 and {bad + 1} differ in the shape of {n!r}: "
                                f"{tuple(first)} vs {got[bad]}",
                                fix="merge only task vectors of one architecture from one base")
    return shared


def shared_vectors(vectors: Sequence, *, vocab: str = "error", base_rows: dict[str, int] | None = None,
                   where: Sequence[str] = ()) -> list:
    """The task vectors, each seen over the vocabulary rows they all share (`check_vectors`;
    `TaskVector.shared`): what every operator then runs over. Rows keep their flat indices (row
    r of a tensor is element r·row_size onward in every vector), so DARE masks, which hash
    (seed, name, flat index), are those of the same rows without the policy; the magnitude
    cut of trim/TIES is taken over the shared rows (density of the elements that are merged)."""
    rows = check_vectors([{n: v.shape(n) for n in v.names()} for v in vectors], vocab=vocab, base_rows=base_rows,
                         where=where)
    return [v.shared(rows) if rows else v for v in vectors]


@dataclass
class Prepared:
    """One tensor's cuts: cuts[merge][vector] = (cut_a, cut_b) (keep = in a and not in b)."""

    name: str
    shape: tuple[int, ...]
    cuts: dict[Merge, list[tuple[Cut, Cut | None]]]

    @property
    def row_size(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1


def prepare(merges: Sequence[Merge], *, name: str, shape: tuple[int, ...], n_vectors: int,
            ranges: list[tuple[int, int]], read: Callable[[int, int], list[torch.Tensor]]) -> Prepared:
    """Run the selection passes all `merges` need on tensor `name` (none for TA and DARE).

    `read(start, stop)` gives the float32 Δ_i rows of every vector; `ranges` its row chunks.
    """
    numel = math.prod(shape) if shape else 1
    want: dict[Merge, list[tuple[int, int | None]]] = {}
    for m in dict.fromkeys(merges):
        sp = METHODS[m.method][0]
        if sp == "magnitude":
            want[m] = [(count_keep(d, numel), None) for d in m.per("density", n_vectors)]
        elif sp == "breadcrumbs":
            top, bot = int(m.beta * numel), int(m.gamma * numel)
            want[m] = [(numel - bot, top if top else None)] * n_vectors
    ks = [sorted({k for w in want.values() for pair in [w[v]] for k in pair if k is not None})
          for v in range(n_vectors)]
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    found = top_cuts(ks=ks, numel=numel, ranges=ranges, row_size=row, read=read) if any(ks) else [[]] * n_vectors
    cut = [dict(zip(ks[v], found[v])) for v in range(n_vectors)]
    cuts = {m: [(cut[v][a], cut[v][b] if b is not None else None) for v, (a, b) in enumerate(w)]
            for m, w in want.items()}
    return Prepared(name, tuple(shape), cuts)


def merged_delta(m: Merge, prep: Prepared, deltas: list[torch.Tensor], start_row: int) -> torch.Tensor:
    """M for rows [start_row, start_row + rows) from the float32 Δ_i rows (or one `kernels.PairRows`),
    in mergekit's order."""
    n = len(deltas)
    sp, consensus, _ = METHODS[m.method]
    w = m.per("weights", n)
    if sp is None and n == 1 and w[0] == 1.0 and not m.normalized:  # θ1 + α·Δ exactly as the plain path
        return deltas[0].delta() if isinstance(deltas[0], kernels.PairRows) else deltas[0]
    flat = start_row * prep.row_size
    if sp in (None, "magnitude", "random"):
        cuts = [prep.cuts[m][v][0] for v in range(n)] if sp == "magnitude" else None
        dare = [(kernels.tensor_key(m.seed, prep.name), int(p * 2.0**53), 1.0 - p) for p in m.per("p", n)] \
            if sp == "random" else None
        fused = kernels.combine(deltas=deltas, weights=w, cuts=cuts, dare=dare, flat_start=flat, consensus=consensus,
                                normalized=m.normalized)
        if fused is not None:  # the torch expression below, bit for bit, in one pass
            return fused
    deltas = [d.delta() if isinstance(d, kernels.PairRows) else d for d in deltas]
    ds = []
    for v, d in enumerate(deltas):
        if sp in ("magnitude", "breadcrumbs"):
            a, b = prep.cuts[m][v]
            keep = a.keep(d, flat)
            if b is not None:
                keep &= ~b.keep(d, flat)
            d = d * keep.to(d.dtype)  # mergekit: tensor * mask (dropped negatives become −0.0)
        elif sp == "random":
            p = m.per("p", n)[v]
            if p > 0:
                keep = kernels.dare_keep(seed=m.seed, name=prep.name, p=p, flat_start=flat, shape=d.shape)
                d = (d * keep.to(d.dtype)).double().div_(1.0 - p).float()  # Δ/(1−p), rounded once
        ds.append(d)
    deltas_ = torch.stack(ds)  # [n, rows, ...]
    weights = torch.tensor(w, dtype=deltas_.dtype)
    while deltas_.dim() > weights.dim():
        weights.unsqueeze_(-1)
    deltas_.mul_(weights)
    if consensus:  # mergekit get_mask(method="sum"), mask dtype float32
        sign = deltas_.sign()
        majority = (deltas_.sum(dim=0) >= 0).to(deltas_.dtype) * 2 - 1
        mask = sign == majority
        mixed = (deltas_ * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas_.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if m.normalized:
        mixed /= divisor
    return mixed


def outputs(configs: Sequence[Config], alphas: Sequence[float], prep: Prepared, *, base_rows: torch.Tensor,
            deltas: list[torch.Tensor], start_row: int, dtype: torch.dtype,
            base32: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Every configuration's output rows for one chunk: θ1 + α_eff·M, rounded once to `dtype`.

    `alphas[j]` is configuration j's α_eff for this tensor (`Config.alphas(names)[name]`).
    M is computed once per distinct Merge; the α of one Merge go through one fused kernel.
    """
    out: list[torch.Tensor | None] = [None] * len(configs)
    for m in dict.fromkeys(c.merge for c in configs):
        idx = [j for j, c in enumerate(configs) if c.merge == m]
        delta = merged_delta(m, prep, deltas, start_row)
        res = kernels.merge_many(base=base_rows, delta=delta, alphas=[alphas[j] for j in idx], dtype=dtype,
                                 base32=base32)
        for j, r in zip(idx, res):
            out[j] = r
    return out


class MergedVector:
    """A lazy task vector M = merge(Δ_1, …, Δ_n): `rows`/`get` like `TaskVector`, `* α` scales.

    Cuts are computed per tensor on first use (the selection passes) and cached, so rows can
    be read in any order and any chunking with the same result.
    """

    def __init__(self, vectors: Sequence, merge: Merge, *, scale: float = 1.0, vocab: str = "error", _cache=None):
        if not vectors:
            raise OptionsError("no task vectors to merge", where="vectors")
        vectors = shared_vectors(vectors, vocab=vocab)  # vocab intersect: M over the shared rows
        merge.check(len(vectors))
        self.vectors, self.merge, self.scale = list(vectors), merge, float(scale)
        self._cache = {} if _cache is None else _cache

    def names(self) -> list[str]:
        return self.vectors[0].names()

    def __contains__(self, name: str) -> bool:
        return name in self.vectors[0]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.vectors[0].shape(name))

    def __mul__(self, alpha: float) -> "MergedVector":
        return MergedVector(self.vectors, self.merge, scale=self.scale * float(alpha), _cache=self._cache)

    __rmul__ = __mul__

    def prepared(self, name: str) -> Prepared:
        if name not in self._cache:
            from tvtool.io.safetensors_io import row_chunks

            shape = self.shape(name)
            self._cache[name] = prepare([self.merge], name=name, shape=shape, n_vectors=len(self.vectors),
                                        ranges=row_chunks(shape),
                                        read=lambda s, e: [v.rows(name, s, e) for v in self.vectors])
        return self._cache[name]

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """float32 rows [start, stop) of scale · M[name]."""
        m = merged_delta(self.merge, self.prepared(name), [v.rows(name, start, stop) for v in self.vectors], start)
        return m if self.scale == 1.0 else m * self.scale

    def get(self, name: str) -> torch.Tensor:
        return self.rows(name)
