"""`MergeOptions`: the operator settings of every verb that applies a task vector, built from the registry.

Its fields are the registry's (`tvtool.merge.registry`): `--method` (the operator names), one field per
setting any operator takes (`--density`, `--drop-p`, `--drop-seed`, `--beta`, `--gamma`, …, each with its
help text and the operators that use it), the per-vector `weights` (from `--vector MODEL:WEIGHT`, no flag
of their own), `--alpha-rule REGEX=A` and `--layer-schedule FIRST:LAST`. The CLI (`click_options`), the
Python API and the recipe's `merge:` entries (the same fields plus `alphas`) all use it, and
`configs(alphas, …)` turns it into the `MergeConfig`s (plain data, the same setting names) that
`tvtool.merge.stream` runs, so the same settings give the same bytes in every path. A new operator's
settings appear here without an edit. `config_name` names a configuration's folder or run:
`alpha-0.6` for plain θ1 + α·Δ, `ties-d0.2-alpha-0.55` for an operator.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import json
from typing import Any, Literal, Sequence

from tvtool.errors import OptionsError
from tvtool.io.layout import ALPHA_TEMPLATE, alpha_name
from tvtool.merge.config import MergeConfig
from tvtool.merge.registry import DEFAULT, operators, settings, users
from tvtool.options import CliOptions, opt


class _MergeOptionsBase(CliOptions):
    """What `MergeOptions` does with its fields (the fields themselves come from the registry)."""

    def rule_pairs(self) -> tuple[tuple[str, float], ...]:
        """(regex, factor) per `--alpha-rule REGEX=FACTOR`."""
        out = []
        for r in self.rules:
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

    def operator_settings(self) -> dict[str, Any]:
        """The operator settings as given (defaults included; `MergeConfig` keeps the others)."""
        return {s.name: getattr(self, s.name) for s in settings() if s.option}

    def configs(self, alphas: Sequence[float], *, include: str | None = None,
                exclude: str | None = None) -> list[MergeConfig]:
        """One `MergeConfig` per α with these settings (weights all 1: left out)."""
        w = tuple(float(x) for x in self.weights)
        w = () if all(x == 1.0 for x in w) else w
        return [MergeConfig(a, include, exclude, method=self.method, weights=w, rules=self.rule_pairs(),
                            schedule=self.schedule(), **self.operator_settings())
                for a in dict.fromkeys(float(x) for x in alphas)]


def option_fields(*, exclude: tuple[str, ...] = ()) -> list[tuple[str, Any, dataclasses.Field]]:
    """(name, type, field) of every `MergeOptions` field, from the registry: what `MergeOptions` and the
    recipe's `merge:` entry (`tvtool.sweep.recipe`) are made of."""
    ops = operators()
    method_help = "Merge operator over the task vector(s): " + "; ".join(f"{n}: {c.summary}" for n, c in ops.items())
    out = [("method", Literal[tuple(ops)], opt(DEFAULT, method_help + ".")),
           ("weights", tuple[float, ...], dataclasses.field(default=()))]  # from --vector MODEL:WEIGHT: no flag
    for s in settings():
        if s.option:
            out.append((s.name, s.type, opt(s.default, f"{', '.join(users(s.name))}: {s.help}", flag=s.flag)))
    out += [("rules", tuple[str, ...],
             opt((), "REGEX=FACTOR (repeat): α is multiplied by the factor of the first rule whose regex matches the "
                     "tensor name (e.g. 'mlp|o_proj=1' '.=0.5'); a rule that applies to no tensor is an error.",
                 flag="--alpha-rule")),
            ("layer_schedule", str | None,
             opt(None, "FIRST:LAST: α is multiplied by a factor linear from FIRST (layer 0) to LAST (the last layer); "
                       "other tensors keep factor 1."))]
    return [(n, t, f) for n, t, f in out if n not in exclude]


MergeOptions = dataclasses.make_dataclass("MergeOptions", option_fields(), bases=(_MergeOptionsBase,), frozen=True)
MergeOptions.__module__ = __name__
MergeOptions.__doc__ = "The operator settings (fields from the registry; see the module doc)."


def operator_settings(config: MergeConfig, *, more: Sequence[str] = ()) -> dict | None:
    """A configuration's operator as recorded (finished-work records, metadata, cards): its non-default
    operator fields and the further task vectors `more`; None for plain θ1 + α·Δ."""
    if config.is_plain(1 + len(more)):
        return None
    op = {k: v for k, v in config.record().items() if k not in ("alpha", "include", "exclude")}
    return json.loads(json.dumps({**op, **({"more": [str(m) for m in more]} if more else {})}))  # lists: YAML-safe


def config_name(config: MergeConfig, template: str = ALPHA_TEMPLATE) -> str:
    """The folder/run name of a configuration: the α folder, prefixed by the operator's tag."""
    tag = config.tag()
    return f"{tag}-{alpha_name(config.alpha, template)}" if tag else alpha_name(config.alpha, template)


__all__ = ["MergeOptions", "config_name", "operator_settings", "option_fields"]



@dataclass(frozen=True)
class MaterializeOptions(CliOptions):
    alphas: tuple[float, ...] = opt((), "α to write (repeat, or comma-separate): θ1 + α·Δ. Any real number.",
                                    flag="--alpha", short="-a")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt("auto", "Output dtype. auto: the base's.")
    config_from: Literal["reasoner", "base"] = opt(
        "reasoner", "Take config.json, tokenizer, chat template and generation_config from this model.")
    name_template: str = opt("alpha-{alpha}", "Name of each α's folder inside the output folder.")
    include: str | None = opt(None, "Apply α only to tensors whose name matches this regex; others stay at the base.")
    exclude: str | None = opt(None, "Do not apply α to tensors whose name matches this regex.")
    max_shard_size: str = opt("5GB", "Largest safetensors shard in each output folder.")
    allow_nonfinite: bool = opt(False, "Copy NaN/Inf values of the inputs into the merges (with a warning) instead "
                                       "of stopping at the first one.")
    overwrite: bool = opt(False, "Replace existing α folders made with other settings.")
    progress: bool = opt(True, "Show a progress bar.")
