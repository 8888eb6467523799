"""Generalized task arithmetic (mergekit's), the family most operators belong to: θ1 + α·M with

    d_i = sparsify(Δ_i)                       the operator's: magnitude (trim/TIES), random (DARE), …
    d_i = w_i · d_i                           per-vector weight (float32)
    consensus (TIES): s = Σ_i d_i; keep d_i only where sign(d_i) = (s ≥ 0 ? +1 : −1)
    M = Σ_i d_i [/ Σ_i w_i·kept_i if normalize]

in mergekit's float32 operation order, so M's bits equal mergekit's wherever both keep the same
elements. Everything after sparsify is elementwise, so a chunk of rows is computed on its own; the
sparsifiers are elementwise given per-tensor state (a magnitude cut from `tvtool.merge.topk`, a hash
mask). `kernels.combine` computes M in one pass, bit for bit this torch expression, where it applies.

The settings several operators share are defined here, once (their order is the records' order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Sequence

import torch

from tvtool.errors import OptionsError
from tvtool.merge import kernels
from tvtool.merge.registry import Operator, Rows, Setting, TensorInfo
from tvtool.merge.topk import count_keep

PerVector = float | tuple[float, ...]

WEIGHTS = Setting("weights", (), "Weight w_i of each task vector (mergekit `weight`); () = 1 each. Set by "
                                 "--vector MODEL:WEIGHT (recipes: vectors[].weight).", tuple[float, ...], option=False)
DENSITY = Setting("density", 1.0, "fraction of |Δ| kept per tensor, in (0, 1] (Long-to-Short: 1 − k).",
                  per_vector=True)
P = Setting("p", 0.0, "drop probability p in [0, 1); kept entries are rescaled by 1/(1 − p).", per_vector=True,
            flag="--drop-p")
BETA = Setting("beta", 0.0, "largest fraction of |Δ| dropped per tensor.")
GAMMA = Setting("gamma", 0.0, "smallest fraction of |Δ| dropped per tensor.")
SEED = Setting("seed", 0, "mask seed (the mask is a hash of seed, tensor name and element index; --seed of eval "
                          "shuffles problems).", int, flag="--drop-seed")
NORMALIZE = Setting("normalize", None, "Divide M by the summed weights (None: the operator's default).", bool | None,
                    option=False)


def as_delta(d) -> torch.Tensor:
    """Float32 Δ rows from Δ rows or a `kernels.PairRows` (formed from θ1/θ2 rows)."""
    return d.delta() if isinstance(d, kernels.PairRows) else d


@dataclass(frozen=True)
class GTA(Operator):
    """The generalized task arithmetic family: subclasses choose the sparsifier (`sparsify`, and `fused`
    for `kernels.combine`), `consensus` and `normalize_default`."""

    weights: tuple[float, ...] = WEIGHTS.field()
    normalize: bool | None = NORMALIZE.field()
    consensus: ClassVar[bool] = False
    normalize_default: ClassVar[bool] = False

    def __post_init__(self):
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))

    @property
    def normalized(self) -> bool:
        return self.normalize_default if self.normalize is None else self.normalize

    def per(self, name: str, n: int) -> tuple[float, ...]:
        """Setting `name` per task vector (weights: () = 1 each)."""
        v = getattr(self, name)
        s = next(f for f in _settings(self) if f.name == name)
        return s.values(v if v != () else 1.0, n)

    def check(self, n_vectors: int) -> None:
        for w in self.per("weights", n_vectors):
            if not math.isfinite(w):
                raise OptionsError(f"weight must be finite, got {w}", where="merge.weights")

    # -- the per-chunk math ------------------------------------------------------------------------
    def fused(self, state: Any, tensor: TensorInfo, n: int) -> dict | None:
        """`kernels.combine`'s selection arguments (`cuts=` or `dare=`), {} for none; None: no fused kernel."""
        return None

    def sparsify(self, v: int, d: torch.Tensor, state: Any, tensor: TensorInfo, flat: int) -> torch.Tensor:
        """Vector v's kept Δ rows (float32) starting at flat index `flat`, in mergekit's order."""
        return d

    def merged(self, state: Any, rows: Rows, tensor: TensorInfo) -> torch.Tensor:
        """M for the rows [start, start + rows) from the float32 Δ_i rows (or one `kernels.PairRows`)."""
        deltas, n = rows.deltas, len(rows.deltas)
        w = self.per("weights", n)
        flat = rows.start * tensor.row_size
        args = self.fused(state, tensor, n)
        if args is not None:
            fused = kernels.combine(deltas=deltas, weights=w, flat_start=flat, consensus=self.consensus,
                                    normalized=self.normalized, **args)
            if fused is not None:  # the torch expression below, bit for bit, in one pass
                return fused
        ds = [self.sparsify(v, as_delta(d), state, tensor, flat) for v, d in enumerate(deltas)]
        deltas_ = torch.stack(ds)  # [n, rows, ...]
        weights = torch.tensor(w, dtype=deltas_.dtype)
        while deltas_.dim() > weights.dim():
            weights.unsqueeze_(-1)
        deltas_.mul_(weights)
        if self.consensus:  # mergekit get_mask(method="sum"), mask dtype float32
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
        if self.normalized:
            mixed /= divisor
        return mixed

    def outputs(self, state: Any, rows: Rows, tensor: TensorInfo, alphas: Sequence[float],
                dtype: torch.dtype) -> list[torch.Tensor]:
        """θ1 + α·M for every α: M once, then all α through one fused kernel (one rounding each)."""
        m = self.merged(state, rows, tensor)  # [rows, ...] fp32
        return kernels.merge_many(base=rows.base, delta=m, alphas=alphas, dtype=dtype, base32=rows.base32)


