"""`tvtool sweep`."""

from __future__ import annotations

import click

from tvtool.cli.ray import RAY
from tvtool.options import click_options, from_cli
from tvtool.sweep.run import SweepOptions, sweep


@click.command("sweep")
@click.argument("recipe", type=click.Path())
@click_options(SweepOptions, exclude=("ray",))
@RAY
def sweep_cmd(recipe: str, **kw) -> None:
    """Run a recipe end to end (delta, low rank, models, evaluation, report, push); re-run to resume."""
    click.echo(sweep(recipe=recipe, options=from_cli(SweepOptions, kw)).summary())
