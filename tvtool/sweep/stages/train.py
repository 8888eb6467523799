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
from tvtool.evaluation.evaluate import evaluate
from tvtool.evaluation.report import table_row
from tvtool.evaluation.runs import EvalOptions
from tvtool.io.atomic import discard
from tvtool.options import cli_number, opt
from tvtool.sweep.spec import Invalid, RecipeCore, named_model
from tvtool.sweep.stage import VALVE_ENGINE, Section, Stage, SweepState, register
from tvtool.sweep.words import rel
from tvtool.valve.options import TrainOptions, resolve
from tvtool.valve.train import train
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
                            options=replace(t.options, progress=state.progress, overwrite=True))
                ev_dir = out / "valves" / t.name
                if not res.skipped:
                    discard(ev_dir)  # the valve changed: its old α sweep is stale
                state.valves[t.name] = {"mode": t.mode, "model": rel(model), "adapter": rel(res.folder),
                                        "final_loss": res.final_loss, "steps": len(res.losses)}
                source = DeltaSource(base=str(model), delta=str(res.folder))  # the adapter is a task vector
                for ds in r.datasets:
                    sampling = replace(r.sampling, max_tokens=ds.max_tokens or r.sampling.max_tokens)
                    ev = evaluate(source=source, alphas=t.alphas, engine=_engine(state), output=ev_dir,
                                  prompt=r.prompt, sampling=sampling,
                                  options=EvalOptions(dataset=ds.name, split=ds.split, limit=ds.limit, seed=ds.seed,
                                                      kind=ds.kind, params_b=r.params_b, answer_rule=r.answer_rule,
                                                      think_end=r.eval.think_end,
                                                      difficulty_field=r.eval.difficulty_field,
                                                      progress=state.progress, verbose=state.verbose, overwrite=True))
                    name = (ev.runs[0].folder.name if ev.runs else ds.name) + f"-{t.name}"
                    state.tables[name] = [table_row(x) for x in ev.runs]

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


__all__ = ["TrainSpec", "TrainStage"]
