"""`tvtool mixchain` and `tvtool train`: the CoT-Valve data and the valve LoRA."""

from __future__ import annotations

import click

from tvtool.cli.ray import RAY, ray_options
from tvtool.engine.options import EngineOptions, SamplingOptions
from tvtool.engine.prompting import PromptOptions
from tvtool.evaluation.units import RayOptions
from tvtool.merge.options import MergeOptions
from tvtool.options import click_options, from_cli
from tvtool.valve.mixchain import build_mixchain
from tvtool.valve.options import MixChainOptions, TrainOptions
from tvtool.valve.train import train


@click.command("mixchain")
@click.argument("base")
@click.option("--delta", "delta_path", help="A delta written by `tvtool delta` (or give --reasoner).")
@click.option("--reasoner", help="The reasoner checkpoint (Δ is computed on the fly).")
@click.option("-o", "--output", required=True, help="Dataset folder to write (parquet, README.md card, mixchain.json).")
@click_options(MixChainOptions)
@click_options(MergeOptions)
@click_options(SamplingOptions, exclude=("n",))
@click_options(PromptOptions)
@click_options(EngineOptions, exclude=("enable_lora", "max_lora_rank", "max_loras"))
@RAY
@click_options(RayOptions, exclude=("address",))
def mixchain_cmd(base: str, delta_path: str | None, reasoner: str | None, output: str, **kw) -> None:
    """Build a MixChain-Z dataset: the ground-truth solution plus one greedy chain per α from θ1 + α·Δ
    (one vLLM engine, weights swapped in place), wrong chains removed, β per solution (CoT-Valve eq. 4);
    with --method/--vector, from θ1 + α·M (the operator's merge). Resumable: re-run the same command."""
    options, sampling, merge = from_cli(MixChainOptions, kw), from_cli(SamplingOptions, kw), from_cli(MergeOptions, kw)
    prompt, engine_options = from_cli(PromptOptions, kw), from_cli(EngineOptions, kw)
    result = build_mixchain(base=base, delta=delta_path, reasoner=reasoner, output=output, options=options,
                            prompt=prompt, sampling=sampling, engine_options=engine_options,
                            executor=ray_options(kw), merge=merge)
    click.echo(result.summary())


@click.command("train")
@click.argument("mode", type=click.Choice(["valve", "valve++", "progressive"]))
@click.option("--model", required=True, help="The model θ to train a LoRA on (folder or Hub id).")
@click.option("--data", required=True, help="A `tvtool mixchain` folder, MixChain-Z .parquet/.jsonl, or .jsonl "
                                            "question/solution pairs.")
@click.option("-o", "--output", required=True, help="Adapter folder to write (resumable: re-run to continue).")
@click_options(TrainOptions)
@click_options(PromptOptions)
def train_cmd(mode: str, model: str, data: str, output: str, **kw) -> None:
    """Train a CoT-Valve LoRA: valve (one column), valve++ (per-sample β, eq. 3-4) or progressive (+P).
    Runs unchanged under `accelerate launch` (DDP)."""
    result = train(mode=mode, model=model, data=data, output=output, options=from_cli(TrainOptions, kw),
                   prompt=from_cli(PromptOptions, kw))
    if result.record:
        click.echo(result.summary())
