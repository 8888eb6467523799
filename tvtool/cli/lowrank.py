"""`tvtool svd-rank`."""

from __future__ import annotations

import click

from tvtool.cli.inputs import inputs, merge_options, source_options
from tvtool.lowrank.merged import MERGE_FLAGS
from tvtool.lowrank.svd import LowRankOptions, svd_rank
from tvtool.options import click_options, from_cli


@click.command("svd-rank")
@source_options(base="option", delta="argument", base_help="Base checkpoint; with --reasoner, instead of DELTA "
                "(Δ computed on the fly).", reasoner_help="Reasoner checkpoint (with --base).")
@click.option("-o", "--output", required=True, help="Factored delta: a .safetensors file, or a folder (sharded).")
@click_options(LowRankOptions)
@merge_options(rename=MERGE_FLAGS, alpha_free=True)
def svd_rank_cmd(output: str, **kw) -> None:
    """Factor Δ into rank-R (or energy-E) B·A per 2-D weight; optionally write PEFT/vLLM LoRA adapters.
    With --merge-method (trim, ties, …) and/or several --vector: factor the operator's merged M instead."""
    source, merge = inputs(kw, rename=MERGE_FLAGS)
    result = svd_rank(source=source, output=output, options=from_cli(LowRankOptions, kw), merge=merge)
    click.echo(result.table())
