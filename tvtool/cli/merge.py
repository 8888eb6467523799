"""`tvtool materialize`."""

from __future__ import annotations

import click

from tvtool.cli.inputs import inputs, merge_options, source_options
from tvtool.merge.materialize import materialize
from tvtool.merge.options import MaterializeOptions
from tvtool.options import click_options, from_cli


@click.command("materialize")
@source_options(base="argument")
@click.option("-o", "--output", required=True, help="Folder that receives one model folder per α.")
@click_options(MaterializeOptions)
@merge_options()
def materialize_cmd(output: str, **kw) -> None:
    """Write merged checkpoints θ1 + α·Δ for every --alpha, in one pass over the inputs
    (--method ties|dare_linear|… over one or several --vector: θ1 + α·merge(Δ_1..Δ_n))."""
    source, merge = inputs(kw)
    result = materialize(source=source, output=output, options=from_cli(MaterializeOptions, kw), merge=merge)
    click.echo(result.summary())
