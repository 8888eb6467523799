"""`TaskVector`: Δ = θ2 − θ1 by tensor name, read lazily, combined linearly.

A task vector is a sum of terms c·Δ_i, where each Δ_i is a base/reasoner pair,
a delta file written by `tvtool delta`, or a factored delta (`X.lora_B @ X.lora_A`)
written by `tvtool svd-rank`. Nothing is read until rows are asked for, and all
arithmetic is float32. Terms must have the same tensor names and shapes: a
mismatch raises instead of being skipped.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from tvtool.io.buffers import empty
from tvtool.io.checkpoint import Checkpoint, Source
from tvtool.errors import CheckpointError, MismatchError
from tvtool.io.layout import FACTOR_A, FACTOR_B, LM_HEAD, dtype_name, embed_name, is_vocab_tensor
from tvtool.merge.stream import MergeConfig, merged_tensors


@dataclass
class _Pair:
    """Δ from two checkpoints; `names` maps Δ name → (base name, reasoner name, Δ shape)."""

    base: Checkpoint
    reasoner: Checkpoint
    names: dict[str, tuple[str, str, tuple[int, ...]]]
    skipped: list[dict] = field(default_factory=list)
    missing: dict[str, list[str]] = field(default_factory=dict)
    vocab: str = "error"

    def shape(self, name):
        return self.names[name][2]

    def rows(self, name, start, stop):
        b, r, shape = self.names[name]
        stop = shape[0] if stop is None and shape else stop  # vocab intersect: only the shared rows
        return self.reasoner.read(r, start, stop).float() - self.base.read(b, start, stop).float()


@dataclass
class _File:
    """Δ stored on disk, full (`X`) or factored (`X.lora_A`, `X.lora_B`)."""

    ckpt: Checkpoint
    factored: dict[str, tuple[str, str]]  # Δ name → (A name, B name)
    full: list[str]

    def shape(self, name):
        if name in self.factored:
            a, b = self.factored[name]
            return (self.ckpt.info(b).shape[0], self.ckpt.info(a).shape[1])
        return self.ckpt.info(name).shape

    def rows(self, name, start, stop):
        if name in self.factored:
            a, b = self.factored[name]
            return self.ckpt.read(b, start, stop).float() @ self.ckpt.read(a).float()  # [rows, r] @ [r, in]
        return self.ckpt.read(name, start, stop).float()


class TaskVector:
    """A lazy linear combination Σ c_i·Δ_i over identical tensor names.

    Build with `TaskVector.between(base, reasoner)` or `TaskVector.load(path)`;
    combine with `+`, `-`, `* alpha`; read with `rows`/`get`; merge with `apply_to`.
    """

    def __init__(self, terms: list[tuple[float, _Pair | _File]], *, shared_rows: dict[str, int] | None = None):
        self.terms = terms
        self._rows = dict(shared_rows or {})  # vocab intersect over several vectors: name → rows merged
        first = terms[0][1]
        self._names = list(first.names) if isinstance(first, _Pair) else list(first.factored) + first.full
        for _, t in terms[1:]:
            other = list(t.names) if isinstance(t, _Pair) else list(t.factored) + t.full
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
        return cls([(1.0, _pair(b, r, allow_missing=allow_missing, vocab=vocab))])

    @classmethod
    def load(cls, path: str | os.PathLike | Source, *, allow_pickle: bool = False) -> "TaskVector":
        """A delta (full or factored) written by tvtool: a .safetensors file or a folder with an index;
        or a PEFT LoRA adapter folder (Δ = s·B·A per module, zero elsewhere; see tvtool.vectors.adapter)."""
        # --- PEFT adapters (tvtool.vectors.adapter) ---
        from tvtool.vectors.adapter import AdapterTerm, is_adapter

        if not isinstance(path, Source) and is_adapter(path):
            return cls([(1.0, AdapterTerm(path))])
        # --- end PEFT adapters ---
        ckpt = Checkpoint.open(path, allow_pickle=allow_pickle)
        kind = ckpt.metadata.get("tvtool.kind")
        if kind not in ("delta", "factored-delta"):
            raise CheckpointError("not a tvtool delta (no tvtool.kind in its metadata)", where=str(ckpt.source.path),
                                  fix="create it with `tvtool delta`, or pass a model with --reasoner")
        factored, full = {}, []
        for n in ckpt.names():
            if n.endswith(FACTOR_A):
                x = n[: -len(FACTOR_A)]
                if x + FACTOR_B not in ckpt:
                    raise CheckpointError(f"factored delta has {n!r} but no {x + FACTOR_B!r}",
                                          where=str(ckpt.source.path), fix="re-create it with tvtool svd-rank")
                factored[x] = (n, x + FACTOR_B)
            elif not n.endswith(FACTOR_B):
                full.append(n)
        return cls([(1.0, _File(ckpt, factored, full))])

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

    # -- operators (tvtool.merge.operators; lazy like the rest) --------------------------
    def shared(self, rows: dict[str, int]) -> "TaskVector":
        """This Δ over the first `rows[name]` rows of the named (vocabulary) tensors only: what several
        task vectors share under --vocab intersect (`operators.shared_vectors`); rows past them are no
        part of it, so a merge leaves them θ1."""
        own = {n: min(k, self.shape(n)[0]) for n, k in rows.items() if n in self._names}
        return TaskVector(self.terms, shared_rows={**self._rows, **own})

    def merge(self, *others: "TaskVector", vocab: str = "error", **merge):
        """This and `others` (same base) merged by `tvtool.merge.operators.Merge(**merge)`: TIES, DARE, …
        `vocab="intersect"` merges vocabulary tensors of different sizes over their shared rows."""
        from tvtool.merge.operators import Merge, MergedVector

        return MergedVector([self, *others], Merge(**merge), vocab=vocab)

    def trim(self, density: float):
        """Keep the top `density` fraction of |Δ| per tensor (ties in index order)."""
        return self.merge(method="trim", density=density)

    def dare(self, p: float, *, seed: int = 0):
        """Drop each element with probability p (hash of seed, name, index), rescale by 1/(1 − p)."""
        return self.merge(method="dare_linear", p=p, seed=seed)

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

    def merge_inputs(self, base: Checkpoint, name: str, src: str, start: int = 0, stop: int | None = None, *,
                     base_rows: torch.Tensor | None = None, base32: torch.Tensor | None = None,
                     lazy: bool = False):
        """(θ1 rows as stored, θ1 rows in fp32, Δ rows, θ2 rows or None) for output tensor `name`.

        Reads every input once: for a plain base/reasoner pair over this base, Δ is computed from
        the same θ1 rows (and θ2 rows are returned, so α=1 can be θ2 bit for bit). `base_rows`
        (and `base32`) are θ1's rows when the caller already read them (several task vectors).
        `src` is the base tensor to read (the embedding for a tied lm_head). `lazy`: for that plain
        pair, return (θ1 rows, None, None, θ2 rows) and let the caller form Δ (`kernels.fused_pair`).
        """
        p, shape = self.pair, self.shape(name)
        whole = p is not None and shape == tuple(base.info(src).shape)
        within = p is not None and stop is not None and bool(shape) and stop <= shape[0]
        if (whole or within) and p.base.source.path.resolve() == base.source.path.resolve():
            bn, rn, _ = p.names[name]
            base_rows = p.base.read(bn, start, stop) if base_rows is None else base_rows
            r = p.reasoner.read(rn, start, stop)
            if lazy and base32 is None:
                return base_rows, None, None, r
            if base32 is None:  # [rows, ...] shared by Δ and every α; pooled buffers within a pass (tvtool.io.buffers)
                base32 = empty(tuple(base_rows.shape), torch.float32).copy_(base_rows)
            return base_rows, base32, empty(tuple(r.shape), torch.float32).copy_(r).sub_(base32), r
        base_rows = base.read(src, start, stop) if base_rows is None else base_rows
        # (vocab intersect over whole tensors: Δ re-reads θ1's shared rows)
        return base_rows, base_rows.float() if base32 is None else base32, self.rows(name, start, stop), None

    # -- what it came from --------------------------------------------------------
    @property
    def pair(self) -> _Pair | None:
        return self.terms[0][1] if len(self.terms) == 1 and isinstance(self.terms[0][1], _Pair) else None

    def sources(self) -> list[Path]:
        """The local paths of every checkpoint this task vector reads (Hub ids as their cache folder)."""
        out = []
        for _, t in self.terms:
            cks = [t.base, t.reasoner] if isinstance(t, _Pair) else [t.ckpt]
            out += [c.source.path for c in cks]
        return out

    def provenance(self) -> dict:
        """Base/reasoner sources, skipped and missing tensors, vocab policy, dtype, scale."""
        c, t = self.terms[0]
        if isinstance(t, _Pair):
            prov = {"base": t.base.source.describe(), "reasoner": t.reasoner.source.describe(),
                    "skipped": t.skipped, "missing": t.missing, "vocab": t.vocab,
                    "dtype": dtype_name(common_dtype(t.base, t.reasoner))}
        elif hasattr(t, "provenance"):  # a PEFT adapter (tvtool.vectors.adapter)
            prov = t.provenance()
        else:
            m = t.ckpt.metadata
            prov = {k.removeprefix("tvtool."): _json_or_str(v) for k, v in m.items()
                    if k.startswith("tvtool.") and k != "tvtool.files"}
            prov["delta"] = t.ckpt.source.describe()
        if self._rows:
            prov["shared_rows"] = dict(self._rows)  # vocab intersect over several task vectors
        if len(self.terms) > 1 or c != 1.0:
            prov["combination"] = [{"coefficient": c, **_term_source(t)} for c, t in self.terms]
        return prov

    def side_files(self, base: Checkpoint | None = None) -> dict[str, bytes]:
        """The reasoner's config/tokenizer/chat-template files, carried so materialize needs no reasoner.

        A delta with no config.json (a PEFT adapter, or svd-rank of one) gets `base`'s files under its own."""
        files = self._own_side_files()
        if base is not None and "config.json" not in files:
            files = {**base.side_files(), **files}
        return files

    def _own_side_files(self) -> dict[str, bytes]:
        t = self.terms[0][1]
        if hasattr(t, "side_files"):  # a PEFT adapter (tvtool.vectors.adapter)
            return t.side_files()
        if isinstance(t, _Pair):
            return t.reasoner.side_files()
        files = t.ckpt.side_files()
        packed = t.ckpt.metadata.get("tvtool.files")
        if packed:
            files.update({k: base64.b64decode(v) for k, v in json.loads(packed).items()})
        return files

    def apply_to(self, base: str | os.PathLike | Checkpoint, *, alpha: float = 1.0,
                 dtype: torch.dtype | None = None, include: str | None = None,
                 exclude: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream (name, θ1 + α·Δ) over the base's tensors, rounded once to `dtype` (default: stored).

        The shared merge path (`tvtool.merge.stream.merged_tensors`): the same bytes as `materialize`."""
        b = base if isinstance(base, Checkpoint) else Checkpoint.open(base)
        return merged_tensors(base=b, tv=self, config=MergeConfig(alpha, include, exclude), dtype=dtype)


def common_dtype(a: Checkpoint, b: Checkpoint) -> torch.dtype:
    da, db = a.float_dtype(), b.float_dtype()
    return da if da == db else torch.float32


def _pair(b: Checkpoint, r: Checkpoint, *, allow_missing: bool, vocab: str) -> _Pair:
    bn, rn = b.names(), set(r.names())
    alias = {}
    if (LM_HEAD in rn) != (LM_HEAD in b):  # exactly one side ties lm_head to the embedding
        tied, other = (b, r) if LM_HEAD not in b else (r, b)
        emb = embed_name(tied.names())
        if emb is not None:
            alias[id(tied)] = emb
    names, skipped = {}, []
    base_only = sorted(n for n in bn if n not in rn and not (n == LM_HEAD and id(r) in alias))
    reasoner_only = sorted(n for n in rn if n not in b and not (n == LM_HEAD and id(b) in alias))
    if (base_only or reasoner_only) and not allow_missing:
        parts = [f"base only: {base_only[:5]}" if base_only else "", f"reasoner only: {reasoner_only[:5]}" if reasoner_only else ""]
        raise MismatchError(f"{len(base_only) + len(reasoner_only)} tensors are in only one model ("
                            + "; ".join(p for p in parts if p) + ")",
                            fix="check that the reasoner was fine-tuned from this base, "
                                "or pass --allow-missing to skip them (they are recorded)")
    order = bn + ([LM_HEAD] if id(b) in alias else [])
    for n in order:
        if n in base_only:
            continue
        sb = n if n in b else alias[id(b)]
        sr = n if n in rn else alias[id(r)]
        ib, ir = b.info(sb), r.info(sr)
        if not (ib.dtype.is_floating_point and ir.dtype.is_floating_point):
            skipped.append({"name": n, "reason": f"non-float dtype ({_non_float(ib.dtype, ir.dtype)})"})
            continue
        shape = ib.shape
        if ib.shape != ir.shape:
            if is_vocab_tensor(n) and ib.shape[1:] == ir.shape[1:]:
                if vocab != "intersect":
                    raise MismatchError(f"vocabulary size differs for tensor {n!r}: base has {ib.shape[0]} rows, "
                                        f"reasoner {ir.shape[0]}", where=r.source.ref,
                                        fix="pass --vocab intersect to take Δ over the shared rows "
                                            "(the other rows keep the base's values)")
                shape = (min(ib.shape[0], ir.shape[0]), *ib.shape[1:])
            else:
                raise MismatchError(f"shape mismatch for tensor {n!r}: base {tuple(ib.shape)} vs reasoner "
                                    f"{tuple(ir.shape)}", fix="base and reasoner must have the same architecture")
        names[n] = (sb, sr, tuple(shape))
    missing = {"base_only": base_only, "reasoner_only": reasoner_only} if (base_only or reasoner_only) else {}
    return _Pair(b, r, names, skipped, missing, vocab)


def _non_float(db: torch.dtype, dr: torch.dtype) -> str:
    """'int64' when both sides agree, else which side has which dtype (the non-float one named first)."""
    b, r = (str(d).removeprefix("torch.") for d in (db, dr))
    if b == r:
        return b
    if db.is_floating_point:
        return f"{r} in the reasoner, {b} in the base"
    if dr.is_floating_point:
        return f"{b} in the base, {r} in the reasoner"
    return f"base {b}, reasoner {r}"


def _term_source(t) -> dict:
    if hasattr(t, "provenance"):  # a PEFT adapter (tvtool.vectors.adapter)
        return {"adapter": str(t.path)}
    if isinstance(t, _Pair):
        return {"base": t.base.source.ref, "reasoner": t.reasoner.source.ref}
    return {"delta": t.ckpt.source.ref}


def _json_or_str(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v

