"""`tvtool materialize`."""

from __future__ import annotations

import click

from tvtool.merge.materialize import MaterializeOptions, materialize
from tvtool.merge.options import MergeOptions
from tvtool.options import click_options, from_cli


@click.command("materialize")
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
