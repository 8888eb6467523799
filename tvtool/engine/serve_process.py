"""The server process of `tvtool serve`: `vllm serve` itself, plus the α resolver for `--any-alpha`.

Started by `tvtool.engine.serve` as `python -m tvtool.engine.serve_process SPEC` (SPEC, JSON: "argv" the
`vllm serve` arguments, "any_alpha", "name", "alpha_range", "valve", "cache"). It builds vLLM's own
`serve` parser and runs its `serve` subcommand (`ServeSubcommand`: one API server runs `run_server`),
exactly as `vllm serve ARGV` would.

With any_alpha, before the server starts:
- `AlphaResolver`, a `vllm.lora.resolver.LoRAResolver`, is registered in `LoRAResolverRegistry` in
  this process. vLLM loads resolver plugins through the `vllm.general_plugins` entry points (in every
  vLLM process of the environment); registering here instead affects this server only, and it is
  where they are used: `OpenAIServingModels` (built with the app state, in the API server process)
  reads the registry, and asks the resolvers for an unknown model name when
  VLLM_ALLOW_RUNTIME_LORA_UPDATING is set (`BaseServing._check_model`; the parent sets it). The
  resolver builds NAME@α's adapter on first use (`alpha_adapter`, in a thread, so the event loop goes
  on serving) and returns its LoRARequest; vLLM loads it and keeps it under that name.
- vLLM answers any resolver failure with a fixed message, so the serving models' `resolve_lora` is
  wrapped: a NAME@… that is malformed or out of range gets a 400 that says why and names the range
  (other unknown names keep vLLM's 404).
- VLLM_ALLOW_RUNTIME_LORA_UPDATING also mounts /v1/load_lora_adapter, /v1/unload_lora_adapter and
  SageMaker's /adapters routes, with which any client could load any folder of this machine as an
  adapter: they are removed.
The two hooks wrap `build_app` and `init_app_state` where `run_server` looks them up; a vLLM
without them is refused with one line.
"""

from __future__ import annotations

import asyncio
import json
import sys

from tvtool.engine.serve_plan import requested_alpha
from tvtool.errors import EngineError, OptionsError
from tvtool.lowrank.alpha_adapter import alpha_adapter, open_valve

# what VLLM_ALLOW_RUNTIME_LORA_UPDATING mounts: vLLM's load/unload routes and SageMaker's adapter routes
RUNTIME_LORA_ROUTES = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/adapters", "/adapters/{adapter_name}")


def resolver(spec: dict):
    """The LoRA resolver of `spec`'s valve: NAME@α → its α adapter (built on first use)."""
    from vllm.lora.request import LoRARequest  # vLLM is optional: this module runs only as the server
    from vllm.lora.resolver import LoRAResolver

    valve, name, rng, cache = open_valve(spec["valve"]), spec["name"], tuple(spec["alpha_range"]), spec["cache"]

    class AlphaResolver(LoRAResolver):
        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            try:
                alpha = requested_alpha(lora_name, name=name, alpha_range=rng)
            except OptionsError:
                return None  # answered with a 400 by `_clear_errors` before it gets here
            if alpha is None:
                return None
            path = await asyncio.to_thread(alpha_adapter, valve, alpha, cache=cache)
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path))  # vLLM assigns the id

    return AlphaResolver()


def _without_runtime_lora_routes(build_app):
    def wrapped(*args, **kwargs):
        app = build_app(*args, **kwargs)
        app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in RUNTIME_LORA_ROUTES]
        return app

    return wrapped


def _clear_errors(init_app_state, spec: dict):
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response  # vLLM: optional

    name, rng = spec["name"], tuple(spec["alpha_range"])

    async def wrapped(engine_client, state, args, *rest, **kwargs):
        await init_app_state(engine_client, state, args, *rest, **kwargs)
        models = state.openai_serving_models
        resolve = models.resolve_lora

        async def resolve_lora(lora_name: str):
            try:
                requested_alpha(lora_name, name=name, alpha_range=rng)
            except OptionsError as e:
                return create_error_response(message=str(e), param="model")  # a 400 naming the range
            return await resolve(lora_name)

        models.resolve_lora = resolve_lora

    return wrapped


def main(spec: dict) -> None:
    from vllm.entrypoints.cli.serve import ServeSubcommand  # vLLM: optional, and this is the server process
    from vllm.entrypoints.launchers.api_server import entry
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.lora.resolver import LoRAResolverRegistry
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()  # as `vllm serve` does (spawned workers)
    cmd = ServeSubcommand()
    parser = FlexibleArgumentParser(prog="tvtool serve (vllm serve)")
    cmd.subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(["serve", *spec["argv"]])
    configure_logging_from_args(args)
    cmd.validate(args)
    if spec["any_alpha"]:
        if not (hasattr(entry, "build_app") and hasattr(entry, "init_app_state")):
            raise EngineError("this vLLM's API server has no build_app/init_app_state to hook the α resolver into",
                              where=f"vllm {getattr(sys.modules.get('vllm'), '__version__', '?')}",
                              fix="serve fixed α values (no --any-alpha), or use vLLM 0.32")
        LoRAResolverRegistry.register_resolver("tvtool α adapters", resolver(spec))
        entry.build_app = _without_runtime_lora_routes(entry.build_app)
        entry.init_app_state = _clear_errors(entry.init_app_state, spec)
    cmd.cmd(args)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
