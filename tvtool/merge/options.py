"""`MergeOptions`: the operator settings of `materialize` and the in-engine sweep, defined once.

The CLI (`--method`, `--density`, `--drop-p`, `--vector MODEL[:WEIGHT]`, `--alpha-rule REGEX=A`,
`--layer-schedule FIRST:LAST`, …), the Python API and recipes all build this, and
`configs(alphas, …)` turns it into the `MergeConfig`s (plain data) that `tvtool.merge.stream` runs, so
the same settings give the same bytes in every path. `config_name` names a configuration's
folder or run: `alpha-0.6` for plain θ1 + α·Δ, `ties-d0.2-alpha-0.55` for an operator.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal, Sequence

from tvtool.errors import OptionsError
from tvtool.io.layout import ALPHA_TEMPLATE, alpha_name
from tvtool.merge.stream import MergeConfig
from tvtool.options import opt

Method = Literal["task_arithmetic", "trim", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties"]


@dataclass(frozen=True)
class MergeOptions:
    method: Method = opt("task_arithmetic", "Merge operator over the task vector(s): task_arithmetic (θ1 + α·Δ), "
                                            "trim, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties.")
    density: float = opt(1.0, "trim/ties: fraction of |Δ| kept per tensor, in (0, 1] (Long-to-Short: 1 − k).")
    drop_p: float = opt(0.0, "dare_*: drop probability p in [0, 1); kept entries are rescaled by 1/(1 − p).")
    drop_seed: int = opt(0, "dare_*: mask seed (the mask is a hash of seed, tensor name and element index; "
                            "--seed of eval shuffles problems).")
    beta: float = opt(0.0, "breadcrumbs: largest fraction of |Δ| dropped per tensor.")
    gamma: float = opt(0.0, "breadcrumbs: smallest fraction of |Δ| dropped per tensor.")
    vectors: tuple[str, ...] = opt((), "A further task vector MODEL[:WEIGHT] of the same base (repeat): a reasoner "
                                       "(or, with --delta, a delta). Without --reasoner/--delta the first is the "
                                       "reasoner. Weights default to 1.", flag="--vector")
    alpha_rules: tuple[str, ...] = opt((), "REGEX=FACTOR (repeat): α is multiplied by the factor of the first rule "
                                           "whose regex matches the tensor name (e.g. 'mlp|o_proj=1' '.=0.5').",
                                       flag="--alpha-rule")
    layer_schedule: str | None = opt(None, "FIRST:LAST: α is multiplied by a factor linear from FIRST (layer 0) to "
                                           "LAST (the last layer); other tensors keep factor 1.")

    def weighted_vectors(self) -> list[tuple[str, float]]:
        """(model, weight) per `--vector`."""
        out = []
        for v in self.vectors:
            model, sep, w = v.rpartition(":")
            if not sep or "/" in w or not w:
                out.append((v, 1.0))
                continue
            try:
                weight = float(w)
            except ValueError:
                out.append((v, 1.0))  # a path with a colon, no weight
                continue
            if not math.isfinite(weight):
                raise OptionsError(f"task vector weight must be finite, got {w}", where=f"--vector {v}")
            out.append((model, weight))
        return out

    def rules(self) -> tuple[tuple[str, float], ...]:
        out = []
        for r in self.alpha_rules:
            rx, sep, a = r.rpartition("=")
            try:
                out.append((rx, float(a)))
                if not sep or not rx:
                    raise ValueError
            except ValueError:
                raise OptionsError(f"bad α rule {r!r}", where="--alpha-rule", fix="write REGEX=FACTOR, e.g. mlp=1.0")
        return tuple(out)

    def schedule(self) -> tuple[float, float] | None:
        if self.layer_schedule is None:
            return None
        try:
            first, last = (float(x) for x in self.layer_schedule.split(":"))
        except ValueError:
            raise OptionsError(f"bad layer schedule {self.layer_schedule!r}", where="--layer-schedule",
                               fix="write FIRST:LAST, e.g. 0.5:1.0") from None
        return first, last

    def configs(self, alphas: Sequence[float], *, include: str | None = None, exclude: str | None = None,
                weights: Sequence[float] = ()) -> list[MergeConfig]:
        """One `MergeConfig` per α with these settings; `weights` per task vector (all 1: left out)."""
        w = tuple(float(x) for x in weights)
        w = () if all(x == 1.0 for x in w) else w
        return [MergeConfig(a, include, exclude, method=self.method, weights=w, density=self.density,
                            p=self.drop_p, beta=self.beta, gamma=self.gamma, seed=self.drop_seed,
                            rules=self.rules(), schedule=self.schedule())
                for a in dict.fromkeys(float(x) for x in alphas)]


def operator_settings(config: MergeConfig, *, more: Sequence[str] = ()) -> dict | None:
    """A configuration's operator as recorded (finished-work records, metadata, cards): its non-default
    operator fields and the further task vectors `more`; None for plain θ1 + α·Δ."""
    if config.is_plain(1 + len(more)):
        return None
    op = {k: v for k, v in config.to_dict().items() if k not in ("alpha", "include", "exclude")}
    return json.loads(json.dumps({**op, **({"more": [str(m) for m in more]} if more else {})}))  # lists: YAML-safe


def config_name(config: MergeConfig, template: str = ALPHA_TEMPLATE) -> str:
    """The folder/run name of a configuration: the α folder, prefixed by the operator's tag."""
    tag = config.tag()
    return f"{tag}-{alpha_name(config.alpha, template)}" if tag else alpha_name(config.alpha, template)


def split_vectors(*, delta: str | None, reasoner: str | None, options: MergeOptions
                  ) -> tuple[str | None, str | None, tuple[str, ...], tuple[float, ...]]:
    """(delta, reasoner, further vectors, weights of all vectors) from --delta/--reasoner and --vector."""
    vecs = options.weighted_vectors()
    if delta is None and reasoner is None and vecs:
        (reasoner, w0), vecs = vecs[0], vecs[1:]
    else:
        w0 = 1.0
    return delta, reasoner, tuple(m for m, _ in vecs), (w0, *(w for _, w in vecs))
