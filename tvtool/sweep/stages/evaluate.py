"""Stage `eval`: every dataset at every α (and operator), as `apply:` says:
  swap         θ1 + α·Δ loaded in place into one vLLM engine (or a Ray pool of engines, `executor.ray`);
  materialize  the `models` stage's α folders, one engine;
  lora         one engine with LoRA enabled, the `low_rank` stage's adapters.
Runs whose record matches are not generated again (a killed run resumes); the engine starts only if a
run has work left. vLLM's lines go to eval/vllm.log."""

from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

from tvtool.engine.engine import Engine
from tvtool.engine.logs import vllm_logs
from tvtool.engine.options import SamplingOptions
from tvtool.errors import OptionsError
from tvtool.evaluation.cluster import evaluate_on_ray
from tvtool.engine.memory import DTYPE_BYTES, engine_dtype
from tvtool.evaluation.evaluate import evaluate, finished_runs
from tvtool.io.layout import dataset_dir, is_vocab_tensor
from tvtool.lowrank.peft_adapter import adapter_folders, padded_rank
from tvtool.merge.materialize import output_folders
from tvtool.evaluation.report import table_row
from tvtool.evaluation.runs import EvalOptions
from tvtool.evaluation.units import RayOptions
from tvtool.merge.options import MergeOptions
from tvtool.options import cli_number, opt, to_cli_args
from tvtool.sweep.planning import PlanContext, StagePlan, Status, samples_bytes
from tvtool.sweep.spec import DatasetSpec, RecipeCore, delta_source, low_rank_merge, merge_options
from tvtool.sweep.stage import Section, Stage, SweepState, register
from tvtool.sweep.words import Glob, operator_rows, source_words, vector_words
from tvtool.vectors.source import DeltaSource


@dataclass(frozen=True)
class ExecutorSpec:  # --- ray: tvtool.evaluation.cluster ---
    ray: RayOptions | None = opt(None, "Evaluate on a Ray cluster: {address, engines, gpus_per_engine, "
                                       "cpus_per_engine, retries, cpu_bind} (see tvtool.evaluation.cluster).")


