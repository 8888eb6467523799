"""`MergeConfig`: one merged model's settings (α, selection, operator), plain data for records and processes."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import MISSING, asdict, dataclass, fields
from functools import cached_property
from typing import Sequence

from tvtool.errors import OptionsError
from tvtool.merge.operators import METHODS, Config, LayerSchedule, Merge
from tvtool.options import check_regex


@dataclass(frozen=True)
class MergeConfig:
    """One merged model: θ1 + α_eff·M on the tensors that `include`/`exclude` select (others stay θ1).

    M is Δ for the plain CoT-Valve path (`method="task_arithmetic"`, one task vector), else the
    operator's merge of the task vectors Δ_1..Δ_n (`tvtool.merge.operators`: TIES, DARE, trim,
    breadcrumbs). α is the global coefficient (mergekit's λ); α_eff = α · the first matching
    `rules` factor · the layer `schedule` factor. Frozen and plain data, so it crosses process
    boundaries (`to_dict`/`from_dict`) and is recorded.
    """

    alpha: float
    include: str | None = None  # regex: apply α only to tensors whose name matches
    exclude: str | None = None  # regex: never apply α to tensors whose name matches
    method: str = "task_arithmetic"  # operators.METHODS
    weights: tuple[float, ...] = ()  # per task vector (mergekit `weight`); () = 1 each
    density: float | tuple[float, ...] = 1.0  # trim/TIES: fraction of |Δ_i| kept, in (0, 1]
    p: float | tuple[float, ...] = 0.0  # DARE: drop probability, in [0, 1)
    beta: float = 0.0  # breadcrumbs: largest fraction dropped
    gamma: float = 0.0  # breadcrumbs: smallest fraction dropped
    seed: int = 0  # DARE mask seed
    normalize: bool | None = None  # divide by the summed weights (None: the method's default)
    rules: tuple[tuple[str, float], ...] = ()  # (regex, α factor): the first match scales α
    schedule: tuple[float, float] | None = None  # α factor linear from layer 0 to the last layer

    def __post_init__(self):
        tup = lambda v: tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else float(v)  # noqa: E731
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        object.__setattr__(self, "density", tup(self.density))
        object.__setattr__(self, "p", tup(self.p))
        object.__setattr__(self, "rules", tuple((str(r), float(a)) for r, a in self.rules))
        if self.schedule is not None:
            object.__setattr__(self, "schedule", tuple(float(x) for x in self.schedule))
            if len(self.schedule) != 2:
                raise OptionsError(f"a layer schedule is (first, last), got {self.schedule}", where="merge.schedule")
        check_regex("--include", self.include)
        check_regex("--exclude", self.exclude)
        for rx, _ in self.rules:
            check_regex("--alpha-rule", rx)
        lens = [len(v) for v in (self.weights, self.density, self.p) if isinstance(v, tuple) and v]
        self.merge.check(max(lens, default=1))

    @cached_property
    def _patterns(self) -> tuple[re.Pattern | None, re.Pattern | None]:
        return (re.compile(self.include) if self.include else None,
                re.compile(self.exclude) if self.exclude else None)

    def selects(self, name: str) -> bool:
        """Whether α·Δ is applied to tensor `name`."""
        inc, exc = self._patterns
        return (not inc or bool(inc.search(name))) and not (exc and exc.search(name))

    @cached_property
    def merge(self) -> Merge:
        """How the task vectors become M (`operators.Merge`)."""
        return Merge(method=self.method, weights=self.weights or 1.0, density=self.density, p=self.p,
                     beta=self.beta, gamma=self.gamma, seed=self.seed, normalize=self.normalize)

    def is_plain(self, n_vectors: int = 1) -> bool:
        """θ1 + α·Δ exactly (one task vector, weight 1, no operator, one α for every tensor)."""
        return (n_vectors == 1 and self.method == "task_arithmetic" and self.weights in ((), (1.0,))
                and not self.merge.normalized and not self.rules and self.schedule is None)

    def alphas(self, names: Sequence[str]) -> dict[str, float]:
        """α_eff per tensor name (rules, then the layer schedule over the layers in `names`)."""
        sched = LayerSchedule(first=self.schedule[0], last=self.schedule[1]) if self.schedule else None
        return Config(merge=self.merge, alpha=self.alpha, rules=self.rules, schedule=sched).alphas(names)

    def tag(self) -> str:
        """A short name for the operator settings ('' for plain θ1 + α·Δ): folder and run names."""
        if self.is_plain(len(self.weights) or 1):
            return ""
        part = {"magnitude": f"-d{_g(self.density)}", "random": f"-p{_g(self.p)}-s{self.seed}",
                "breadcrumbs": f"-b{_g(self.beta)}-g{_g(self.gamma)}", None: ""}[METHODS[self.method][0]]
        extra = {k: v for k, v in self.to_dict().items()
                 if k in ("weights", "normalize", "rules", "schedule") and v not in ((), None)}
        digest = hashlib.sha256(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:8] if extra else ""
        return self.method + part + (f"-{digest}" if digest else "")

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: v for k, v in d.items() if k in ("alpha", "include", "exclude") or v != _DEFAULTS[k]}

    @classmethod
    def from_dict(cls, d: dict) -> "MergeConfig":
        d = dict(d)
        if d.get("rules"):
            d["rules"] = tuple(tuple(r) for r in d["rules"])
        return cls(**d)


_DEFAULTS = {f.name: f.default for f in fields(MergeConfig) if f.default is not MISSING}


def _g(v) -> str:
    return ",".join(f"{x:g}" for x in v) if isinstance(v, tuple) else f"{v:g}"
