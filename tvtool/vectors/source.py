"""`DeltaSource`: where Δ comes from, described once, validated once, sent to workers as plain data.

Δ is a base/reasoner pair (`reasoner`: Δ = θ2 − θ1 computed on the fly) or a Δ stored at one path
(`delta`: a delta or factored delta written by tvtool, or a PEFT adapter; `tvtool.vectors.terms`),
plus further task vectors of the same kind (`more`). How Δ is read (`SourceOptions`: the vocab
policy, missing tensors, pickle checkpoints) is part of it. The same frozen value is built by the
CLI's source flags and recipes (both through `DeltaSource.build`), taken by every verb that applies
a task vector, recorded in outputs, and rebuilt in each vLLM worker from `to_dict()` (vLLM's RPC
carries plain data). `open()` is its one opener. `fingerprint()` identifies its options and the
content of its inputs, for the "finished work" rule: an edited input gives a new fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Callable, Literal, NamedTuple, Sequence

from tvtool.errors import OptionsError
from tvtool.io.checkpoint import Checkpoint
from tvtool.io.fingerprint import input_fingerprint
from tvtool.io.layout import is_vocab_tensor
from tvtool.options import CliOptions, cli_number, opt
from tvtool.vectors.taskvector import TaskVector
from tvtool.vectors.vocab import shared_vectors


@dataclass(frozen=True)
class SourceOptions(CliOptions):
    """How Δ is read: the options every verb that takes a task vector shares (CLI flags, a recipe's `source:`)."""

    allow_missing: bool = opt(False, "With --reasoner: skip tensors present in only one model (recorded).")
    vocab: Literal["error", "intersect"] = opt(
        "error", "On a vocabulary-size mismatch (base and reasoner, or between task vectors): error, or take Δ "
                 "over the shared rows only (the others keep the base's values).")
    allow_pickle: bool = opt(False, "Accept *.bin pickle checkpoints, loaded with torch.load(weights_only=True).")


class Opened(NamedTuple):
    """A source's inputs, opened (headers only): θ1 (None without a base) and [Δ_1, …, Δ_n]."""

    base: Checkpoint | None
    vectors: list[TaskVector]

    @property
    def tv(self) -> TaskVector:
        """Δ_1: it gives the plan, the config and the provenance of a merge."""
        return self.vectors[0]


@dataclass(frozen=True)
class DeltaSource(SourceOptions):
    """Δ from a stored Δ (`delta`) or a base/reasoner pair (`reasoner`), applied to `base`.

    Paths and Hub ids are kept as given (strings). `base` may be None only with `delta`,
    for verbs that need Δ alone (svd-rank); merging needs it.
    """

    base: str | None = None
    delta: str | None = None
    reasoner: str | None = None
    more: tuple[str, ...] = ()  # further task vectors of the same base, of the same kind (reasoners or deltas)

    def __post_init__(self):
        for k in ("base", "delta", "reasoner"):
            v = getattr(self, k)
            if v is not None and not isinstance(v, str):
                object.__setattr__(self, k, os.fspath(v))
        object.__setattr__(self, "more", tuple(os.fspath(m) for m in self.more))
        if (self.delta is None) == (self.reasoner is None):
            raise OptionsError("give exactly one of --delta and --reasoner", fix="Δ comes from a delta file or a reasoner")
        if self.reasoner is not None and self.base is None:
            raise OptionsError("--reasoner needs --base", fix="Δ = reasoner − base needs both models")
        if self.vocab not in ("error", "intersect"):
            raise OptionsError(f"bad vocab policy {self.vocab!r}", where="--vocab", fix="use error or intersect")

    # -- the one input builder -----------------------------------------------------------------
    @classmethod
    def build(cls, *, base: str | os.PathLike | None = None, delta: str | os.PathLike | None = None,
              reasoner: str | os.PathLike | None = None, vectors: Sequence[str | tuple[str, float]] = (),
              options: SourceOptions = SourceOptions()) -> tuple["DeltaSource | None", tuple[float, ...]]:
        """(source, weight per task vector) from the source flags (or a recipe): `vectors` are further
        task vectors `MODEL[:WEIGHT]` (or (model, weight)); without `delta`/`reasoner` the first is the
        reasoner. None when no input is given at all (a verb's other modes)."""
        vecs = [v if isinstance(v, tuple) else parse_vector(v) for v in vectors]
        if delta is None and reasoner is None and vecs:
            (reasoner, w0), vecs = vecs[0], vecs[1:]
        else:
            w0 = 1.0
        if base is None and delta is None and reasoner is None:
            return None, ()
        opts = {f.name: getattr(options, f.name) for f in fields(SourceOptions)}
        source = cls(base=base, delta=delta, reasoner=reasoner, more=tuple(m for m, _ in vecs), **opts)
        return source, (float(w0), *(float(w) for _, w in vecs))

    @property
    def options(self) -> SourceOptions:
        return SourceOptions(**{f.name: getattr(self, f.name) for f in fields(SourceOptions)})

    # -- the one opener ----------------------------------------------------------------------
    def open(self, *, checkpoints: Callable[[str], Checkpoint] | None = None) -> Opened:
        """θ1 (None without a base: deltas alone, for svd-rank) and every task vector (`more` after the
        first), opened once, headers only. Vocabulary tensors of different sizes across several vectors
        follow `vocab` (`tvtool.vectors.vocab.shared_vectors`): an error, or every Δ_i over the rows the
        base and all vectors share (the rows past them stay θ1). `checkpoints` opens a model by its ref
        instead of `Checkpoint.open` (`sweep --plan`: headers, or shapes from config.json)."""
        ck = checkpoints or (lambda ref: Checkpoint.open(ref, allow_pickle=self.allow_pickle))
        if self.reasoner is not None:
            base = ck(self.base)
            first = TaskVector.between(base, ck(self.reasoner), allow_missing=self.allow_missing, vocab=self.vocab)
            more = [TaskVector.between(base, ck(r), allow_missing=self.allow_missing, vocab=self.vocab)
                    for r in self.more]
        else:
            base = ck(self.base) if self.base is not None else None
            first, *more = [TaskVector.load(d, allow_pickle=self.allow_pickle) for d in (self.delta, *self.more)]
        if not more:
            return Opened(base, [first])
        rows = {n: base.info(n).shape[0] for n in base.names() if is_vocab_tensor(n) and base.info(n).shape} \
            if base is not None else None
        return Opened(base, shared_vectors([first, *more], vocab=self.vocab, base_rows=rows,
                                           where=[self.reasoner or self.delta, *self.more]))

    # -- plain data ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("base", "delta", "reasoner", "allow_missing", "vocab", "allow_pickle")}
        if self.more:
            d["more"] = list(self.more)  # records of one task vector stay as they were
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DeltaSource":
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if k == "more" else v for k, v in d.items() if k in known})

    def describe(self) -> dict:
        """The inputs as recorded in settings: base, and delta or reasoner."""
        return {"base": self.base, "delta": self.delta, "reasoner": self.reasoner,
                **({"more": list(self.more)} if self.more else {})}

    def cli_args(self, *, weights: Sequence[float] = ()) -> list[str]:
        """The source flags that rebuild this source with these per-vector `weights` (the base aside: verbs
        take it as an argument or --base)."""
        w = [float(x) for x in weights] or [1.0] * (1 + len(self.more))
        if self.reasoner is not None and w[0] != 1.0:  # the reasoner's weight: the first --vector carries it
            args, vecs = [], [self.reasoner, *self.more]
        else:
            args = ["--reasoner", self.reasoner] if self.reasoner is not None else ["--delta", self.delta]
            vecs, w = list(self.more), w[1:]
        args += [x for m, wt in zip(vecs, w) for x in ("--vector", m if wt == 1.0 else f"{m}:{cli_number(wt)}")]
        return args + self.options.to_cli_args()

    # -- identity --------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 (hex) of `fingerprint_record()`: equal iff the options and the inputs' content are."""
        blob = json.dumps(self.fingerprint_record(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def fingerprint_record(self) -> dict:
        """The options, and per input (`input_fingerprint`, by role: never a path, so moved inputs
        keep their fingerprint) what identifies its content."""
        refs = {"base": self.base, "delta": self.delta, "reasoner": self.reasoner}
        refs.update({f"more[{i}]": m for i, m in enumerate(self.more)})
        return {"options": asdict(self.options),
                "inputs": {k: input_fingerprint(v, allow_pickle=self.allow_pickle) for k, v in refs.items() if v}}


def parse_vector(spec: str) -> tuple[str, float]:
    """`MODEL[:WEIGHT]` → (model, weight); a path with a colon and no number after it has weight 1."""
    model, sep, w = spec.rpartition(":")
    if not sep or "/" in w or not w:
        return spec, 1.0
    try:
        weight = float(w)
    except ValueError:
        return spec, 1.0  # a path with a colon, no weight
    if not math.isfinite(weight):
        raise OptionsError(f"task vector weight must be finite, got {w}", where=f"--vector {spec}")
    return model, weight


__all__ = ["DeltaSource", "Opened", "SourceOptions", "parse_vector"]