@register
class EvalStage(Stage):
    name = "eval"
    order = 40
    section = Section("executor", ExecutorSpec, ExecutorSpec(),
                      "Where the evaluation runs (executor.ray: a Ray pool).", after="push")
    folders = ("eval",)

    def inputs(self, recipe: RecipeCore) -> list[str]:
        files = [d.name for d in recipe.datasets if Path(d.name).is_file()]  # not a dataset's name or Hub id
        return [recipe.base, recipe.reasoner, *(v.model for v in recipe.vectors), *files]

    def check(self, state: SweepState) -> None:
        _ray(state)

    def run(self, state: SweepState) -> None:
        r, out, ray = state.recipe, state.out / "eval", _ray(state)
        evals = [eval_options(r, ds, state.progress, verbose=state.verbose) for ds in r.datasets]
        plain = state.plain()
        with vllm_logs(folder=out, verbose=state.verbose):  # vLLM's lines go to eval/vllm.log (tvtool.engine.logs)
            if ray is not None:  # --- ray: the (operator ×) α × dataset plan on a pool of engines ---
                tables, starts = _eval_on_ray(r, state.source, out, state.alphas, evals, ray, state.progress,
                                              None if plain else state.configs)
            else:
                tables, starts = _eval_one_engine(r, state.source, out, state.alphas, evals, state.folders,
                                                  state.adapters, state.configs, plain)
            if not plain:
                tables = operator_rows(tables=tables, configs=state.configs)
        state.tables.update(tables)
        state.engine_starts += starts

    def plan(self, ctx: PlanContext) -> StagePlan:
        r, out = ctx.recipe, ctx.out / "eval"
        evals = [eval_options(r, ds, False) for ds in r.datasets]
        engine = r.engine
        if r.apply == "lora":  # θ1 and one LoRA slot at the adapters' (padded) rank
            shapes = ctx.open(delta_source(r)).tv
            rank = padded_rank(r.low_rank.rank or r.low_rank.max_rank or engine.max_lora_rank)
            engine = dataclasses.replace(engine, enable_lora=True, max_lora_rank=rank)
            lora = sum(rank * sum(shapes.shape(n)) for n in shapes.names() if len(shapes.shape(n)) == 2
                       and not is_vocab_tensor(n)) * DTYPE_BYTES[engine_dtype(engine, "bfloat16")]
            memory = ctx.served(DeltaSource(base=r.base, reasoner=r.base), engine, lora=lora)
        else:  # the shell model of θ1 + α·Δ, or the materialized folders (their shapes, the materialized dtype)
            swap = r.apply == "swap" and ctx.ray is None  # in place on this engine (a Ray pool's: the same)
            memory = ctx.served(delta_source(r), engine, dtype=r.materialize.dtype if r.apply == "materialize"
                                else "auto", swap=ctx.open(delta_source(r)).tv.names() if swap else None,
                                pair=ctx.source.reasoner is not None and ctx.plain())
        runs = len(ctx.configs)
        vocab = int(ctx.model(r.base).config.get("vocab_size") or 0)
        disk = [replace(samples_bytes(problems=ctx.problems(name=ev.dataset, split=ev.split, limit=ev.limit,
                                                             seed=ev.seed, kind=ev.kind),
                                      n=sampling.n, max_tokens=sampling.max_tokens, vocab=vocab, runs=runs),
                        what=f"eval/{dataset_dir(ev.dataset)}: " + "samples.jsonl of " + f"{runs} run(s)")
                for ev, sampling in evals]
        notes = [] if ctx.ray is None else ["on a Ray pool: each engine of the pool as planned here"]
        return StagePlan(self.name, ctx.status_of(lambda: _status(ctx, out, evals)), disk, [memory], notes)

    def commands(self, recipe: RecipeCore, out: Path) -> list[list[str]]:
        r, alphas = recipe, tuple(dict.fromkeys(recipe.alphas))
        op = low_rank_merge(r) if r.low_rank else None
        vec, src = vector_words(r), source_words(r, out)
        opts = r.source.to_cli_args()  # the source options (--vocab …) of the recipe's vectors
        cmds = []
        for d in r.datasets:
            ev, sampling = eval_options(r, d, True)
            flags = ["--dataset", ev.dataset, *ev.to_cli_args(exclude=("dataset",)), *r.prompt.to_cli_args(),
                     *sampling.to_cli_args(), *r.engine.to_cli_args(exclude=("enable_lora", "max_lora_rank")),
                     "-o", f"{out}/eval"]
            a = ["--alpha", ",".join(cli_number(x) for x in alphas)]
            if r.apply == "swap" and r.merge:  # one eval per merge entry, each with its own α list
                for m in r.merge:
                    mo = merge_options(m) if op is None else \
                        MergeOptions(rules=m.rules, layer_schedule=m.layer_schedule)  # the operator is in M
                    cmds.append(["tvtool", "eval", "--base", r.base, *(src if op else [*(vec or src), *opts]),
                                 *to_cli_args(mo),
                                 "--alpha", ",".join(cli_number(x) for x in m.alphas or alphas), *flags])
            elif r.apply == "swap":
                cmds.append(["tvtool", "eval", "--base", r.base, *src, *([] if r.low_rank else opts), *a, *flags])
            elif r.apply == "materialize":
                cmds.append(["tvtool", "eval", Glob(shlex.quote(f"{out}/models/") + ("*alpha-*" if r.merge else "alpha-*")),
                             *flags])
            else:
                cmds.append(["tvtool", "eval", "--model", r.base, "--lora",
                             Glob(shlex.quote(f"{out}/lowrank/adapters/") + "alpha-*"), *a, *flags])
        return cmds


def _ray(state: SweepState) -> RayOptions | None:
    """The Ray pool of this run (`sweep --ray` overrides the recipe's address), or None: one engine."""
    r = state.recipe
    ray = r.executor.ray if state.ray is None else replace(r.executor.ray or RayOptions(), address=state.ray)
    if ray is not None and r.apply != "swap":
        raise OptionsError(f"a Ray sweep loads α in place; apply is {r.apply!r}", where="executor.ray",
                           fix="use apply: swap, or run without --ray / executor.ray")
    return ray


