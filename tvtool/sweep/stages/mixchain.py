"""Stage `mixchain`: MixChain-Z (CoT-Valve §3.2) from θ1 + α·Δ (`tvtool mixchain`): one greedy chain per
α, wrong ones removed; with `merge:`/`vectors:` from the operator's θ1 + α·M. Rebuilt when the recipe's
`mixchain:` entry changes (its record, `tvtool.io.finished`). Its engine (placeholder weights, α loaded in
place) is shared with the valves' α sweeps (`train`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from tvtool.engine.engine import Engine
from tvtool.engine.logs import vllm_logs
from tvtool.errors import OptionsError
from tvtool.merge.options import MergeOptions
from tvtool.options import cli_number, opt, to_cli_args
from tvtool.sweep.spec import Invalid, MergeSpec, RecipeCore, delta_source, merge_options, one_merged_vector
from tvtool.sweep.stage import VALVE_ENGINE, Section, Stage, SweepState, register
from tvtool.sweep.words import rel
from tvtool.io.cards import MIXCHAIN_RECORD as RECORD
from tvtool.sweep.planning import PlanContext, StagePlan, samples_bytes
from tvtool.valve.mixchain import build_mixchain, mixchain_record
from tvtool.valve.options import MixChainOptions, parse_min_correct
from tvtool.vectors.source import DeltaSource

@dataclass(frozen=True)
class MixChainSpec:
    dataset: str = opt("gsm8k", "Questions with gold answers (relative paths: from the recipe's folder).")
    split: str = opt("train", "Dataset split.")
    limit: int | None = opt(None, "Only the first N questions.")
    alphas: tuple[float, ...] = opt((0.2, 0.4, 0.6, 0.8), "α values, one solution each (paper: 0.2 0.4 0.6 0.8).")
    min_correct: str = opt("all", "all | any | a number: correct generated solutions a question needs.")
    max_tokens: int | None = opt(None, "Overrides sampling.max_tokens (clamped to the context in any case).")


def _check(r: RecipeCore) -> None:
    mc = r.mixchain
    if mc is None:
        return
    one_merged_vector(r, "mixchain")
    if not mc.alphas:
        raise Invalid("must list at least one α", "e.g. alphas: [0.2, 0.4, 0.6, 0.8]", "mixchain.alphas")
    try:
        parse_min_correct(mc.min_correct, k=len(mc.alphas))
    except OptionsError as e:
        raise Invalid(e.what, e.fix, "mixchain.min_correct") from None


def _paths(mc: MixChainSpec | None, to) -> MixChainSpec | None:
    return replace(mc, dataset=to(mc.dataset)) if mc else None


def _engine(state: SweepState) -> Engine:
    """The engine shared with the valves' α sweeps (`train`): placeholder weights, θ1 + α·Δ loaded in place."""
    r = state.recipe
    return state.engine(VALVE_ENGINE, lambda: Engine.for_source(source=DeltaSource(base=r.base, reasoner=r.reasoner),
                                                                options=r.engine, lazy=True))


def _arguments(r: RecipeCore, progress: bool) -> dict:
    """`build_mixchain`'s arguments besides the source, output and engine (its run and its plan's record)."""
    mc = r.mixchain
    return dict(prompt=r.prompt, sampling=replace(r.sampling, max_tokens=mc.max_tokens or r.sampling.max_tokens),
                engine_options=r.engine, merge=mixchain_merge(r),  # the recipe's operator over its vectors
                options=MixChainOptions(dataset=mc.dataset, split=mc.split, limit=mc.limit, alphas=mc.alphas,
                                        min_correct=mc.min_correct, overwrite=True, progress=progress))


def mixchain_merge(recipe: RecipeCore) -> MergeOptions:
    """The MixChain stage's operator: the recipe's (one) `merge:` entry over its `vectors:`, all its settings
    (α rules, schedule) at the stage's own α; plain θ1 + α·Δ without `merge:`/`vectors:`."""
    r = recipe
    return merge_options(r.merge[0] if r.merge else MergeSpec(), r.vectors)


@register
class MixChainStage(Stage):
    name = "mixchain"
    order = 50
    section = Section("mixchain", MixChainSpec | None, None, "Build MixChain-Z from θ1 + αΔ (CoT-Valve §3.2).",
                      after="output", check=_check, paths=_paths)
    folders = ("mixchain",)
    engines = (VALVE_ENGINE,)

    def runs(self, recipe: RecipeCore) -> bool:
        return recipe.mixchain is not None

    def inputs(self, recipe: RecipeCore) -> list[str]:
        return [recipe.base, recipe.reasoner, *(v.model for v in recipe.vectors), recipe.mixchain.dataset]

    def run(self, state: SweepState) -> None:
        r, folder = state.recipe, state.out / "mixchain"
        with vllm_logs(folder=state.out / "valves", verbose=state.verbose):  # vLLM's lines go to valves/vllm.log
            build_mixchain(source=delta_source(r), output=folder, engine=_engine(state),
                           **_arguments(r, state.progress))  # skipped inside when its record matches
        state.valves["mixchain"] = json.loads((folder / "mixchain.json").read_text())["stats"]["table9"]

    def plan(self, ctx: PlanContext) -> StagePlan:
        r, folder, mc = ctx.recipe, ctx.out / "mixchain", ctx.recipe.mixchain
        args = _arguments(r, False)
        sampling = args["sampling"]
        problems = ctx.problems(name=mc.dataset, split=mc.split, limit=mc.limit, seed=None, kind=None)
        disk = replace(samples_bytes(problems=problems, n=len(mc.alphas), max_tokens=sampling.max_tokens,
                                     vocab=int(ctx.model(r.base).config.get("vocab_size") or 0)),
                       what=f"mixchain/ (one chain per question and α, {len(mc.alphas)} α)")
        status = ctx.status_of(lambda: ctx.status([(folder, lambda: mixchain_record(source=delta_source(r), **args),
                                                    RECORD)]))
        memory = ctx.served(DeltaSource(base=r.base, reasoner=r.reasoner), r.engine,
                            swap=ctx.open(delta_source(r)).tv.names(), pair=not r.merge and not r.vectors)
        return StagePlan(self.name, status, [disk], [replace(memory, what="vLLM engine (shared with train's α sweeps)")])

    def commands(self, recipe: RecipeCore, out: Path) -> list[list[str]]:
        r, m = recipe, recipe.mixchain
        mo = MixChainOptions(dataset=rel(m.dataset), split=m.split, limit=m.limit, alphas=m.alphas,
                             min_correct=m.min_correct)
        sampling = replace(r.sampling, max_tokens=m.max_tokens or r.sampling.max_tokens)
        op = mixchain_merge(r)
        src = [w for v in r.vectors for w in ("--vector", f"{rel(v.model)}:{cli_number(v.weight)}")] or \
            ["--reasoner", rel(r.reasoner)]
        return [["tvtool", "mixchain", rel(r.base), *src, *r.source.to_cli_args(), *mo.to_cli_args(),
                 *to_cli_args(op),
                 *sampling.to_cli_args(exclude=("n",)), *r.prompt.to_cli_args(),
                 *r.engine.to_cli_args(exclude=("enable_lora", "max_lora_rank")), "-o", f"{out}/mixchain"]]


__all__ = ["MixChainSpec", "MixChainStage", "mixchain_merge"]
