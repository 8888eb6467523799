"""della: DELLA-merging (mergekit `della`, 0.1.5): DARE with magnitude-ranked keep probabilities, then TIES.

Per task vector Δ_i and row (a 1-D tensor is one row), as mergekit's `della_magprune`:

    r_e     = rank of |Δ_e| in its row, 1 (smallest) … cols (ties in index order; mergekit: arbitrary)
    q_e     = (density − ε) + (r_e − 1)/(cols − 1) · 2ε        keep probability, float32, mergekit's order
    keep_e  = u_e < q_e,  u_e uniform from a hash of (seed, i, tensor name, flat index)
    d_i     = Δ_i·keep · ‖Δ_i‖₁ / ‖Δ_i·keep‖₁                   (mergekit's `rescale`: L1, whole tensor)

then the generalized task arithmetic of `tvtool.merge.gta` (weights, sign election, normalized by default).
density ≥ 1 keeps Δ_i unchanged (no rescale), as mergekit does. The mask is the DARE hash
(`kernels.dare_keep`'s: keep iff splitmix64(key + (e+1)·φ) >> 11 ≥ ⌊(1 − q_e)·2⁵³⌋) with a key per task
vector, so masks depend only on (seed, vector, name, index), never on chunking or process; mergekit draws
them from torch's RNG. The L1 sums are reduced over fixed blocks (`prepare.Blocks`; for a tensor of one
block exactly mergekit's sums), so a tensor read in row chunks or whole gets the same bytes. Passes: one
for the sums, one for the output (one read for a tensor of one chunk, whose mask the output reuses). The
hash is vectorized numpy: numba loads on first use only, and every registry lookup imports this module.
Measured on one 8M-element tensor (2 shared cores, one run): ranks 1.3 s + mask 0.4–0.8 s, about 0.8× of
mergekit's `della_magprune` on it (2.2 s); DARE's fused kernel takes 0.03–0.14 s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from tvtool.errors import OptionsError
from tvtool.merge import kernels
from tvtool.merge.gta import DENSITY, GTA, SEED, PerVector, as_delta
from tvtool.merge.prepare import Blocks
from tvtool.merge.registry import Read, Setting, TensorInfo, register

EPSILON = Setting("epsilon", 0.15, "keep probabilities range over density ± epsilon by magnitude rank within "
                                   "each row (DELLA's MagPrune).", per_vector=True)
_GOLDEN, _C1, _C2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_RESCALE_EPS = 1e-7  # mergekit: no rescale when either L1 norm is below this


def keep_probabilities(d: torch.Tensor, *, density: float, epsilon: float) -> torch.Tensor:
    """q per element of the float32 rows `d` [rows, cols] (ranks within each row), mergekit's float32 order."""
    order = torch.argsort(d.abs(), dim=1, stable=True)  # the rank is its inverse permutation (a scatter, not a sort)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(d.shape[1]).expand_as(order)).to(torch.float32) + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1) if d.shape[1] > 1 else torch.zeros_like(ranks)
    return (density - epsilon) + rank_norm * 2 * epsilon


def keep_mask(q: torch.Tensor, *, key: int, flat_start: int) -> torch.Tensor:
    """Bool mask of the elements [flat_start, flat_start + q.numel()) kept with probabilities q (the DARE hash)."""
    n = q.numel()
    with np.errstate(over="ignore"):
        z = np.uint64(key) + np.arange(flat_start + 1, flat_start + n + 1, dtype=np.uint64) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _C1
        z = (z ^ (z >> np.uint64(27))) * _C2
        z ^= z >> np.uint64(31)
    drop_below = np.floor((1.0 - q.reshape(-1).double().numpy()) * 2.0**53).astype(np.uint64)
    return torch.from_numpy((z >> np.uint64(11)) >= drop_below).view(q.shape)


def vector_key(seed: int, name: str, v: int) -> int:
    """The hash key of task vector v's mask on tensor `name`."""
    return kernels.tensor_key(seed, f"{v}:{name}")


