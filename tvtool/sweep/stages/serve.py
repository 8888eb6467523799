"""Stage `serve`: the command that serves one of the recipe's valves once the sweep has finished
(`tvtool serve --base M --delta VALVE --alpha a,b,c …`). The sweep only prints it, in its output and in
REPORT.md: serving does not end, so a sweep never starts it.

    serve: {valve: plusplus, alphas: [0, 0.5, 1], any_alpha: true, alpha_range: [0, 1.25]}

`valve` is a `train:` entry's name (θ + α·Δθ′ on the model it was trained on) or `low_rank` (θ1 + α·Δ with
the factored delta)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from tvtool.options import cli_number, opt
from tvtool.sweep.planning import PlanContext, StagePlan, Status
from tvtool.sweep.spec import Invalid, RecipeCore, named_model
from tvtool.sweep.stage import Part, Section, Stage, SweepState, register
from tvtool.sweep.words import sh, short

LOW_RANK = "low_rank"  # `valve: low_rank` serves the factored delta of the recipe's low_rank stage


@dataclass(frozen=True)
class ServeSpec:
    valve: str = dataclasses.field(metadata={"help": "What to serve: a train entry's name, or low_rank (the "
                                                     "low-rank delta)."})
    alphas: tuple[float, ...] = dataclasses.field(metadata={"help": "α values served, one model name each."})
    any_alpha: bool = opt(False, "Also accept any α a request asks for (within alpha_range).")
    alpha_range: tuple[float, float] | None = opt(None, "[LO, HI]: the α a request may ask for with any_alpha.")
    host: str | None = opt(None, "Address to listen on (default: the serve command's).")
    port: int | None = opt(None, "Port to listen on (default: the serve command's).")
    name: str | None = opt(None, "Served model name (default: the serve command's).")


def _check(r: RecipeCore) -> None:
    s = r.serve
    if s is None:
        return
    valves = [t.name for t in r.train] + ([LOW_RANK] if r.low_rank is not None else [])
    if s.valve not in valves:
        raise Invalid(f"is {s.valve!r}, not a valve of this recipe",
                      f"name one of: {', '.join(valves)}" if valves else "add a train: entry or low_rank: to serve",
                      "serve.valve")
    if not s.alphas:
        raise Invalid("must list at least one α", "e.g. alphas: [0, 0.5, 1]", "serve.alphas")
    bad = [a for a in s.alphas if not math.isfinite(a)]
    if bad:
        raise Invalid(f"must be finite numbers, got {bad[0]}", field="serve.alphas")
    if s.alpha_range is not None:
        if not s.any_alpha:
            raise Invalid("needs any_alpha: true", "add any_alpha: true, or remove alpha_range", "serve.alpha_range")
        lo, hi = s.alpha_range
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise Invalid(f"must be [LO, HI] with LO < HI, got [{cli_number(lo)}, {cli_number(hi)}]",
                          "e.g. alpha_range: [0, 1]", "serve.alpha_range")
    if s.port is not None and not 0 < s.port < 65536:
        raise Invalid(f"must be a port number (1 to 65535), got {s.port}", field="serve.port")


def serve_command(recipe: RecipeCore, out: str) -> list[str]:
    """`tvtool serve …` for the recipe's serve entry (paths as the recipe and `out` name them)."""
    r, s = recipe, recipe.serve
    if s.valve == LOW_RANK:
        base, delta = r.base, f"{out}/lowrank/delta.safetensors"
    else:
        t = next(t for t in r.train if t.name == s.valve)
        base, delta = named_model(r, t.model), f"{out}/train/{t.name}"
    words = ["tvtool", "serve", "--base", base, "--delta", delta, "--alpha", ",".join(map(cli_number, s.alphas))]
    if s.name:
        words += ["--name", s.name]
    if s.any_alpha:
        words += ["--any-alpha"]
        if s.alpha_range:
            words += ["--alpha-range", ":".join(map(cli_number, s.alpha_range))]
    if s.host:
        words += ["--host", s.host]
    if s.port is not None:
        words += ["--port", str(s.port)]
    return words + r.engine.to_cli_args(exclude=("enable_lora", "max_lora_rank", "max_loras"))  # the recipe's engine


@register
class ServeStage(Stage):
    name = "serve"
    order = 100
    section = Section("serve", ServeSpec | None, None, "Print the command that serves a valve of this recipe "
                                                       "(`tvtool serve`) once the sweep has finished.",
                      after="train", check=_check)
    publish = True

    def runs(self, recipe: RecipeCore) -> bool:
        return recipe.serve is not None

    def plan(self, ctx: PlanContext) -> StagePlan:
        return StagePlan(self.name, Status("nothing to run", "the sweep prints this command; serving does not end, "
                                                             "so a sweep never starts it"),
                         commands=[sh(serve_command(ctx.recipe, short(ctx.out)))])

    def report(self, state: SweepState) -> Part:
        here = state.here()
        r = state.recipe
        shown = r.model_copy(update={"base": short(r.base, here), "reasoner": short(r.reasoner, here),
                                     "train": tuple(dataclasses.replace(t, model=short(named_model(r, t.model), here))
                                                    for t in r.train)})
        return Part(notes=["", "## Serve", "", "Once the sweep has finished (paths as in Reproduce):", "", "```bash",
                           sh(serve_command(shown, short(state.out, here))), "```", ""])


__all__ = ["ServeSpec", "ServeStage", "serve_command"]
