"""`tvtool svd-rank`."""

from __future__ import annotations

import click

from tvtool.lowrank.merged import MERGE_FLAGS
from tvtool.lowrank.svd import LowRankOptions, svd_rank
from tvtool.merge.options import MergeOptions
from tvtool.options import click_options, from_cli


@click.command("svd-rank")
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