@register
@dataclass(frozen=True)
class Della(GTA):
    """DELLA: MagPrune (magnitude-ranked DARE with L1 rescale), sign election, normalized by default."""

    name: ClassVar[str] = "della"
    summary: ClassVar[str] = "keep each Δ element with a probability ranked by magnitude (--density ± --epsilon), " \
                             "rescale to Δ's L1 norm, sign election"
    consensus: ClassVar[bool] = True
    normalize_default: ClassVar[bool] = True
    tag_fields: ClassVar[tuple[tuple[str, str], ...]] = (("d", "density"), ("e", "epsilon"), ("s", "seed"))

    density: PerVector = DENSITY.field()
    epsilon: PerVector = EPSILON.field()
    seed: int = SEED.field()

    def check(self, n_vectors: int) -> None:
        super().check(n_vectors)
        for d, e in zip(self.per("density", n_vectors), self.per("epsilon", n_vectors)):
            if not 0.0 < d <= 1.0:
                raise OptionsError(f"density must be in (0, 1], got {d}", where="merge.density",
                                   fix="density is the fraction of each Δ kept, e.g. 0.2")
            if e < 0 or (d < 1 and not (d - e > 0 and d + e < 1)):
                raise OptionsError(f"{self.name} needs density ± epsilon in (0, 1), got density {d:g}, epsilon {e:g}",
                                   where="merge.epsilon", fix="choose a smaller epsilon, e.g. 0.1")

    # -- per vector and chunk ---------------------------------------------------------------------
    def _keep(self, v: int, d: torch.Tensor, tensor: TensorInfo, flat: int, q1d: torch.Tensor | None) -> torch.Tensor:
        """Δ_v rows' keep mask (a 1-D tensor: from its keep probabilities `q1d`)."""
        n = tensor.n_vectors
        density, epsilon = self.per("density", n)[v], self.per("epsilon", n)[v]
        q = q1d[flat:flat + d.numel()].view(d.shape) if q1d is not None else \
            keep_probabilities(d.reshape(d.shape[0], -1), density=density, epsilon=epsilon).view(d.shape)
        return keep_mask(q, key=vector_key(self.seed, tensor.name, v), flat_start=flat)

    def prepare(self, tensor: TensorInfo, cuts, ranges: list[tuple[int, int]], read: Read) -> Any:
        """Per vector: (the L1 rescale factor or None, a 1-D tensor's keep probabilities or None, the keep mask
        of a tensor read in one chunk or None: the output pass reuses it); None for a vector kept whole."""
        n = tensor.n_vectors
        todo = [v for v in range(n) if self.per("density", n)[v] < 1]
        if not todo or tensor.numel == 0:
            return [None] * n
        q1d = {}
        if len(tensor.shape) == 1:  # one row: ranks over the whole tensor (small: a bias or a norm)
            ds = [read(s, e).deltas for s, e in ranges]
            for v in todo:
                d = torch.cat([as_delta(part[v]) for part in ds]).view(1, -1)
                q1d[v] = keep_probabilities(d, density=self.per("density", n)[v],
                                            epsilon=self.per("epsilon", n)[v]).view(-1)
        sums = {v: Blocks(lambda d, m: (d.abs().sum(), m.abs().sum())) for v in todo}
        kept = {}
        for s, e in ranges:
            rows = read(s, e)
            for v in todo:
                d = as_delta(rows.deltas[v])
                kept[v] = self._keep(v, d, tensor, s * tensor.row_size, q1d.get(v))
                sums[v].feed(d, d * kept[v].to(d.dtype))  # mergekit: tensor * mask
        state: list = [None] * n
        for v in todo:
            before, after = (torch.stack(x).sum() for x in zip(*sums[v].close()))
            rescale = not (before < _RESCALE_EPS or after < _RESCALE_EPS)
            state[v] = (before / after if rescale else None, q1d.get(v), kept[v] if len(ranges) == 1 else None)
        return state

    def sparsify(self, v: int, d: torch.Tensor, state: Any, tensor: TensorInfo, flat: int) -> torch.Tensor:
        if state[v] is None:  # density ≥ 1: Δ_v as it is
            return d
        factor, q1d, keep = state[v]
        keep = keep.reshape(-1)[flat:flat + d.numel()].view(d.shape) if keep is not None else \
            self._keep(v, d, tensor, flat, q1d)
        masked = d * keep.to(d.dtype)  # mergekit: tensor * mask
        return masked if factor is None else masked * factor
