"""Stage `serve`: the command that serves one of the recipe's valves once the sweep has finished
(`tvtool serve --base M --delta VALVE --alpha a,b,c …`). The sweep only prints it, in its output and in
REPORT.md: serving does not end, so a sweep never starts it.

    serve: {valve: plusplus, alphas: [0, 0.5, 1], any_alpha: true, alpha_range: "0:1.25"}

`valve` is a `train:` entry's name (θ + α·Δθ′ on the model it was trained on) or `low_rank` (θ1 + α·Δ with
the factored delta); every other field is `tvtool serve`'s own option (`ServeOptions`: the same names,
defaults and checks), except `api_key`, which stays out of recipes and reports."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tvtool.engine.serve_plan import ServeOptions, check_serve_options
from tvtool.errors import OptionsError
from tvtool.options import cli_number
from tvtool.sweep.planning import PlanContext, StagePlan, Status
from tvtool.sweep.spec import Invalid, RecipeCore, named_model
from tvtool.sweep.stage import Part, Section, Stage, SweepState, register
from tvtool.sweep.words import sh, short

LOW_RANK = "low_rank"  # `valve: low_rank` serves the factored delta of the recipe's low_rank stage
_SECRET = "api_key"  # a recipe is copied into the run folder and its command into REPORT.md


@dataclass(frozen=True)
class ServeSpec(ServeOptions):
    """`serve:`: which valve, and `tvtool serve`'s options."""

    valve: str = dataclasses.field(kw_only=True, metadata={"help": "What to serve: a train entry's name, or "
                                                                   "low_rank (the low-rank delta)."})


def _field(flag: str | None) -> str:
    """The ServeOptions field an OptionsError's flag names (`--alpha` → alphas)."""
    flags = {f.metadata.get("flag") or "--" + f.name.replace("_", "-"): f.name for f in dataclasses.fields(ServeSpec)}
    return flags.get(flag or "", (flag or "").removeprefix("--").replace("-", "_"))


def _check(r: RecipeCore) -> None:
    s = r.serve
    if s is None:
        return
    valves = [t.name for t in r.train] + ([LOW_RANK] if r.low_rank is not None else [])
    if s.valve not in valves:
        raise Invalid(f"is {s.valve!r}, not a valve of this recipe",
                      f"name one of: {', '.join(valves)}" if valves else "add a train: entry or low_rank: to serve",
                      "serve.valve")
    if getattr(s, _SECRET) is not None:
        raise Invalid("would be written into the run's recipe.yaml and REPORT.md",
                      "remove it and set VLLM_API_KEY where the server runs", f"serve.{_SECRET}")
    try:
        check_serve_options(s)
    except OptionsError as e:
        raise Invalid(f"is invalid: {e.what}", e.fix, f"serve.{_field(e.where)}") from None


def _paths(s: ServeSpec | None, to) -> ServeSpec | None:
    """The local paths a serve entry names (`cache`, `log`), from the recipe's folder as every recipe path."""
    return dataclasses.replace(s, **{k: to(getattr(s, k)) for k in ("cache", "log") if getattr(s, k)}) if s else None


def serve_command(recipe: RecipeCore, out: str) -> list[str]:
    """`tvtool serve …` for the recipe's serve entry (paths as the recipe and `out` name them)."""
    r, s = recipe, recipe.serve
    if s.valve == LOW_RANK:
        base, delta = r.base, f"{out}/lowrank/delta.safetensors"
    else:
        t = next(t for t in r.train if t.name == s.valve)
        base, delta = named_model(r, t.model), f"{out}/train/{t.name}"
    return (["tvtool", "serve", "--base", base, "--delta", delta, "--alpha", ",".join(map(cli_number, s.alphas))]
            + s.to_cli_args(exclude=("valve", "alphas", _SECRET))  # the α list always shown; the rest if not default
            + r.engine.to_cli_args(exclude=("enable_lora", "max_lora_rank", "max_loras")))  # the recipe's engine


@register
class ServeStage(Stage):
    name = "serve"
    order = 100
    section = Section("serve", ServeSpec | None, None, "Print the command that serves a valve of this recipe "
                                                       "(`tvtool serve`) once the sweep has finished.",
                      after="train", check=_check, paths=_paths)
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
