"""`tvtool serve`: a valve behind vLLM's OpenAI-compatible server, α chosen per request."""

from __future__ import annotations

import click

from tvtool.engine.options import EngineOptions
from tvtool.engine.serve import serve
from tvtool.engine.serve_plan import ServeOptions
from tvtool.options import click_options, from_cli


@click.command("serve")
@click.option("--base", required=True, help="The model the valve belongs to (folder or Hub id).")
@click.option("--delta", "valve", required=True,
              help="The valve: a PEFT LoRA adapter folder (tvtool train, or any tool) or a factored delta "
                   "(tvtool svd-rank); with --rank, also a full-rank delta or a reasoner.")
@click_options(ServeOptions)
@click_options(EngineOptions, exclude=("enable_lora", "max_lora_rank", "max_loras"))
def serve_cmd(base: str, valve: str, **kw) -> None:
    """Serve a valve with vLLM's OpenAI-compatible API server: each α is the model NAME@α (one LoRA
    adapter with α baked in; NAME@0 gives the base's outputs), so every request picks its chain length.
    Runs until Ctrl-C or SIGTERM; vLLM's log goes to a file."""
    result = serve(base=base, valve=valve, options=from_cli(ServeOptions, kw), engine_options=from_cli(EngineOptions, kw),
                   announce=lambda text: click.echo(text, err=True))
    click.echo(result.summary(), err=True)
