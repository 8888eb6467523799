"""`tvtool sweep`."""

from __future__ import annotations

import json

import click

from tvtool.cli.ray import RAY
from tvtool.options import click_options, from_cli
from tvtool.sweep.planning import SweepPlanOptions
from tvtool.sweep.run import SweepOptions, plan, sweep


@click.command("sweep")
@click.argument("recipe", type=click.Path())
@click_options(SweepOptions, exclude=("ray",))
@RAY
@click.option("--plan", "plan_only", is_flag=True, help="Run nothing: print each stage's commands, the disk it will "
                                                         "write, its memory plan and whether it is finished.")
@click.option("--json", "as_json", is_flag=True, help="With --plan: the plan as JSON.")
@click_options(SweepPlanOptions)
def sweep_cmd(recipe: str, plan_only: bool, as_json: bool, **kw) -> None:
    """Run a recipe end to end (delta, low rank, models, evaluation, report, push); re-run to resume."""
    options = from_cli(SweepOptions, kw)
    if plan_only:
        p = plan(recipe=recipe, options=options, plan_options=from_cli(SweepPlanOptions, kw))
        click.echo(json.dumps(p.to_dict(), indent=1, default=str) if as_json else "\n".join(p.lines()))
        return
    click.echo(sweep(recipe=recipe, options=options).summary())
