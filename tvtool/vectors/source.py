"""`DeltaSource`: where Δ comes from, described once, validated once, sent to workers as plain data.

Δ is either a delta written by tvtool (`delta`: full or factored) or a base/reasoner pair
(`reasoner`: Δ = θ2 − θ1 computed on the fly). The same frozen value is built by the CLI,
the Python API and recipes, recorded in outputs, and rebuilt in each vLLM worker from
`to_dict()` (vLLM's RPC carries plain data). `fingerprint()` identifies its options and
the content of its inputs, for the "finished work" rule: an edited input gives a new
fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Literal

from tvtool.io.checkpoint import Checkpoint
from tvtool.io.fingerprint import input_fingerprint
from tvtool.errors import OptionsError
from tvtool.io.layout import is_vocab_tensor
from tvtool.merge.operators import shared_vectors
from tvtool.vectors.taskvector import TaskVector



@dataclass(frozen=True)
class DeltaSource:
    """Δ from a delta file (`delta`) or a base/reasoner pair (`reasoner`), applied to `base`.

    Paths and Hub ids are kept as given (strings). `base` may be None only with `delta`,
    for verbs that need Δ alone (svd-rank); merging needs it.
    """

    base: str | None
    delta: str | None = None
    reasoner: str | None = None
    allow_missing: bool = False  # pair only: skip tensors present in one model (recorded)
    vocab: Literal["error", "intersect"] = "error"  # vocabulary-size mismatch policy (a pair; several vectors)
    allow_pickle: bool = False  # accept *.bin checkpoints (torch.load(weights_only=True))
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

    # -- opening -----------------------------------------------------------------------------
    def task_vector(self) -> TaskVector:
        """Δ as a lazy TaskVector (headers are read; no tensor is)."""
        return self.open()[1] if self.reasoner is not None else TaskVector.load(self.delta, allow_pickle=self.allow_pickle)

    def open(self) -> tuple[Checkpoint, TaskVector]:
        """(θ1, Δ): the base checkpoint and the task vector, opened once."""
        if self.base is None:
            raise OptionsError("merging needs the base model", fix="pass the base (θ1)")
        if self.reasoner is not None:
            tv = TaskVector.between(self.base, self.reasoner, allow_missing=self.allow_missing, vocab=self.vocab,
                                    allow_pickle=self.allow_pickle)
            return tv.pair.base, tv
        return (Checkpoint.open(self.base, allow_pickle=self.allow_pickle),
                TaskVector.load(self.delta, allow_pickle=self.allow_pickle))

    def open_vectors(self) -> tuple[Checkpoint, list[TaskVector]]:
        """(θ1, [Δ_1, …, Δ_n]): the base and every task vector (`more` after the first), opened once.

        Vocabulary tensors of different sizes follow `vocab` (`operators.shared_vectors`): an error,
        or every Δ_i over the rows the base and all vectors share (the rows past them stay θ1)."""
        base, tv = self.open()
        if self.reasoner is not None:
            more = [TaskVector.between(base, r, allow_missing=self.allow_missing, vocab=self.vocab,
                                       allow_pickle=self.allow_pickle) for r in self.more]
        else:
            more = [TaskVector.load(d, allow_pickle=self.allow_pickle) for d in self.more]
        if not more:
            return base, [tv]
        rows = {n: base.info(n).shape[0] for n in base.names() if is_vocab_tensor(n) and base.info(n).shape}
        return base, shared_vectors([tv, *more], vocab=self.vocab, base_rows=rows,
                                    where=[self.reasoner or self.delta, *self.more])

    def task_vectors(self) -> list[TaskVector]:
        """[Δ_1, …, Δ_n] (headers only): deltas need no base (svd-rank), pairs open it once."""
        if self.reasoner is not None:
            return self.open_vectors()[1]
        return [TaskVector.load(d, allow_pickle=self.allow_pickle) for d in (self.delta, *self.more)]

    # -- plain data ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.more:
            del d["more"]  # records of one task vector stay as they were
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DeltaSource":
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if k == "more" else v for k, v in d.items() if k in known})

    def describe(self) -> dict:
        """The inputs as recorded in settings: base, and delta or reasoner."""
        return {"base": self.base, "delta": self.delta, "reasoner": self.reasoner,
                **({"more": list(self.more)} if self.more else {})}

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
        return {"options": {k: v for k, v in self.to_dict().items() if k not in refs and k != "more"},
                "inputs": {k: input_fingerprint(v, allow_pickle=self.allow_pickle) for k, v in refs.items() if v}}


__all__ = ["DeltaSource"]
