"""Stage `train`: each CoT-Valve LoRA of `train:` (`tvtool train`: valve, valve++ or progressive), then its
α sweep θ + α·Δθ′ on every dataset (`tvtool eval --delta ADAPTER`, in the engine shared with `mixchain`).
A valve is skipped when finished with the same settings and resumes otherwise; a retrained valve's old α
sweep is discarded, and runs whose record matches are not generated again."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from tvtool.engine.engine import Engine
from tvtool.engine.logs import vllm_logs
from tvtool.errors import OptionsError
from tvtool.engine.options import SamplingOptions
from tvtool.evaluation.evaluate import evaluate, finished_runs
from tvtool.evaluation.report import table_row
from tvtool.evaluation.runs import EvalOptions
from tvtool.io.atomic import discard
from tvtool.io.layout import dataset_dir
from tvtool.options import cli_number, opt
from tvtool.sweep.planning import Memory, PlanContext, Size, StagePlan, Status, human, samples_bytes
from tvtool.sweep.spec import Invalid, RecipeCore, named_model
from tvtool.sweep.stage import VALVE_ENGINE, Section, Stage, SweepState, register
from tvtool.sweep.words import rel
from tvtool.valve.options import TrainOptions, resolve
from tvtool.valve.plan import Arch, plan_training, targets_of
from tvtool.valve.train import RECORD, train, train_record
from tvtool.vectors.source import DeltaSource


@dataclass(frozen=True)
class TrainSpec:
    name: str = dataclasses.field(metadata={"help": "Name of the trained valve (folder train/<name>, report label)."})
    mode: Literal["valve", "valve++", "progressive"] = opt("valve++", "valve | valve++ | progressive.")
    model: str = opt("reasoner", "The θ the LoRA is trained on: reasoner, base, or a model path.")
    data: str = opt("mixchain", "mixchain (the recipe's MixChain stage) or a dataset path.")
    alphas: tuple[float, ...] = opt((1.0,), "α values of the valve's in-engine sweep (θ + α·Δθ).")
    options: TrainOptions = opt(TrainOptions(), "`tvtool train` options.")


def _check(r: RecipeCore) -> None:
    seen = set()
    for i, t in enumerate(r.train):
        if t.name in seen:
            raise Invalid(f"repeats the name {t.name!r}", "give each train entry a unique name", f"train[{i}].name")
        seen.add(t.name)
        if t.data == "mixchain" and r.mixchain is None:
            raise Invalid("is mixchain but the recipe has no mixchain stage",
                          "add mixchain: {...}, or give a dataset path", f"train[{i}].data")
        if not t.alphas:
            raise Invalid("must list at least one α", "e.g. alphas: [0, 0.5, 1]", f"train[{i}].alphas")
        try:
            resolve(t.options, mode=t.mode)
        except OptionsError as e:
            flag = (e.where or "").removeprefix("--").replace("-", "_")
            raise Invalid(e.what, e.fix, f"train[{i}].options.{flag}") from None


def _paths(train: tuple[TrainSpec, ...], to) -> tuple[TrainSpec, ...]:
    return tuple(replace(t, model=t.model if t.model in ("reasoner", "base") else to(t.model),
                         data=t.data if t.data == "mixchain" else to(t.data)) for t in train)


def _engine(state: SweepState) -> Engine:
    """The engine shared with `mixchain` (placeholder weights, each valve's θ + α·Δθ′ loaded in place)."""
    r = state.recipe
    return state.engine(VALVE_ENGINE, lambda: Engine.for_source(source=DeltaSource(base=r.base, reasoner=r.reasoner),
                                                                options=r.engine, lazy=True))


@register
class TrainStage(Stage):
    name = "train"
    order = 60
    section = Section("train", tuple[TrainSpec, ...], (),
                      "Valves to train (valve, valve++, progressive) and sweep over α.",
                      after="mixchain", check=_check, paths=_paths)
    folders = ("train", "valves")
    engines = (VALVE_ENGINE,)

    def runs(self, recipe: RecipeCore) -> bool:
        return bool(recipe.train)

    def inputs(self, recipe: RecipeCore) -> list[str]:
        return [p for t in recipe.train for p in (named_model(recipe, t.model), t.data) if p != "mixchain"]

    def run(self, state: SweepState) -> None:
        r, out = state.recipe, state.out
        with vllm_logs(folder=out / "valves", verbose=state.verbose):  # vLLM's lines go to valves/vllm.log
            for t in r.train:
                model = named_model(r, t.model)
                data = out / "mixchain" if t.data == "mixchain" else t.data
                res = train(mode=t.mode, model=model, data=data, output=out / "train" / t.name, prompt=r.prompt,
                            options=_options(t, state.progress))
                ev_dir = out / "valves" / t.name
                if not res.skipped:
                    discard(ev_dir)  # the valve changed: its old α sweep is stale
                state.valves[t.name] = {"mode": t.mode, "model": rel(model), "adapter": rel(res.folder),
                                        "final_loss": res.final_loss, "steps": len(res.losses)}
                source = DeltaSource(base=str(model), delta=str(res.folder))  # the adapter is a task vector
                for ev_options, sampling in _evals(r, state.progress, state.verbose):
                    ev = evaluate(source=source, alphas=t.alphas, engine=_engine(state), output=ev_dir,
                                  prompt=r.prompt, sampling=sampling, options=ev_options)
                    name = (ev.runs[0].folder.name if ev.runs else ev_options.dataset) + f"-{t.name}"
                    state.tables[name] = [table_row(x) for x in ev.runs]

    def plan(self, ctx: PlanContext) -> StagePlan:
        r = ctx.recipe
        shared = DeltaSource(base=r.base, reasoner=r.reasoner)  # the valve engine (`_engine`)
        targets = {n for t in r.train for n in _adapted(ctx, t)}  # what the valves' Δθ′ reach
        engine = ctx.served(shared, r.engine, swap=targets)
        disk, memory, states, notes = [], [], [], []
        for t in r.train:
            model = named_model(r, t.model)
            planned = ctx.model(model)
            tp = plan_training(model={**planned.config, "_name_or_path": model}, mode=t.mode, options=t.options,
                               gpus=ctx.gpus, gpu_memory=ctx.gpu_memory if ctx.gpu_memory is not None
                               else ctx.ram // ctx.gpus)
            memory.append(Memory(f"train {t.name}", tp.peak, tp.device_memory, tuple(tp.lines()), tp.fits,
                                 tp.fix.text() if tp.fix else None, tp.to_dict()))
            o = resolve(t.options, mode=t.mode)
            each = Arch.from_config(planned.config, where=model).lora_params(rank=o.rank,
                                                                            targets=targets_of(o.target_modules)) * 4
            n = 1 if t.mode != "progressive" else len(r.mixchain.alphas) + 1 if t.data == "mixchain" else None
            disk.append(Size(f"train/{t.name}/ (LoRA adapter{', one per stage' if n != 1 else ''}, float32)",
                             None if n is None else n * each, note="" if n is not None else
                             f"{human(each)} per stage; the stages are the data's solution columns"))
            vocab = int(ctx.model(r.base).config.get("vocab_size") or 0)
            for ev, sampling in _evals(r, False, False):
                disk.append(replace(samples_bytes(problems=ctx.problems(name=ev.dataset, split=ev.split, limit=ev.limit,
                                                                       seed=ev.seed, kind=ev.kind), n=sampling.n,
                                                  max_tokens=sampling.max_tokens, vocab=vocab, runs=len(t.alphas)),
                                    what=f"valves/{t.name}/{dataset_dir(ev.dataset)}: samples.jsonl of {len(t.alphas)} α"))
            states.append(ctx.status_of(lambda t=t, model=model: _status(ctx, t, model, shared)))
        if ctx.gpus > 1:
            notes.append(f"trained on {ctx.gpus} processes: launch each entry by hand (recipes/launch/), the sweep "
                         "then finds it finished")
        memory.append(replace(engine, what="vLLM engine of the α sweeps (shared with mixchain)"))
        return StagePlan(self.name, _combine(r, states), disk, memory, notes)

    def commands(self, recipe: RecipeCore, out: Path) -> list[list[str]]:
        r, cmds = recipe, []
        prompt = r.prompt.to_cli_args()
        engine = r.engine.to_cli_args(exclude=("enable_lora", "max_lora_rank"))
        for t in r.train:
            model = rel(named_model(r, t.model))
            data = f"{out}/mixchain" if t.data == "mixchain" else rel(t.data)
            cmds.append(["tvtool", "train", t.mode, "--model", model, "--data", data,
                         *t.options.to_cli_args(exclude=("progress", "overwrite")), *prompt,
                         "-o", f"{out}/train/{t.name}"])
            for d in r.datasets:
                ev = EvalOptions(dataset=rel(d.name), split=d.split, limit=d.limit, seed=d.seed, kind=d.kind,
                                 params_b=r.params_b, answer_rule=r.answer_rule, think_end=r.eval.think_end,
                                 difficulty_field=r.eval.difficulty_field)
                sampling = replace(r.sampling, max_tokens=d.max_tokens or r.sampling.max_tokens)
                cmds.append(["tvtool", "eval", "--base", model, "--delta", f"{out}/train/{t.name}", "--alpha",
                             ",".join(cli_number(a) for a in t.alphas), "--dataset", ev.dataset,
                             *ev.to_cli_args(exclude=("dataset",)), *prompt, *sampling.to_cli_args(), *engine,
                             "-o", f"{out}/valves/{t.name}"])
        return cmds


def _options(t: TrainSpec, progress: bool) -> TrainOptions:
    """The train options of the sweep's run (and of its plan: the same record)."""
    return replace(t.options, progress=progress, overwrite=True)


def _evals(r: RecipeCore, progress: bool, verbose: bool) -> list[tuple[EvalOptions, SamplingOptions]]:
    """The valves' α-sweep options per dataset (their run and their plan's records)."""
    return [(EvalOptions(dataset=ds.name, split=ds.split, limit=ds.limit, seed=ds.seed, kind=ds.kind,
                         params_b=r.params_b, answer_rule=r.answer_rule, think_end=r.eval.think_end,
                         difficulty_field=r.eval.difficulty_field, progress=progress, verbose=verbose, overwrite=True),
             replace(r.sampling, max_tokens=ds.max_tokens or r.sampling.max_tokens)) for ds in r.datasets]


def _adapted(ctx: PlanContext, t: TrainSpec) -> list[str]:
    """The weight tensors a valve's LoRA adapts (its target projections in every layer)."""
    projections = targets_of(resolve(t.options, mode=t.mode).target_modules)
    return [n for n in ctx.checkpoint(named_model(ctx.recipe, t.model)).names()
            if n.endswith(".weight") and n.rsplit(".", 2)[-2] in projections]


def _status(ctx: PlanContext, t: TrainSpec, model: str, shared: DeltaSource) -> Status:
    """One valve: its adapter by `train`'s record, then its α sweep by `evaluate`'s (read only when there)."""
    r, folder, ev_dir = ctx.recipe, ctx.out / "train" / t.name, ctx.out / "valves" / t.name
    data = ctx.out / "mixchain" if t.data == "mixchain" else Path(t.data)
    if folder.exists() and not data.exists():
        return Status("unknown", "its data is not written yet (the mixchain stage writes it)")
    st = ctx.status([(folder, lambda: train_record(mode=t.mode, model=model, data=data, options=_options(t, False),
                                                   prompt=r.prompt), RECORD)])
    if st.state != "finished":
        return st if st.state != "to do" or not ev_dir.exists() else Status("redo", "the valve is trained again")
    source = DeltaSource(base=str(model), delta=str(folder))
    runs = [x for ev, sampling in _evals(r, False, False) if ev_dir.exists()
            for _, x in finished_runs(output=ev_dir, source=source, alphas=t.alphas, options=ev, prompt=r.prompt,
                                      sampling=sampling, engine_options=r.engine, shared=shared)]
    sweep = ctx.runs_status(runs or ["absent"], unit="α runs")
    return Status("resumes", f"valve trained; α sweep: {sweep.text()}") if sweep.state != "finished" else sweep


def _combine(r: RecipeCore, states: list[Status]) -> Status:
    """The stage's status from its valves'."""
    if all(s.state == states[0].state for s in states) and len(states) == 1:
        return states[0]
    if all(s.state == "finished" for s in states):
        return Status("finished")
    if all(s.state == "to do" for s in states):
        return Status("to do")
    return Status("partly finished", "; ".join(f"{t.name}: {s.text()}" for t, s in zip(r.train, states)))


__all__ = ["TrainSpec", "TrainStage"]
