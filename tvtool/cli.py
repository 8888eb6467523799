"""The `tvtool` command: one click group; each command builds options, calls one library function, prints.

Errors from the library (`TvtoolError`) become one line on stderr and exit code 2, here and only here.
"""

from __future__ import annotations

import sys

import click

from . import __version__
from .delta import DeltaOptions, delta
from .errors import TvtoolError
from .hub import PushOptions, push
from .materialize import MaterializeOptions, materialize
from .options import click_options, from_cli


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TvtoolError as e:
            click.echo(f"tvtool: error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("tvtool: interrupted; partial outputs were removed, re-run to finish", err=True)
            sys.exit(130)


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
def materialize_cmd(base: str, delta_path: str | None, reasoner: str | None, output: str, **kw) -> None:
    """Write merged checkpoints θ1 + α·Δ for every --alpha, in one pass over the inputs."""
    result = materialize(base=base, delta=delta_path, reasoner=reasoner, output=output,
                         options=from_cli(MaterializeOptions, kw))
    click.echo(result.summary())


@main.command("push")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click_options(PushOptions)
def push_cmd(folder: str, **kw) -> None:
    """Push α folder(s), a sweep, a LoRA adapter or a dataset folder to the Hugging Face Hub."""
    click.echo(push(folder=folder, options=from_cli(PushOptions, kw)).summary())
