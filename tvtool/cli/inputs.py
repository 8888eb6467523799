"""The flags of every verb that applies a task vector, defined once: where Δ comes from and the operator.

`source_options` adds the source flags (the base, `--delta`, `--reasoner`, `--vector MODEL[:WEIGHT]` and
`SourceOptions`: `--vocab`, `--allow-missing`, `--allow-pickle`); `merge_options` the operator flags
(`MergeOptions`, from the operator registry). `inputs(kw)` builds the verb's `DeltaSource` (through
`DeltaSource.build`, the one input builder) and its `MergeOptions` from them. materialize,
eval/generate, mixchain and svd-rank use them; so will any verb that serves a task vector.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import click

from tvtool.merge.options import MergeOptions
from tvtool.merge.registry import operators, settings
from tvtool.options import click_options, from_cli
from tvtool.vectors.source import DeltaSource, SourceOptions

VECTOR_HELP = ("A further task vector MODEL[:WEIGHT] of the same base (repeat): a reasoner (or, with --delta, a "
               "delta). Without --reasoner/--delta the first is the reasoner. Weights default to 1.")


def source_options(*, base: Literal["argument", "option"], delta: Literal["argument", "option"] = "option",
                   base_help: str = "The base θ1.", delta_help: str = "A delta written by `tvtool delta` or "
                   "`tvtool svd-rank`, or a PEFT LoRA adapter folder.",
                   reasoner_help: str = "The reasoner θ2 (Δ = θ2 − θ1 computed on the fly)."):
    """Decorator: the source flags. `base`/`delta`: a positional argument (BASE, [DELTA]) or an option."""
    decos = [click.argument("base") if base == "argument" else click.option("--base", help=base_help),
             click.argument("delta_path", required=False, metavar="[DELTA]") if delta == "argument" else
             click.option("--delta", "delta_path", help=delta_help),
             click.option("--reasoner", help=reasoner_help),
             click.option("--vector", "vectors", multiple=True, help=VECTOR_HELP),
             click_options(SourceOptions)]

    def decorate(fn):
        for deco in reversed(decos):
            fn = deco(fn)
        return fn

    return decorate


class _Operators(click.ParamType):
    """The operator names, of which --help lists `shown` (the library refuses the others in one line)."""

    name = "method"

    def __init__(self, shown: list[str]):
        self.shown = shown

    def get_metavar(self, param, ctx=None) -> str:
        return "[" + "|".join(self.shown) + "]"

    def convert(self, value, param, ctx):
        if value not in operators():
            self.fail(f"{value!r} is not one of {', '.join(self.shown)}", param, ctx)
        return value


def _rename(extra: dict[str, str] | None) -> dict[str, str]:
    """Field → flag for the settings whose flag is not their name (`--drop-p`, `--drop-seed`): their click
    parameters are named after the flag, apart from other options' (`--seed` of eval), plus `extra`."""
    return {**{s.name: s.flag for s in settings() if s.option and s.flag}, **(extra or {})}


def merge_options(*, rename: dict[str, str] | None = None, alpha_free: bool = False):
    """Decorator: the operator flags (`MergeOptions`). `rename`: other flag names (svd-rank's
    `--merge-method`); `alpha_free`: --help lists only the operators of the form θ1 + α·M."""
    rename = _rename(rename)

    def decorate(fn):
        fn = click_options(MergeOptions, rename=rename)(fn)
        if alpha_free:
            shown = [n for n, cls in operators().items() if cls.alpha_free]
            dest = rename["method"][2:].replace("-", "_") if "method" in rename else "method"
            p = next(p for p in fn.__click_params__ if p.name == dest)
            p.type = _Operators(shown)
            p.help = "Merge operator whose M is factored (of the form θ1 + α·M): " + ", ".join(shown) + "."
        return fn

    return decorate


def inputs(kw: dict, *, rename: dict[str, str] | None = None) -> tuple[DeltaSource | None, MergeOptions]:
    """(source, operator settings) from the click kwargs of `source_options` and `merge_options` (popped):
    the one input builder, `DeltaSource.build`, with the --vector weights in the operator settings."""
    source, weights = DeltaSource.build(base=kw.pop("base"), delta=kw.pop("delta_path"), reasoner=kw.pop("reasoner"),
                                        vectors=kw.pop("vectors"), options=from_cli(SourceOptions, kw))
    return source, dataclasses.replace(merge_from_cli(kw, rename=rename), weights=weights)


def merge_from_cli(kw: dict, *, rename: dict[str, str] | None = None) -> MergeOptions:
    """The `MergeOptions` of `merge_options`' click kwargs (popped); `rename` as given there."""
    return from_cli(MergeOptions, kw, rename=_rename(rename))


__all__ = ["inputs", "merge_from_cli", "merge_options", "source_options"]