def _status(ctx: PlanContext, out: Path, evals) -> Status:
    """The runs' status, by the records `evaluate` checks (`finished_runs`); inputs an earlier stage writes
    (α folders, adapters, the factored delta) are read only when the runs' folders are there at all."""
    r = ctx.recipe
    if not out.exists():
        return Status("to do")
    if r.apply == "materialize":
        folders = output_folders(output=ctx.out / "models", configs=None if ctx.plain() else ctx.configs,
                                 options=replace(r.materialize, alphas=ctx.alphas))
        given = dict(checkpoints=[str(f) for f in folders.values()])
        need = list(folders.values())
    elif r.apply == "lora":
        adapters = adapter_folders(output=ctx.out / "lowrank" / "adapters", alphas=ctx.alphas)
        given = dict(model=r.base, loras=[str(adapters[a]) for a in ctx.alphas], alphas=ctx.alphas)
        need = list(adapters.values())
    else:
        given = dict(source=ctx.source, **(dict(alphas=ctx.alphas) if ctx.plain() else dict(configs=ctx.configs)))
        need = [] if ctx.exists(ctx.source) else [Path(ctx.source.delta)]
    if not all(Path(p).exists() for p in need):
        return Status("unknown", "its inputs are not written yet (an earlier stage writes them)")
    states = []
    for ev, sampling in evals:
        states += [st for _, st in finished_runs(output=out, options=ev, prompt=r.prompt, sampling=sampling,
                                                 engine_options=r.engine, **given)]
    return ctx.runs_status(states, unit="runs")


def eval_options(r: RecipeCore, ds: DatasetSpec, progress: bool, *,
                 verbose: bool = False) -> tuple[EvalOptions, SamplingOptions]:
    """A recipe dataset's evaluation and sampling options (per-dataset max_tokens wins)."""
    swap = r.apply == "swap"  # in-engine α: the eval applies the recipe's tensor selection itself
    ev = EvalOptions(dataset=ds.name, split=ds.split, limit=ds.limit, seed=ds.seed, kind=ds.kind,
                     params_b=r.params_b, include=r.materialize.include if swap else None,
                     exclude=r.materialize.exclude if swap else None, progress=progress,
                     answer_rule=r.answer_rule, think_end=r.eval.think_end, difficulty_field=r.eval.difficulty_field,
                     prompt_budgets=r.prompt_budgets,
                     budget_template=r.budget_template, budget_alpha=r.budget_alpha, verbose=verbose,
                     overwrite=True)  # the sweep's own run folders: a changed record redoes the run
    return ev, replace(r.sampling, max_tokens=ds.max_tokens or r.sampling.max_tokens)


def _eval_one_engine(r: RecipeCore, source: DeltaSource, out: Path, alphas, evals, folders, adapters, configs, plain):
    """Every dataset on one engine (started only if some run is not complete yet)."""
    if r.apply == "swap":
        eng = Engine.for_source(source=source, options=r.engine, lazy=True)
    elif r.apply == "materialize":
        eng = Engine(model=next(iter(folders.values())), options=r.engine, lazy=True)
    else:
        rank = json.loads((Path(adapters[alphas[0]]) / "adapter_config.json").read_text())["r"]
        eng = Engine(model=r.base, options=dataclasses.replace(r.engine, enable_lora=True, max_lora_rank=rank),
                     lazy=True)
    tables = {}
    try:
        for ev, sampling in evals:
            common = dict(output=out, options=ev, prompt=r.prompt, sampling=sampling, engine=eng)
            if r.apply == "swap":
                res = evaluate(source=source, configs=configs, **common) if not plain else \
                    evaluate(source=source, alphas=alphas, **common)
            elif r.apply == "materialize":
                res = evaluate(checkpoints=[folders[a] for a in alphas] if plain else list(folders.values()),
                               **common)
            else:
                res = evaluate(model=r.base, loras=[adapters[a] for a in alphas], alphas=alphas, **common)
            tables[res.runs[0].folder.name if res.runs else ev.dataset] = [table_row(x) for x in res.runs]
    finally:
        eng.close()
    return tables, eng.starts


def _eval_on_ray(r: RecipeCore, source: DeltaSource, out: Path, alphas, evals, ray: RayOptions, progress: bool,
                 configs):
    """Every (operator ×) α × dataset run on a Ray pool: the same run folders and merge configurations
    (`configs`, None: plain θ1 + α·Δ), so the same table as one engine."""
    res = evaluate_on_ray(output=out, source=source, alphas=alphas, datasets=evals, prompt=r.prompt,
                          engine_options=r.engine, executor=ray, progress=progress, configs=configs)
    return {ev.runs[0].folder.name: [table_row(x) for x in ev.runs] for ev in res.results}, res.pool.engine_starts


__all__ = ["EvalStage", "ExecutorSpec", "eval_options"]
