"""`tvtool delta`."""

from __future__ import annotations

import click

from tvtool.options import click_options, from_cli
from tvtool.vectors.delta import DeltaOptions, delta


@click.command("delta")
@click.argument("base")
@click.argument("reasoner")
@click.option("-o", "--output", required=True, help="A .safetensors file, or a folder (sharded, with an index).")
@click_options(DeltaOptions)
def delta_cmd(base: str, reasoner: str, output: str, **kw) -> None:
    """Write the task vector Δ = REASONER − BASE (float32 math, streamed tensor by tensor)."""
    result = delta(base=base, reasoner=reasoner, output=output, options=from_cli(DeltaOptions, kw))
    click.echo(result.summary())
