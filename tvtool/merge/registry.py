"""The registry of merge operators: each operator is one class (its name, its settings, its per-chunk math).

An operator is a frozen dataclass subclassing `Operator`: its fields are its settings (each made by a
`Setting`, with help text), its methods its math, and `@register` adds it under its `name`. The
modules in `tvtool/merge/operators/` register themselves; they are imported on the first lookup
(`operators()`), so that importing this module (what `MergeConfig` and the engine need) does not
import them, the exact top-k or the kernels. The CLI flags, `--help`, recipe validation and records
are all built from `operators()` and `settings()`.

How α enters is the operator's: `outputs` turns one chunk of inputs into the rows of every α asked
for (one read of the inputs serves them all). Most operators are α-free (`alpha_free`): they compute
M once per chunk (`merged`) and the output is θ1 + α·M; slerp interpolates θ1 and θ2 at t = α.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch

from tvtool.errors import OptionsError

DEFAULT = "task_arithmetic"  # the plain θ1 + α·Δ (one task vector) and Σ w_i·Δ_i (several)
_SEQ = itertools.count()


@dataclass(frozen=True)
class Setting:
    """One operator setting, defined once: the operators that take it declare a field `Setting.field()`.

    `type` is its type as an option (a CLI flag, a recipe field); `per_vector` settings also take one
    value per task vector in Python (a tuple). `option=False`: no flag or recipe field (Python only).
    Settings are recorded (`MergeConfig.to_dict`) in the order they were defined."""

    name: str
    default: Any
    help: str
    type: Any = float
    per_vector: bool = False
    flag: str | None = None
    option: bool = True
    seq: int = field(default_factory=lambda: next(_SEQ), compare=False)

    def field(self) -> Any:
        return dataclasses.field(default=self.default, metadata={"setting": self})

    def values(self, value: Any, n: int) -> tuple[float, ...]:
        """One value per task vector: `value` repeated, or its n values."""
        vals = tuple(float(x) for x in value) if isinstance(value, (tuple, list)) else (float(value),) * n
        if len(vals) != n:
            raise OptionsError(f"merge {self.name} has {len(vals)} values for {n} task vectors",
                               where=f"merge.{self.name}", fix="give one value, or one per task vector")
        return vals


@dataclass(frozen=True)
class TensorInfo:
    """The tensor an operator is working on: its name, Δ's shape, and how many task vectors there are."""

    name: str
    shape: tuple[int, ...]
    n_vectors: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape else 1

    @property
    def row_size(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1


@dataclass
class Rows:
    """One row chunk of a tensor's inputs, read once: θ1 rows as stored, θ1 in float32 (None: not formed
    yet), Δ_i rows in float32 (or a `kernels.PairRows` for a plain bf16 pair) and θ2 rows of a pair."""

    base: torch.Tensor
    deltas: list
    end: torch.Tensor | None = None
    base32: torch.Tensor | None = None
    start: int = 0


Read = Callable[[int, int], Rows]


@dataclass(frozen=True)
class Operator:
    """A merge operator: subclass as a frozen dataclass whose fields are `Setting` fields, and `@register`."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for --help
    alpha_free: ClassVar[bool] = True  # the output is θ1 + α·M, M independent of α (svd-rank can factor M)
    tag_fields: ClassVar[tuple[tuple[str, str], ...]] = ()  # (letter, setting) shown in folder names

    def check(self, n_vectors: int) -> None:
        """Raise OptionsError on a bad setting (naming `merge.<setting>`) for `n_vectors` task vectors."""

    def revision(self, n_vectors: int) -> dict:
        """What the finished-work records add when this operator's output changed for the same settings
        (`MergeConfig.record`): outputs of an earlier version are then redone, never taken as finished."""
        return {}

    def is_identity(self, n_vectors: int) -> bool:
        """Whether M is Δ itself (plain θ1 + α·Δ: the α = 1 rule and the fused pair path apply)."""
        return False

    def ranks(self, tensor: TensorInfo) -> list[tuple[int, int | None]] | None:
        """Magnitude ranks per task vector that the selection needs, (a, b): keep the top a of |Δ_i| and
        not the top b. Every operator's ranks of a tensor are found in one shared exact top-k pass
        (`tvtool.merge.topk`); None: no magnitude selection."""
        return None

    def prepare(self, tensor: TensorInfo, cuts: list | None, ranges: list[tuple[int, int]], read: Read) -> Any:
        """Per-tensor state before its chunks are merged: by default the cuts of `ranks`; an operator
        that needs statistics of the whole tensor reads its row chunks `ranges` with `read` here."""
        return cuts

    def merged(self, state: Any, rows: Rows, tensor: TensorInfo) -> torch.Tensor:
        """M for the rows of `rows` (float32 [rows, ...]): what an α-free operator scales by α."""
        raise NotImplementedError(f"{self.name} has no α-free merged task vector")

    def outputs(self, state: Any, rows: Rows, tensor: TensorInfo, alphas: Sequence[float],
                dtype: torch.dtype) -> list[torch.Tensor]:
        """The output rows for every α (α_eff of this tensor), each rounded once to `dtype`."""
        raise NotImplementedError

    def tag(self) -> str:
        """The folder/run-name part of the settings shown by name, e.g. '-d0.3'."""
        return "".join(f"-{letter}{_g(getattr(self, f))}" for letter, f in self.tag_fields)


_OPS: dict[str, type[Operator]] = {}
_LOADED = False
_SETTINGS: dict[str, Any] = {}  # settings() of the registered operators, recomputed when one is added


def register(cls: type[Operator]) -> type[Operator]:
    """Class decorator: add an operator to the registry under `cls.name`."""
    if cls.name in _OPS and _OPS[cls.name] is not cls:
        raise ValueError(f"two merge operators are named {cls.name!r}")
    for f in dataclasses.fields(cls):
        if "setting" not in f.metadata:
            raise ValueError(f"{cls.__name__}.{f.name} is not a Setting field")
    _OPS[cls.name] = cls
    return cls


def operators() -> dict[str, type[Operator]]:
    """Every operator by name: the default first, then by name. The operator modules are imported on
    the first call (`tvtool.merge.operators` discovers them)."""
    global _LOADED
    if not _LOADED:
        # a run-time import: the operator modules (top-k, kernels) load on the first lookup, not with
        # MergeConfig or the engine's plan
        importlib.import_module("tvtool.merge.operators")
        _LOADED = True
    return {n: _OPS[n] for n in sorted(_OPS, key=lambda n: (n != DEFAULT, n))}


def get(name: str) -> type[Operator]:
    ops = operators()
    if name not in ops:
        raise OptionsError(f"unknown merge method {name!r}", where="merge.method", fix=f"use one of {', '.join(ops)}")
    return ops[name]


def settings() -> list[Setting]:
    """Every operator's settings, each once, in the order they were defined."""
    ops = operators()
    if _SETTINGS.get("n") != len(ops):
        seen: dict[str, Setting] = {}
        for cls in ops.values():
            for f in dataclasses.fields(cls):
                s = f.metadata["setting"]
                if seen.setdefault(s.name, s) != s:
                    raise ValueError(f"operators define the setting {s.name!r} differently")
        _SETTINGS.update(n=len(ops), all=sorted(seen.values(), key=lambda s: s.seq))
    return list(_SETTINGS["all"])


def users(name: str) -> list[str]:
    """The operators that take setting `name`."""
    return [n for n, cls in operators().items() if name in {f.name for f in dataclasses.fields(cls)}]


def _g(v) -> str:
    return ",".join(f"{x:g}" for x in v) if isinstance(v, tuple) else f"{v:g}"


__all__ = ["DEFAULT", "Operator", "Read", "Rows", "Setting", "TensorInfo", "get", "operators", "register",
           "settings", "users"]
