"""`tvtool push`."""

from __future__ import annotations

import click

from tvtool.io.hub import PushOptions, push
from tvtool.options import click_options, from_cli


@click.command("push")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click_options(PushOptions)
def push_cmd(folder: str, **kw) -> None:
    """Push α folder(s), a sweep, a LoRA adapter or a dataset folder to the Hugging Face Hub."""
    click.echo(push(folder=folder, options=from_cli(PushOptions, kw)).summary())
