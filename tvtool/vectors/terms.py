"""The kinds of Δ term: one Protocol (`DeltaTerm`), one class per kind.

A task vector (`tvtool.vectors.taskvector.TaskVector`) is Σ c_i·Δ_i; each Δ_i is a term of one kind:

    PairTerm      Δ = θ2 − θ1 of two checkpoints (base, reasoner), matched by tensor name
    DeltaFile     Δ written by `tvtool delta` (full tensors)
    FactoredFile  Δ written by `tvtool svd-rank` (X.lora_B @ X.lora_A, plus tensors kept full)
    AdapterTerm   a PEFT LoRA adapter folder, s·B·A per module and zero elsewhere (`tvtool.vectors.adapter`)

Nothing is read until rows are asked for, and all arithmetic is float32. A kind stored at one path
(everything `--delta` accepts) registers with `@file_kind` and recognises its own paths in `open`;
`open_file` tries the registered kinds. A new kind of Δ is one class implementing `DeltaTerm` (plus,
when it needs inputs of its own, a `DeltaSource` field and its fingerprint role).
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import torch

from tvtool.errors import CheckpointError, MismatchError
from tvtool.io.checkpoint import Checkpoint, Source
from tvtool.io.layout import FACTOR_A, FACTOR_B, LM_HEAD, dtype_name, embed_name, is_vocab_tensor


@runtime_checkable
class DeltaTerm(Protocol):
    """One Δ_i: tensor names and shapes, float32 rows on demand, and what it came from."""

    def names(self) -> list[str]:
        """Δ's tensor names, in order."""

    def shape(self, name: str) -> tuple[int, ...]:
        """Δ[name]'s shape."""

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """float32 rows [start, stop) of Δ[name]."""

    def sources(self) -> list[Path]:
        """Local paths of every checkpoint read (Hub ids as their cache folder)."""

    def provenance(self) -> dict:
        """What Δ is, as recorded in outputs (sources, skipped/missing tensors, dtype, …)."""

    def side_files(self) -> dict[str, bytes]:
        """The config/tokenizer/chat-template files that come with Δ (a merged model's)."""

    def describe(self) -> dict:
        """This term in a combination's provenance: {kind: reference}."""

    def pair(self) -> "PairTerm | None":
        """The base/reasoner pair Δ is the difference of, if it is one (the merge reads θ1 once for both)."""


class Probe:
    """A path a file kind may recognise; its checkpoint is opened once, on demand."""

    def __init__(self, path: str | os.PathLike | Source, *, allow_pickle: bool = False):
        self.path, self.allow_pickle = path, allow_pickle

    @property
    def local(self) -> Path | None:
        """The path as a local path (None for a resolved `Source`)."""
        return None if isinstance(self.path, Source) else Path(self.path)

    @cached_property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint.open(self.path, allow_pickle=self.allow_pickle)


_FILE_KINDS: list[type] = []


def file_kind(cls: type) -> type:
    """Register a kind of Δ stored at one path: `cls.open(probe) -> term | None` (None: not this kind).
    Kinds that recognise a path without opening a checkpoint (`needs_checkpoint = False`) are tried first."""
    _FILE_KINDS.append(cls)
    _FILE_KINDS.sort(key=lambda k: k.needs_checkpoint)
    return cls


def open_file(path: str | os.PathLike | Source, *, allow_pickle: bool = False) -> DeltaTerm:
    """The Δ term stored at `path` (a delta, a factored delta, a PEFT adapter, …): the first kind that
    recognises it."""
    probe = Probe(path, allow_pickle=allow_pickle)
    for kind in _FILE_KINDS:
        term = kind.open(probe)
        if term is not None:
            return term
    raise CheckpointError("not a tvtool delta (no tvtool.kind in its metadata)",
                          where=str(probe.checkpoint.source.path),
                          fix="create it with `tvtool delta`, or pass a model with --reasoner")


# --- a base/reasoner pair --------------------------------------------------------------------------


