"""The `tvtool` command: one click group; each command builds options, calls one library function, prints.

Errors from the library (`TvtoolError`) become one line on stderr and exit code 2, here and only here.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import replace

import click

from tvtool._version import __version__
from tvtool.vectors.delta import DeltaOptions, delta
from tvtool.errors import OptionsError, TvtoolError, os_error
from tvtool.engine.engine import EngineOptions, SamplingOptions
from tvtool.evaluation.evaluate import evaluate
from tvtool.evaluation.generate import generate_responses
from tvtool.io.hub import PushOptions, push
from tvtool.lowrank.svd import LowRankOptions, svd_rank
from tvtool.lowrank.merged import MERGE_FLAGS
from tvtool.merge.materialize import MaterializeOptions, materialize
from tvtool.merge.options import MergeOptions
from tvtool.valve.mixchain import MixChainOptions, build_mixchain
from tvtool.options import FLOAT_LIST, click_options, from_cli
from tvtool.engine.prompting import PromptOptions
from tvtool.evaluation.runs import EvalOptions
from tvtool.sweep.run import SweepOptions, sweep
from tvtool.valve.train import TrainOptions, train
from tvtool.evaluation.units import RayOptions

# --- ray: `--ray [ADDRESS]` hands an α sweep to tvtool.evaluation.cluster ---
_RAY = click.option("--ray", "ray", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
                    help="Spread the α sweep over a pool of engines on a Ray cluster: no value = a local cluster, "
                         "or auto, host:port, ray://host:port.")


def _ray_options(kw: dict) -> RayOptions | None:
    address = kw.pop("ray")
    opts = from_cli(RayOptions, kw)
    return None if address is None else replace(opts, address=address)


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return super().invoke(ctx)
        except TvtoolError as e:
            click.echo(f"tvtool: error: {e}", err=True)
            sys.exit(e.exit_code)
        except OSError as e:  # disk full, read-only, permissions…: the cleanup already ran on the way out
            err = os_error(e)
            click.echo(f"tvtool: error: {err}", err=True)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("tvtool: interrupted; partial outputs were removed, re-run to finish", err=True)
            sys.exit(130)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"tvtool: warning: {message}", err=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="tvtool")
def main() -> None:
    """Task-vector arithmetic on LLM checkpoints: Δ = reasoner − base, and θ1 + α·Δ for any α."""


@main.command("delta")
@click.argument("base")
@click.argument("reasoner")
@click.option("-o", "--output", required=True, help="A .safetensors file, or a folder (sharded, with an index).")
@click_options(DeltaOptions)
def delta_cmd(base: str, reasoner: str, output: str, **kw) -> None:
    """Write the task vector Δ = REASONER − BASE (float32 math, streamed tensor by tensor)."""
    result = delta(base=base, reasoner=reasoner, output=output, options=from_cli(DeltaOptions, kw))
    click.echo(result.summary())


@main.command("materialize")
@click.argument("base")
@click.option("--delta", "delta_path", help="A delta written by `tvtool delta` or `tvtool svd-rank`.")
@click.option("--reasoner", help="The reasoner checkpoint (Δ is computed on the fly).")
@click.option("-o", "--output", required=True, help="Folder that receives one model folder per α.")
@click_options(MaterializeOptions)
@click_options(MergeOptions)
def materialize_cmd(base: str, delta_path: str | None, reasoner: str | None, output: str, **kw) -> None:
    """Write merged checkpoints θ1 + α·Δ for every --alpha, in one pass over the inputs
    (--method ties|dare_linear|… over one or several --vector: θ1 + α·merge(Δ_1..Δ_n))."""
    result = materialize(base=base, delta=delta_path, reasoner=reasoner, output=output,
                         options=from_cli(MaterializeOptions, kw), merge=from_cli(MergeOptions, kw))
    click.echo(result.summary())


@main.command("push")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click_options(PushOptions)
def push_cmd(folder: str, **kw) -> None:
    """Push α folder(s), a sweep, a LoRA adapter or a dataset folder to the Hugging Face Hub."""
    click.echo(push(folder=folder, options=from_cli(PushOptions, kw)).summary())


def _run_options(fn):
    """The inputs shared by `tvtool eval` and `tvtool generate`."""
    for deco in reversed([
        click.argument("checkpoints", nargs=-1),
        click.option("--model", help="One model folder (or Hub id) to evaluate; with --lora, the adapters' base."),
        click.option("--base", help="α sweep: the base θ1 (θ1 + α·Δ is loaded in place, one engine)."),
        click.option("--delta", "delta_path", help="α sweep: a delta written by `tvtool delta`."),
        click.option("--reasoner", help="α sweep: the reasoner θ2 (Δ computed on the fly)."),
        click.option("--alpha", "-a", "alphas", type=FLOAT_LIST, multiple=True,
                     help="α values (repeat, or comma-separate); with --lora: one α label per adapter."),
        click.option("--lora", "loras", multiple=True,
                     help="A PEFT LoRA adapter folder (repeat); served by one engine with LoRA enabled."),
        click.option("-o", "--output", required=True, help="Output folder (resumable: re-run to finish)."),
        click_options(EvalOptions, exclude=("score",)),
        click_options(MergeOptions),
        click_options(PromptOptions),
        click_options(SamplingOptions),
        click_options(EngineOptions),
        _RAY,
        click_options(RayOptions, exclude=("address",)),
    ]):
        fn = deco(fn)
    return fn


def _run_kwargs(checkpoints, model, base, delta_path, reasoner, alphas, loras, output, kw) -> dict:
    return dict(output=output, model=model, base=base, delta=delta_path, reasoner=reasoner,
                alphas=tuple(a for part in alphas for a in part), checkpoints=checkpoints, loras=loras,
                options=from_cli(EvalOptions, kw), merge=from_cli(MergeOptions, kw), prompt=from_cli(PromptOptions, kw),
                sampling=from_cli(SamplingOptions, kw), engine_options=from_cli(EngineOptions, kw))


@main.command("eval")
@_run_options
def eval_cmd(checkpoints, model, base, delta_path, reasoner, alphas, loras, output, **kw) -> None:
    """Generate with vLLM and score: one --model, CHECKPOINTS folders, an α sweep
    (--base with --delta|--reasoner and --alpha, one engine, weights swapped in place;
    --include/--exclude pick the tensors α applies to),
    or --lora adapters. Writes samples.jsonl, summary.json, run.json per run and, for
    several runs, a summary table (markdown, JSON) and plot."""
    executor = _ray_options(kw)
    result = _run(evaluate, executor, _run_kwargs(checkpoints, model, base, delta_path, reasoner, alphas, loras,
                                                  output, kw))
    click.echo(result.summary())


def _run(local, executor: RayOptions | None, kwargs: dict):
    """The one-engine verb, or (`--ray`) the α sweep on a Ray pool."""
    if executor is None:
        return local(**kwargs)
    from tvtool.evaluation.cluster import evaluate_on_ray

    if kwargs["model"] or kwargs["checkpoints"] or kwargs["loras"]:
        raise OptionsError("--ray runs α sweeps", where="--ray",
                          fix="pass --base with --delta|--reasoner and --alpha (or drop --ray)")
    if local is generate_responses:
        kwargs["options"] = replace(kwargs["options"], score=False)
    for k in ("model", "checkpoints", "loras"):
        kwargs.pop(k)
    return evaluate_on_ray(executor=executor, **kwargs)


@main.command("generate")
@_run_options
def generate_cmd(checkpoints, model, base, delta_path, reasoner, alphas, loras, output, **kw) -> None:
    """Like `tvtool eval` without scoring: responses, token ids and finish reasons in samples.jsonl."""
    executor = _ray_options(kw)
    result = _run(generate_responses, executor, _run_kwargs(checkpoints, model, base, delta_path, reasoner, alphas,
                                                             loras, output, kw))
    click.echo(result.summary())


@main.command("mixchain")
@click.argument("base")
@click.option("--delta", "delta_path", help="A delta written by `tvtool delta` (or give --reasoner).")
@click.option("--reasoner", help="The reasoner checkpoint (Δ is computed on the fly).")
@click.option("-o", "--output", required=True, help="Dataset folder to write (parquet, README.md card, mixchain.json).")
@click_options(MixChainOptions)
@click_options(MergeOptions)
@click_options(SamplingOptions, exclude=("n",))
@click_options(PromptOptions)
@click_options(EngineOptions, exclude=("enable_lora", "max_lora_rank"))
@_RAY
@click_options(RayOptions, exclude=("address",))
def mixchain_cmd(base: str, delta_path: str | None, reasoner: str | None, output: str, **kw) -> None:
    """Build a MixChain-Z dataset: the ground-truth solution plus one greedy chain per α from θ1 + α·Δ
    (one vLLM engine, weights swapped in place), wrong chains removed, β per solution (CoT-Valve eq. 4);
    with --method/--vector, from θ1 + α·M (the operator's merge). Resumable: re-run the same command."""
    options, sampling, merge = from_cli(MixChainOptions, kw), from_cli(SamplingOptions, kw), from_cli(MergeOptions, kw)
    prompt, engine_options = from_cli(PromptOptions, kw), from_cli(EngineOptions, kw)
    result = build_mixchain(base=base, delta=delta_path, reasoner=reasoner, output=output, options=options,
                            prompt=prompt, sampling=sampling, engine_options=engine_options,
                            executor=_ray_options(kw), merge=merge)
    click.echo(result.summary())


@main.command("train")
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


@main.command("sweep")
@click.argument("recipe", type=click.Path())
@click_options(SweepOptions, exclude=("ray",))
@_RAY
def sweep_cmd(recipe: str, **kw) -> None:
    """Run a recipe end to end (delta, low rank, models, evaluation, report, push); re-run to resume."""
    click.echo(sweep(recipe=recipe, options=from_cli(SweepOptions, kw)).summary())


@main.command("svd-rank")
@click.argument("delta_path", required=False, metavar="[DELTA]")
@click.option("--base", help="Base checkpoint; with --reasoner, instead of DELTA (Δ computed on the fly).")
@click.option("--reasoner", help="Reasoner checkpoint (with --base).")
@click.option("-o", "--output", required=True, help="Factored delta: a .safetensors file, or a folder (sharded).")
@click_options(LowRankOptions)
@click_options(MergeOptions, rename=MERGE_FLAGS)
def svd_rank_cmd(delta_path: str | None, base: str | None, reasoner: str | None, output: str, **kw) -> None:
    """Factor Δ into rank-R (or energy-E) B·A per 2-D weight; optionally write PEFT/vLLM LoRA adapters.
    With --merge-method (trim, ties, …) and/or several --vector: factor the operator's merged M instead."""
    result = svd_rank(delta=delta_path, base=base, reasoner=reasoner, output=output,
                      options=from_cli(LowRankOptions, kw), merge=from_cli(MergeOptions, kw, rename=MERGE_FLAGS))
    click.echo(result.table())
