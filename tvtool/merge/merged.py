"""An operator's merged task vector M as a lazy task vector, and the Python conveniences over task vectors.

    merge(tv1, tv2, method="ties", density=0.2, weights=(0.7, 0.5))   M, read like a TaskVector
    trim(tv, 0.3) / dare(tv, 0.9, seed=1)                             one vector's trimmed / dropped Δ

M is computed by the same operator code as the merge stream (`Operator.merged` with the state of
`tvtool.merge.prepare`), so svd-rank (`tvtool.lowrank.merged`) factors the tensor the stream scales by α.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from tvtool.errors import OptionsError
from tvtool.io.safetensors_io import row_chunks
from tvtool.merge.config import MergeConfig
from tvtool.merge.registry import Operator, Rows, TensorInfo
from tvtool.merge.prepare import Prepared, prepare
from tvtool.vectors.taskvector import TaskVector
from tvtool.vectors.vocab import shared_vectors


class MergedVector:
    """A lazy task vector M = merge(Δ_1, …, Δ_n) of an α-free operator: `rows`/`get` like `TaskVector`,
    `* α` scales. The operator's per-tensor state (selection passes) is computed on first use and cached,
    so rows can be read in any order and any chunking with the same result."""

    def __init__(self, vectors: Sequence[TaskVector], operator: Operator, *, scale: float = 1.0, vocab: str = "error",
                 _cache: dict | None = None):
        if not vectors:
            raise OptionsError("no task vectors to merge", where="vectors")
        if not operator.alpha_free:
            raise OptionsError(f"{operator.name} has no merged task vector M: α enters it otherwise than θ1 + α·M",
                               where="merge.method", fix="use an operator of the form θ1 + α·M (e.g. ties, trim)")
        vectors = shared_vectors(vectors, vocab=vocab)  # vocab intersect: M over the shared rows
        operator.check(len(vectors))
        self.vectors, self.operator, self.scale = list(vectors), operator, float(scale)
        self._cache = {} if _cache is None else _cache

    def names(self) -> list[str]:
        return self.vectors[0].names()

    def __contains__(self, name: str) -> bool:
        return name in self.vectors[0]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.vectors[0].shape(name))

    def __mul__(self, alpha: float) -> "MergedVector":
        return MergedVector(self.vectors, self.operator, scale=self.scale * float(alpha), _cache=self._cache)

    __rmul__ = __mul__

    def _rows(self, name: str, start: int, stop: int | None) -> Rows:
        return Rows(None, [v.rows(name, start, stop) for v in self.vectors], start=start)

    def prepared(self, name: str) -> Prepared:
        if name not in self._cache:
            shape = self.shape(name)
            self._cache[name] = prepare([self.operator], tensor=TensorInfo(name, shape, len(self.vectors)),
                                        ranges=row_chunks(shape), read=lambda s, e: self._rows(name, s, e))
        return self._cache[name]

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """float32 rows [start, stop) of scale · M[name]."""
        prep = self.prepared(name)
        m = self.operator.merged(prep.states[self.operator], self._rows(name, start, stop), prep.tensor)
        return m if self.scale == 1.0 else m * self.scale

    def get(self, name: str) -> torch.Tensor:
        return self.rows(name)


def merge(*vectors: TaskVector, method: str = "task_arithmetic", vocab: str = "error", **settings: Any) -> MergedVector:
    """`vectors` (same base) merged by operator `method` with its `settings` (TIES, DARE, …; checked as
    `MergeConfig` checks them). `vocab="intersect"` merges vocabulary tensors of different sizes over their
    shared rows."""
    return MergedVector(list(vectors), MergeConfig(1.0, method=method, **settings).operator, vocab=vocab)


def trim(tv: TaskVector, density: float) -> MergedVector:
    """Keep the top `density` fraction of |Δ| per tensor (ties in index order)."""
    return merge(tv, method="trim", density=density)


def dare(tv: TaskVector, p: float, *, seed: int = 0) -> MergedVector:
    """Drop each element with probability p (hash of seed, name, index), rescale by 1/(1 − p)."""
    return merge(tv, method="dare_linear", p=p, seed=seed)


__all__ = ["MergedVector", "dare", "merge", "trim"]