@dataclass(frozen=True)
class Magnitude(GTA):
    """Keep the top `density` of |Δ_i| per tensor (ties in index order): trim, TIES."""

    density: PerVector = DENSITY.field()
    tag_fields: ClassVar[tuple[tuple[str, str], ...]] = (("d", "density"),)

    def check(self, n_vectors: int) -> None:
        super().check(n_vectors)
        for d in self.per("density", n_vectors):
            if not 0.0 < d <= 1.0:
                raise OptionsError(f"density must be in (0, 1], got {d}", where="merge.density",
                                   fix="density is the fraction of each Δ kept, e.g. 0.2")

    def ranks(self, tensor: TensorInfo) -> list[tuple[int, int | None]]:
        return [(count_keep(d, tensor.numel), None) for d in self.per("density", tensor.n_vectors)]

    def fused(self, state, tensor: TensorInfo, n: int) -> dict:
        return {"cuts": [state[v][0] for v in range(n)]}

    def sparsify(self, v, d, state, tensor, flat):
        keep = state[v][0].keep(d, flat)
        return d * keep.to(d.dtype)  # mergekit: tensor * mask (dropped negatives become −0.0)


@dataclass(frozen=True)
class Random(GTA):
    """DARE: drop each element of Δ_i with probability p (a hash of seed, tensor name and flat index),
    rescale the kept ones by 1/(1 − p), computed in float64 and rounded once (the DARE paper; mergekit's
    `rescale` matches the L1 norm of the whole tensor instead, and draws its mask from torch's RNG).
    Each task vector draws its own mask (`kernels.tensor_key`), independent of the others, as mergekit's."""

    p: PerVector = P.field()
    seed: int = SEED.field()
    tag_fields: ClassVar[tuple[tuple[str, str], ...]] = (("p", "p"), ("s", "seed"))

    def check(self, n_vectors: int) -> None:
        super().check(n_vectors)
        for p in self.per("p", n_vectors):
            if not 0.0 <= p < 1.0:
                raise OptionsError(f"DARE drop probability p must be in [0, 1), got {p}", where="merge.p",
                                   fix="p is the fraction of Δ dropped, e.g. 0.9")

    def revision(self, n_vectors: int) -> dict:
        # several vectors once shared one mask: their outputs differ since each draws its own
        return {"mask": "per-vector"} if n_vectors > 1 else {}

    def fused(self, state, tensor: TensorInfo, n: int) -> dict:
        return {"dare": [(kernels.tensor_key(self.seed, tensor.name, vector=v), int(p * 2.0**53), 1.0 - p)
                         for v, p in enumerate(self.per("p", n))]}

    def sparsify(self, v, d, state, tensor, flat):
        p = self.per("p", tensor.n_vectors)[v]
        if p > 0:
            keep = kernels.dare_keep(seed=self.seed, name=tensor.name, p=p, flat_start=flat, shape=d.shape, vector=v)
            d = (d * keep.to(d.dtype)).double().div_(1.0 - p).float()  # Δ/(1−p), rounded once
        return d


@dataclass(frozen=True)
class Breadcrumbs(GTA):
    """Model breadcrumbs: drop the largest `beta` and the smallest `gamma` fraction of |Δ_i| per tensor."""

    beta: float = BETA.field()
    gamma: float = GAMMA.field()
    tag_fields: ClassVar[tuple[tuple[str, str], ...]] = (("b", "beta"), ("g", "gamma"))

    def check(self, n_vectors: int) -> None:
        super().check(n_vectors)
        if not (0 <= self.beta and 0 <= self.gamma and self.beta + self.gamma < 1):
            raise OptionsError(f"breadcrumbs needs beta, gamma ≥ 0 with beta + gamma < 1, got {self.beta}, "
                               f"{self.gamma}", where="merge.beta", fix="e.g. beta 0.01, gamma 0.1")

    def ranks(self, tensor: TensorInfo) -> list[tuple[int, int | None]]:
        top, bot = int(self.beta * tensor.numel), int(self.gamma * tensor.numel)
        return [(tensor.numel - bot, top if top else None)] * tensor.n_vectors

    def sparsify(self, v, d, state, tensor, flat):
        a, b = state[v]
        keep = a.keep(d, flat)
        if b is not None:
            keep &= ~b.keep(d, flat)
        return d * keep.to(d.dtype)


def _settings(op: Operator) -> list[Setting]:
    return [f.metadata["setting"] for f in fields(op)]


__all__ = ["BETA", "Breadcrumbs", "DENSITY", "GAMMA", "GTA", "Magnitude", "NORMALIZE", "P", "PerVector", "Random",
           "SEED", "WEIGHTS", "as_delta"]
