"""`TaskVector`: Δ = θ2 − θ1 by tensor name, read lazily, combined linearly.

A task vector is a sum of terms c·Δ_i; each Δ_i is a `DeltaTerm` (`tvtool.vectors.terms`): a
base/reasoner pair, a delta file written by `tvtool delta`, a factored delta written by
`tvtool svd-rank`, or a PEFT adapter. Nothing is read until rows are asked for, and all
arithmetic is float32. Terms must have the same tensor names and shapes: a mismatch raises
instead of being skipped. Merging (θ1 + α·Δ, the operators) is `tvtool.merge`'s: this module
only describes Δ.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tvtool.errors import MismatchError
from tvtool.io.checkpoint import Checkpoint, Source
from tvtool.vectors.adapter import AdapterTerm
from tvtool.vectors.terms import DeltaTerm, PairTerm, file_kind, open_file

file_kind(AdapterTerm)  # a PEFT adapter folder is a Δ `load` (--delta) opens: recognised before the tvtool files

class TaskVector:
    """A lazy linear combination Σ c_i·Δ_i over identical tensor names.

    Build with `TaskVector.between(base, reasoner)` or `TaskVector.load(path)`; combine with `+`, `-`,
    `* alpha`; read with `rows`/`get`. Apply or merge it with `tvtool.merge` (`apply_to`, `merge`).
    """

    def __init__(self, terms: list[tuple[float, DeltaTerm]], *, shared_rows: dict[str, int] | None = None):
        self.terms = terms
        self._rows = dict(shared_rows or {})  # vocab intersect over several vectors: name → rows merged
        first = terms[0][1]
        self._names = first.names()
        for _, t in terms[1:]:
            other = t.names()
            if set(other) != set(self._names):
                diff = sorted(set(other) ^ set(self._names))
                raise MismatchError(f"task vectors have different tensors, e.g. {diff[:3]}",
                                    fix="combine only deltas of the same architecture")
            for n in self._names:
                if t.shape(n) != first.shape(n):
                    raise MismatchError(f"shape mismatch for tensor {n!r}: {first.shape(n)} vs {t.shape(n)}",
                                        fix="combine only deltas of the same architecture")

    # -- construction -------------------------------------------------------------
    @classmethod
    def between(cls, base: str | os.PathLike | Checkpoint, reasoner: str | os.PathLike | Checkpoint, *,
                allow_missing: bool = False, vocab: str = "error", allow_pickle: bool = False) -> "TaskVector":
        """Δ = reasoner − base, matched by tensor name (shards may differ)."""
        b = base if isinstance(base, Checkpoint) else Checkpoint.open(base, allow_pickle=allow_pickle)
        r = reasoner if isinstance(reasoner, Checkpoint) else Checkpoint.open(reasoner, allow_pickle=allow_pickle)
        return cls([(1.0, PairTerm.between(b, r, allow_missing=allow_missing, vocab=vocab))])

    @classmethod
    def load(cls, path: str | os.PathLike | Source, *, allow_pickle: bool = False) -> "TaskVector":
        """A Δ stored at one path: a delta (full or factored) written by tvtool (a .safetensors file or a
        folder with an index), or a PEFT LoRA adapter folder (Δ = s·B·A per module, zero elsewhere)."""
        return cls([(1.0, open_file(path, allow_pickle=allow_pickle))])

    # -- arithmetic ---------------------------------------------------------------
    def __mul__(self, alpha: float) -> "TaskVector":
        return TaskVector([(c * float(alpha), t) for c, t in self.terms], shared_rows=self._rows)

    __rmul__ = __mul__

    def __neg__(self) -> "TaskVector":
        return self * -1.0

    def __add__(self, other: "TaskVector") -> "TaskVector":
        rows = {n: min(k, self._rows.get(n, k)) for n, k in other._rows.items()}
        return TaskVector(self.terms + other.terms, shared_rows={**self._rows, **rows})

    def __sub__(self, other: "TaskVector") -> "TaskVector":
        return self + (-other)

    def shared(self, rows: dict[str, int]) -> "TaskVector":
        """This Δ over the first `rows[name]` rows of the named (vocabulary) tensors only: what several
        task vectors share under --vocab intersect (`tvtool.vectors.vocab.shared_vectors`); rows past
        them are no part of it, so a merge leaves them θ1."""
        own = {n: min(k, self.shape(n)[0]) for n, k in rows.items() if n in self._names}
        return TaskVector(self.terms, shared_rows={**self._rows, **own})

    # -- reading ------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def shape(self, name: str) -> tuple[int, ...]:
        s = tuple(self.terms[0][1].shape(name))
        return (self._rows[name], *s[1:]) if name in self._rows else s

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """float32 rows [start, stop) of Σ c_i·Δ_i[name]."""
        stop = self._rows[name] if stop is None and name in self._rows else stop
        out = None
        for c, t in self.terms:
            part = t.rows(name, start, stop)
            part = part if c == 1.0 else part * c
            out = part if out is None else out + part
        return out

    def get(self, name: str) -> torch.Tensor:
        return self.rows(name)

    # -- what it came from --------------------------------------------------------
    def pair(self) -> PairTerm | None:
        """The base/reasoner pair this task vector is exactly (one term, coefficient 1), else None."""
        (c, t), *rest = self.terms
        return t.pair() if not rest and c == 1.0 else None

    def sources(self) -> list[Path]:
        """The local paths of every checkpoint this task vector reads (Hub ids as their cache folder)."""
        return [p for _, t in self.terms for p in t.sources()]

    def provenance(self) -> dict:
        """The first term's provenance (sources, skipped and missing tensors, vocab policy, dtype, …), the
        shared rows of several vectors, and the combination when there is one."""
        c, t = self.terms[0]
        prov = t.provenance()
        if self._rows:
            prov["shared_rows"] = dict(self._rows)  # vocab intersect over several task vectors
        if len(self.terms) > 1 or c != 1.0:
            prov["combination"] = [{"coefficient": c, **t.describe()} for c, t in self.terms]
        return prov

    def side_files(self, base: Checkpoint | None = None) -> dict[str, bytes]:
        """The reasoner's config/tokenizer/chat-template files, carried so materialize needs no reasoner.

        A delta with no config.json (a PEFT adapter, or svd-rank of one) gets `base`'s files under its own."""
        files = self.terms[0][1].side_files()
        if base is not None and "config.json" not in files:
            files = {**base.side_files(), **files}
        return files


__all__ = ["TaskVector"]
