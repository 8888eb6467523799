"""`MergeConfig`: one merged model's settings (α, selection, operator), plain data for records and processes.

The operator's settings are validated against the registry (`tvtool.merge.registry`), whose operator
modules load on the first lookup: importing this module does not import them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any, Sequence

from tvtool.errors import OptionsError
from tvtool.merge.registry import DEFAULT, Operator, Setting, get, settings as all_settings, users
from tvtool.options import check_regex

LAYER = r"(?:^|\.)layers\.(\d+)\."


@dataclass(frozen=True, init=False)
class MergeConfig:
    """One merged model: the operator's output at α on the tensors that `include`/`exclude` select
    (others stay θ1). For the α-free operators that is θ1 + α_eff·M.

    M is Δ for the plain CoT-Valve path (`method="task_arithmetic"`, one task vector), else the
    operator's merge of the task vectors Δ_1..Δ_n (`tvtool.merge.operators`). α is the global
    coefficient (mergekit's λ; slerp's t); α_eff = α · the first matching `rules` factor · the layer
    `schedule` factor. The operator's settings are keyword arguments (`density=0.3`, `weights=(0.7, 0.5)`,
    …; `settings` holds the non-default ones); a setting the operator does not take is an error.
    Frozen and plain data, so it crosses process boundaries (`to_dict`/`from_dict`) and is recorded.
    """

    alpha: float
    include: str | None = None  # regex: apply α only to tensors whose name matches
    exclude: str | None = None  # regex: never apply α to tensors whose name matches
    method: str = DEFAULT  # the operator's name in the registry
    settings: tuple[tuple[str, Any], ...] = ()  # its non-default settings, in the registry's order
    rules: tuple[tuple[str, float], ...] = ()  # (regex, α factor): the first match scales α
    schedule: tuple[float, float] | None = field(default=None)  # α factor linear from layer 0 to the last layer

    def __init__(self, alpha: float, include: str | None = None, exclude: str | None = None, *,
                 method: str = DEFAULT, rules: Sequence[tuple[str, float]] = (),
                 schedule: Sequence[float] | None = None, settings: Sequence[tuple[str, Any]] = (), **given: Any):
        cls = get(method)
        own = {f.name for f in fields(cls)}
        values = {**dict(settings), **given}
        known = {s.name: s for s in all_settings()}
        out = {}
        for name, value in values.items():
            if name not in known:
                raise OptionsError(f"unknown merge setting {name!r}", where=f"merge.{name}",
                                   fix=f"known settings: {', '.join(known)}")
            s = known[name]
            value = _plain(value, s)
            if value == s.default or (name == "weights" and value == ()):
                continue
            if name not in own:
                who = users(name)
                raise OptionsError(f"{method} takes no {name} (a setting of {', '.join(who)})", where=f"merge.{name}",
                                   fix=f"drop it, or choose an operator that takes it, e.g. --method {who[0]}")
            out[name] = value
        set_ = object.__setattr__
        set_(self, "alpha", float(alpha))
        set_(self, "include", include)
        set_(self, "exclude", exclude)
        set_(self, "method", method)
        set_(self, "settings", tuple((s.name, out[s.name]) for s in all_settings() if s.name in out))
        set_(self, "rules", tuple((str(r), float(a)) for r, a in rules))
        set_(self, "schedule", None if schedule is None else tuple(float(x) for x in schedule))
        if self.schedule is not None and len(self.schedule) != 2:
            raise OptionsError(f"a layer schedule is (first, last), got {self.schedule}", where="merge.schedule")
        check_regex("--include", self.include)
        check_regex("--exclude", self.exclude)
        for rx, _ in self.rules:
            check_regex("--alpha-rule", rx)
        self.operator.check(self.n_vectors)

    def __getattr__(self, name: str) -> Any:
        """An operator setting by name (its default when not set)."""
        if name.startswith("_"):
            raise AttributeError(name)
        s = next((s for s in all_settings() if s.name == name), None)
        if s is None:
            raise AttributeError(f"MergeConfig has no attribute or merge setting {name!r}")
        return dict(self.settings).get(name, s.default)

    @cached_property
    def operator(self) -> Operator:
        """The operator with these settings (hashable: configurations that share it share M)."""
        return get(self.method)(**dict(self.settings))

    @property
    def n_vectors(self) -> int:
        """The task vectors these settings are for: the length of per-vector values (else 1)."""
        return max((len(v) for _, v in self.settings if isinstance(v, tuple) and v), default=1)

    @cached_property
    def _patterns(self) -> tuple[re.Pattern | None, re.Pattern | None]:
        return (re.compile(self.include) if self.include else None,
                re.compile(self.exclude) if self.exclude else None)

    def selects(self, name: str) -> bool:
        """Whether the operator is applied to tensor `name` (else it stays θ1)."""
        inc, exc = self._patterns
        return (not inc or bool(inc.search(name))) and not (exc and exc.search(name))

    def is_plain(self, n_vectors: int = 1) -> bool:
        """θ1 + α·Δ exactly (one task vector, weight 1, no operator, one α for every tensor)."""
        return self.operator.is_identity(n_vectors) and not self.rules and self.schedule is None

    def alphas(self, names: Sequence[str]) -> dict[str, float]:
        """α_eff per tensor name: α · the factor of the first rule whose regex matches · the layer factor
        (`schedule`, over the layers in `names`). A rule that applies to no tensor is an error."""
        rules = [(re.compile(rx), float(a)) for rx, a in self.rules]
        layer = _layer_factors(self.schedule, names) if self.schedule else {}
        out, used = {}, set()
        for n in names:
            a = self.alpha
            i = next((i for i, (rx, _) in enumerate(rules) if rx.search(n)), None)
            if i is not None:
                used.add(i)
                a = a * rules[i][1]
            out[n] = a if n not in layer or layer[n] == 1.0 else a * layer[n]
        for i, (rx, f) in enumerate(self.rules):
            if i not in used:
                hint = ", ".join(repr(n) for n in names[:3])
                why = "an earlier rule takes every tensor it matches" if any(rules[i][0].search(n) for n in names) \
                    else f"no tensor name matches it ({len(names)} tensors, e.g. {hint})"
                raise OptionsError(f"the α rule {rx}={f:g} applies to no tensor: {why}", where="--alpha-rule",
                                   fix="fix the regex, or drop the rule")
        return out

    def tag(self) -> str:
        """A short name for the operator settings ('' for plain θ1 + α·Δ): folder and run names."""
        if self.is_plain(self.n_vectors):
            return ""
        shown = {f for _, f in self.operator.tag_fields}
        extra = {k: v for k, v in self.to_dict().items()
                 if k not in ("alpha", "include", "exclude", "method", *shown)}
        digest = hashlib.sha256(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:8] if extra else ""
        return self.method + self.operator.tag() + (f"-{digest}" if digest else "")

    def to_dict(self) -> dict:
        """alpha, include, exclude, then what differs from the defaults: method, settings, rules, schedule."""
        d = {"alpha": self.alpha, "include": self.include, "exclude": self.exclude}
        d.update({"method": self.method} if self.method != DEFAULT else {})
        d.update(self.settings)
        d.update({"rules": self.rules} if self.rules else {})
        d.update({"schedule": self.schedule} if self.schedule is not None else {})
        return d

    def record(self) -> dict:
        """The settings as finished-work records hold them: `to_dict` plus the operator's revision (an output
        an earlier version wrote differently for the same settings is redone)."""
        return {**self.to_dict(), **self.operator.revision(self.n_vectors)}

    @classmethod
    def from_dict(cls, d: dict) -> "MergeConfig":
        d = dict(d)
        d["rules"] = tuple(tuple(r) for r in d.get("rules") or ())
        return cls(**d)

    @classmethod
    def from_record(cls, d: dict) -> "MergeConfig":
        """The configuration a record's settings describe (`record`'s revision and other entries dropped)."""
        known = {"alpha", "include", "exclude", "method", "rules", "schedule", *(s.name for s in all_settings())}
        return cls.from_dict({k: v for k, v in d.items() if k in known})


def _plain(value: Any, s: Setting) -> Any:
    """A setting's value as recorded: floats, tuples for per-vector values and weights."""
    if isinstance(value, (list, tuple)):
        return tuple(float(x) for x in value)
    if s.type is int and not isinstance(value, bool):
        return int(value)
    if s.type is float or s.per_vector:
        return float(value)
    return value


def _layer_factors(schedule: tuple[float, float], names: Sequence[str], pattern: str = LAYER) -> dict[str, float]:
    """α factor per tensor: linear from `first` (layer 0) to `last` (the last layer); 1 outside the layers."""
    first, last = schedule
    rx = re.compile(pattern)
    layer = {n: int(m.group(1)) for n in names if (m := rx.search(n))}
    if not layer:
        raise OptionsError(f"the layer schedule names no layer: no tensor name matches {pattern!r}",
                           where="--layer-schedule", fix="drop --layer-schedule for a model whose layers are not named "
                                                         "layers.N")
    n_layers = max(layer.values()) + 1
    f = lambda i: first if n_layers == 1 else first + (last - first) * i / (n_layers - 1)  # noqa: E731
    return {n: f(layer[n]) if n in layer else 1.0 for n in names}


__all__ = ["LAYER", "MergeConfig"]
