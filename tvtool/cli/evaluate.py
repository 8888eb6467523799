"""`tvtool eval` and `tvtool generate`: one set of inputs, scored or not."""

from __future__ import annotations

from dataclasses import replace

import click

from tvtool.cli.inputs import inputs, merge_options, source_options
from tvtool.cli.ray import RAY, ray_options
from tvtool.engine.options import EngineOptions, SamplingOptions
from tvtool.engine.prompting import PromptOptions
from tvtool.errors import OptionsError
from tvtool.evaluation.cluster import evaluate_on_ray
from tvtool.evaluation.evaluate import evaluate
from tvtool.evaluation.generate import generate_responses
from tvtool.evaluation.runs import EvalOptions
from tvtool.evaluation.units import RayOptions
from tvtool.options import FLOAT_LIST, click_options, from_cli


def _run_options(fn):
    """The inputs shared by `tvtool eval` and `tvtool generate`."""
    for deco in reversed([
        click.argument("checkpoints", nargs=-1),
        click.option("--model", help="One model folder (or Hub id) to evaluate; with --lora, the adapters' base."),
        source_options(base="option", base_help="α sweep: the base θ1 (θ1 + α·Δ is loaded in place, one engine).",
                       delta_help="α sweep: a delta written by `tvtool delta` or `tvtool svd-rank`, or a PEFT LoRA "
                                  "adapter folder.",
                       reasoner_help="α sweep: the reasoner θ2 (Δ computed on the fly)."),
        click.option("--alpha", "-a", "alphas", type=FLOAT_LIST, multiple=True,
                     help="α values (repeat, or comma-separate); with --lora: one α label per adapter."),
        click.option("--lora", "loras", multiple=True,
                     help="A PEFT LoRA adapter folder (repeat); served by one engine with LoRA enabled."),
        click.option("-o", "--output", required=True, help="Output folder (resumable: re-run to finish)."),
        click_options(EvalOptions, exclude=("score",)),
        merge_options(),
        click_options(PromptOptions),
        click_options(SamplingOptions),
        click_options(EngineOptions),
        RAY,
        click_options(RayOptions, exclude=("address",)),
    ]):
        fn = deco(fn)
    return fn


def _run_kwargs(checkpoints, model, alphas, loras, output, kw) -> dict:
    source, merge = inputs(kw)
    return dict(output=output, model=model, source=source, alphas=tuple(a for part in alphas for a in part),
                checkpoints=checkpoints, loras=loras, options=from_cli(EvalOptions, kw), merge=merge,
                prompt=from_cli(PromptOptions, kw), sampling=from_cli(SamplingOptions, kw),
                engine_options=from_cli(EngineOptions, kw))


@click.command("eval")
@_run_options
def eval_cmd(checkpoints, model, alphas, loras, output, **kw) -> None:
    """Generate with vLLM and score: one --model, CHECKPOINTS folders, an α sweep
    (--base with --delta|--reasoner and --alpha, one engine, weights swapped in place;
    --include/--exclude pick the tensors α applies to),
    or --lora adapters. Writes samples.jsonl, summary.json, run.json per run and, for
    several runs, a summary table (markdown, JSON) and plot."""
    executor = ray_options(kw)
    result = _run(evaluate, executor, _run_kwargs(checkpoints, model, alphas, loras, output, kw))
    click.echo(result.summary())


def _run(local, executor: RayOptions | None, kwargs: dict):
    """The one-engine verb, or (`--ray`) the α sweep on a Ray pool."""
    if executor is None:
        return local(**kwargs)
    if kwargs["model"] or kwargs["checkpoints"] or kwargs["loras"] or kwargs["options"].apply == "lora":
        raise OptionsError("--ray runs α sweeps loaded in place", where="--ray",
                          fix="pass --base with --delta|--reasoner and --alpha, without --apply lora (or drop --ray)")
    if local is generate_responses:
        kwargs["options"] = replace(kwargs["options"], score=False)
    for k in ("model", "checkpoints", "loras"):
        kwargs.pop(k)
    return evaluate_on_ray(executor=executor, **kwargs)


@click.command("generate")
@_run_options
def generate_cmd(checkpoints, model, alphas, loras, output, **kw) -> None:
    """Like `tvtool eval` without scoring: responses, token ids and finish reasons in samples.jsonl."""
    executor = ray_options(kw)
    result = _run(generate_responses, executor, _run_kwargs(checkpoints, model, alphas, loras, output, kw))
    click.echo(result.summary())
