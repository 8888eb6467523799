"""`tvtool mixchain` and `tvtool train`: the CoT-Valve data and the valve LoRA."""

from __future__ import annotations

import json
import sys

import click

from tvtool.cli.inputs import inputs, merge_options, source_options
from tvtool.cli.ray import RAY, ray_options
from tvtool.engine.options import EngineOptions, SamplingOptions
from tvtool.engine.prompting import PromptOptions
from tvtool.evaluation.units import RayOptions
from tvtool.options import click_options, from_cli
from tvtool.valve.mixchain import build_mixchain
from tvtool.valve.options import MixChainOptions, PlanOptions, TrainOptions
from tvtool.valve.train import plan_run, train


@click.command("mixchain")
@source_options(base="argument")
@click.option("-o", "--output", required=True, help="Dataset folder to write (parquet, README.md card, mixchain.json).")
@click_options(MixChainOptions)
@merge_options()
@click_options(SamplingOptions, exclude=("n",))
@click_options(PromptOptions)
@click_options(EngineOptions, exclude=("enable_lora", "max_lora_rank", "max_loras"))
@RAY
@click_options(RayOptions, exclude=("address",))
def mixchain_cmd(output: str, **kw) -> None:
    """Build a MixChain-Z dataset: the ground-truth solution plus one greedy chain per α from θ1 + α·Δ
    (one vLLM engine, weights swapped in place), wrong chains removed, β per solution (CoT-Valve eq. 4);
    with --method/--vector, from θ1 + α·M (the operator's merge). Resumable: re-run the same command."""
    source, merge = inputs(kw)
    options, sampling = from_cli(MixChainOptions, kw), from_cli(SamplingOptions, kw)
    prompt, engine_options = from_cli(PromptOptions, kw), from_cli(EngineOptions, kw)
    result = build_mixchain(source=source, output=output, options=options,
                            prompt=prompt, sampling=sampling, engine_options=engine_options,
                            executor=ray_options(kw), merge=merge)
    click.echo(result.summary())


@click.command("train")
@click.argument("mode", type=click.Choice(["valve", "valve++", "progressive"]))
@click.option("--model", required=True, help="The model θ to train a LoRA on (folder or Hub id).")
@click.option("--data", help="A `tvtool mixchain` folder, MixChain-Z .parquet/.jsonl, or .jsonl question/solution "
                             "pairs (required unless --plan).")
@click.option("-o", "--output", help="Adapter folder to write (resumable: re-run to continue; required unless --plan).")
@click.option("--plan", "plan_only", is_flag=True, help="Print the per-process memory plan and train nothing (needs "
                                                         "only the model's config.json; with --data, plans for the "
                                                         "longest sample). Exit status 1 when it does not fit.")
@click.option("--json", "as_json", is_flag=True, help="With --plan: the plan as JSON.")
@click_options(TrainOptions)
@click_options(PlanOptions)
@click_options(PromptOptions)
def train_cmd(mode: str, model: str, data: str | None, output: str | None, plan_only: bool, as_json: bool,
              **kw) -> None:
    """Train a CoT-Valve LoRA: valve (one column), valve++ (per-sample β, eq. 3-4) or progressive (+P).
    Several processes: `torchrun --nproc_per_node N -m tvtool train …` or `accelerate launch` (DDP; --fsdp
    shards the base). A run whose memory plan does not fit is refused before the model loads."""
    options, prompt, plan = from_cli(TrainOptions, kw), from_cli(PromptOptions, kw), from_cli(PlanOptions, kw)
    if plan_only:
        p = plan_run(mode=mode, model=model, data=data, options=options, prompt=prompt, plan=plan)
        click.echo(json.dumps(p.to_dict(), indent=1) if as_json else "\n".join(p.lines()))
        sys.exit(1 if p.fits is False else 0)
    for flag, value in (("--data", data), ("--output", output)):
        if value is None:
            raise click.UsageError(f"Missing option '{flag}' (needed unless --plan).")
    result = train(mode=mode, model=model, data=data, output=output, options=options, prompt=prompt, plan=plan)
    if result.record:
        click.echo(result.summary())