@dataclass
class PairTerm:
    """Δ from two checkpoints; `tensors` maps Δ name → (base name, reasoner name, Δ shape)."""

    base: Checkpoint
    reasoner: Checkpoint
    tensors: dict[str, tuple[str, str, tuple[int, ...]]]
    skipped: list[dict] = field(default_factory=list)
    missing: dict[str, list[str]] = field(default_factory=dict)
    vocab: str = "error"

    @classmethod
    def between(cls, base: Checkpoint, reasoner: Checkpoint, *, allow_missing: bool = False,
                vocab: str = "error") -> "PairTerm":
        """Match the reasoner's tensors to the base's by name (a tied lm_head on one side maps to the
        embedding); tensors in one model only are an error unless `allow_missing` (then recorded)."""
        b, r = base, reasoner
        bn, rn = b.names(), set(r.names())
        alias = {}
        if (LM_HEAD in rn) != (LM_HEAD in b):  # exactly one side ties lm_head to the embedding
            tied = b if LM_HEAD not in b else r
            emb = embed_name(tied.names())
            if emb is not None:
                alias[id(tied)] = emb
        names, skipped = {}, []
        base_only = sorted(n for n in bn if n not in rn and not (n == LM_HEAD and id(r) in alias))
        reasoner_only = sorted(n for n in rn if n not in b and not (n == LM_HEAD and id(b) in alias))
        if (base_only or reasoner_only) and not allow_missing:
            parts = [f"base only: {base_only[:5]}" if base_only else "",
                     f"reasoner only: {reasoner_only[:5]}" if reasoner_only else ""]
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
                        raise MismatchError(f"vocabulary size differs for tensor {n!r}: base has {ib.shape[0]} "
                                            f"rows, reasoner {ir.shape[0]}", where=r.source.ref,
                                            fix="pass --vocab intersect to take Δ over the shared rows "
                                                "(the other rows keep the base's values)")
                    shape = (min(ib.shape[0], ir.shape[0]), *ib.shape[1:])
                else:
                    raise MismatchError(f"shape mismatch for tensor {n!r}: base {tuple(ib.shape)} vs reasoner "
                                        f"{tuple(ir.shape)}", fix="base and reasoner must have the same architecture")
            names[n] = (sb, sr, tuple(shape))
        missing = {"base_only": base_only, "reasoner_only": reasoner_only} if (base_only or reasoner_only) else {}
        return cls(b, r, names, skipped, missing, vocab)

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][2]

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        b, r, shape = self.tensors[name]
        stop = shape[0] if stop is None and shape else stop  # vocab intersect: only the shared rows
        return self.reasoner.read(r, start, stop).float() - self.base.read(b, start, stop).float()

    def sources(self) -> list[Path]:
        return [self.base.source.path, self.reasoner.source.path]

    def provenance(self) -> dict:
        return {"base": self.base.source.describe(), "reasoner": self.reasoner.source.describe(),
                "skipped": self.skipped, "missing": self.missing, "vocab": self.vocab,
                "dtype": dtype_name(common_dtype(self.base, self.reasoner))}

    def side_files(self) -> dict[str, bytes]:
        return self.reasoner.side_files()

    def describe(self) -> dict:
        return {"base": self.base.source.ref, "reasoner": self.reasoner.source.ref}

    def pair(self) -> "PairTerm":
        return self


def common_dtype(a: Checkpoint, b: Checkpoint) -> torch.dtype:
    """The float dtype both checkpoints store, else float32."""
    da, db = a.float_dtype(), b.float_dtype()
    return da if da == db else torch.float32


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


# --- files written by tvtool --------------------------------------------------------------------


@file_kind
class DeltaFile:
    """Δ stored on disk by `tvtool delta` (`tvtool.kind` = delta): full tensors."""

    kind: ClassVar[str] = "delta"
    needs_checkpoint: ClassVar[bool] = True

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.full = [n for n in ckpt.names() if not n.endswith((FACTOR_A, FACTOR_B))]

    @classmethod
    def open(cls, probe: Probe):
        return cls(probe.checkpoint) if probe.checkpoint.metadata.get("tvtool.kind") == cls.kind else None

    def names(self) -> list[str]:
        return list(self.full)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.ckpt.info(name).shape)

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.ckpt.read(name, start, stop).float()

    def sources(self) -> list[Path]:
        return [self.ckpt.source.path]

    def provenance(self) -> dict:
        prov = {k.removeprefix("tvtool."): _json_or_str(v) for k, v in self.ckpt.metadata.items()
                if k.startswith("tvtool.") and k != "tvtool.files"}
        prov["delta"] = self.ckpt.source.describe()
        return prov

    def side_files(self) -> dict[str, bytes]:
        files = self.ckpt.side_files()
        packed = self.ckpt.metadata.get("tvtool.files")  # the reasoner's files, carried in the metadata
        if packed:
            files.update({k: base64.b64decode(v) for k, v in json.loads(packed).items()})
        return files

    def describe(self) -> dict:
        return {"delta": self.ckpt.source.ref}

    def pair(self) -> None:
        return None


@file_kind
class FactoredFile(DeltaFile):
    """Δ stored by `tvtool svd-rank` (`tvtool.kind` = factored-delta): Δ[X] = X.lora_B @ X.lora_A for the
    factored tensors, the others full."""

    kind: ClassVar[str] = "factored-delta"

    def __init__(self, ckpt: Checkpoint):
        super().__init__(ckpt)
        self.factored: dict[str, tuple[str, str]] = {}  # Δ name → (A name, B name)
        for n in ckpt.names():
            if n.endswith(FACTOR_A):
                x = n[: -len(FACTOR_A)]
                if x + FACTOR_B not in ckpt:
                    raise CheckpointError(f"factored delta has {n!r} but no {x + FACTOR_B!r}",
                                          where=str(ckpt.source.path), fix="re-create it with tvtool svd-rank")
                self.factored[x] = (n, x + FACTOR_B)

    def names(self) -> list[str]:
        return list(self.factored) + self.full

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.factored:
            a, b = self.factored[name]
            return (self.ckpt.info(b).shape[0], self.ckpt.info(a).shape[1])
        return super().shape(name)

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        if name in self.factored:
            a, b = self.factored[name]
            return self.ckpt.read(b, start, stop).float() @ self.ckpt.read(a).float()  # [rows, r] @ [r, in]
        return super().rows(name, start, stop)


def _json_or_str(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


__all__ = ["DeltaFile", "DeltaTerm", "FactoredFile", "PairTerm", "Probe", "common_dtype", "file_kind", "open_file"]
