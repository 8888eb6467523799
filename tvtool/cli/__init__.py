"""The `tvtool` command: one click group; each command (one module per area in this folder) builds options,
calls one library function and prints.

Errors from the library (`TvtoolError`) become one line on stderr and exit code 2, here and only here.
"""

from __future__ import annotations

import sys
import warnings

import click

from tvtool._version import __version__
from tvtool.cli.delta import delta_cmd
from tvtool.cli.evaluate import eval_cmd, generate_cmd
from tvtool.cli.lowrank import svd_rank_cmd
from tvtool.cli.merge import materialize_cmd
from tvtool.cli.push import push_cmd
from tvtool.cli.serve import serve_cmd
from tvtool.cli.sweep import sweep_cmd
from tvtool.cli.valve import mixchain_cmd, train_cmd
from tvtool.errors import TvtoolError, os_error


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


for _command in (delta_cmd, svd_rank_cmd, materialize_cmd, eval_cmd, generate_cmd, mixchain_cmd, train_cmd, sweep_cmd,
                 serve_cmd, push_cmd):
    main.add_command(_command)
