"""What `tvtool serve` starts, decided before anything starts: options, names, checks, vLLM's arguments.

`plan_serve` checks the options, factors a full-rank valve when asked (`--rank`, cached), opens the valve,
checks it fits the base, builds one α adapter per served α (`tvtool.lowrank.alpha_adapter`) and returns
the `vllm serve` arguments, the child's environment and the served names (`tvtool.engine.serve` runs them).
`requested_alpha` parses a request's model name NAME@α (also in the server process, `serve_process`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from tvtool.engine.options import EngineOptions, check_engine_options, vllm_version
from tvtool.errors import MismatchError, OptionsError
from tvtool.io.checkpoint import Checkpoint
from tvtool.io.layout import format_alpha
from tvtool.io.paths import cache_dir
from tvtool.lowrank.alpha_adapter import Valve, alpha_adapters, check_alpha_range, open_valve, valve_kind
from tvtool.lowrank.svd import LowRankOptions, svd_rank
from tvtool.io.finite import check_alphas
from tvtool.vectors.source import DeltaSource
from tvtool.options import CliOptions, opt

DEFAULT_ALPHA_RANGE = "0:1.25"  # the α a request may ask for with --any-alpha: the paper's α ∈ [0, 1] and beyond
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ServeOptions(CliOptions):
    alphas: tuple[float, ...] = opt((0.0, 0.5, 1.0), "α values served from the start, each as NAME@α "
                                                     "(NAME@0 gives the base model's outputs).", flag="--alpha",
                                    short="-a")
    name: str = opt("valve", "Model name prefix: a request asks for NAME@α.")
    any_alpha: bool = opt(False, "Also serve NAME@α for any α in --alpha-range, its adapter built on the first "
                                 "request (a vLLM LoRA resolver).")
    alpha_range: str | None = opt(None, f"With --any-alpha: the α a request may ask for, LO:HI (default "
                                        f"{DEFAULT_ALPHA_RANGE}).")
    max_loras: int | None = opt(None, "Adapters decoded in one batch (default: every served α, plus 4 with "
                                      "--any-alpha).")
    rank: int | None = opt(None, "VALVE is a full-rank delta or a reasoner: factor it at this rank first "
                                 "(svd-rank, cached and re-used).")
    host: str = opt("127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
    port: int = opt(8000, "Port to listen on.")
    api_key: str | None = opt(None, "Require this key (Authorization: Bearer KEY); VLLM_API_KEY works too.")
    cache: str | None = opt(None, "Folder for α adapters and factored valves (default: $TVTOOL_CACHE, else "
                                  "~/.cache/tvtool).")
    log: str | None = opt(None, "Server log file (default: <cache>/logs/serve-NAME-PORT.log).")
    ready_timeout: float = opt(900.0, "Seconds to wait for the server to answer before giving up.")


@dataclass(frozen=True)
class ServePlan:
    """What the server process is started with: vLLM's arguments, its environment, the served names."""

    url: str  # http://host:port/v1 (the address clients use)
    names: dict[str, Path]  # NAME@α → adapter folder
    valve: Valve
    argv: list[str]  # vLLM `serve` arguments
    env: dict[str, str | None]  # set (None: removed) in the child's environment
    spec: dict  # what the child reads (tvtool.engine.serve_process)
    log: Path
    alpha_range: tuple[float, float] | None  # with any_alpha


# --- names ------------------------------------------------------------------------------------


def base_name(name: str) -> str:
    """vLLM's served model name: the base without any adapter (NAME@0 is the α = 0 adapter, B = 0)."""
    return f"{name}@base"


def served_name(name: str, alpha: float) -> str:
    """The model name of the valve at α: NAME@α (α as `format_alpha` writes it: 0.5, 1, 0.37)."""
    return f"{name}@{format_alpha(float(alpha))}"


def parse_range(text: str) -> tuple[float, float]:
    """'0:1.25' → (0.0, 1.25)."""
    try:
        lo, hi = (float(x) for x in text.split(":"))
    except ValueError:
        raise OptionsError(f"bad α range {text!r}", where="--alpha-range", fix="write it as LO:HI, e.g. 0:1.25") \
            from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise OptionsError(f"bad α range {text!r}", where="--alpha-range", fix="need finite LO ≤ HI, e.g. 0:1.25")
    return lo, hi


def requested_alpha(model: str, *, name: str, alpha_range: tuple[float, float]) -> float | None:
    """α of a requested model name NAME@α; None when the name is not NAME@…; an OptionsError (one line a
    client can read) when it is malformed or α is outside the range."""
    prefix = f"{name}@"
    if not model.startswith(prefix):
        return None
    text = model[len(prefix):]
    lo, hi = (format_alpha(x) for x in alpha_range)
    try:
        alpha = float(text)
    except ValueError:
        alpha = math.nan
    if not math.isfinite(alpha) or not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text):
        raise OptionsError(f"{model!r} does not name an α", where="model",
                           fix=f"ask for {name}@α with a number α in [{lo}, {hi}], e.g. {name}@0.5")
    return check_alpha_range(alpha, alpha_range, where=f"model {model!r}")


# --- checks before anything starts -------------------------------------------------------------


def check_serve_options(o: ServeOptions) -> tuple[float, float] | None:
    """Refuse bad options in one line; the α range (with any_alpha)."""
    if not _NAME.match(o.name):
        raise OptionsError(f"bad model name {o.name!r}", where="--name",
                           fix="use letters, digits, '.', '_' or '-' (the α goes after an '@')")
    if not o.alphas:
        raise OptionsError("no α to serve", where="--alpha", fix="pass e.g. --alpha 0,0.5,1")
    check_alphas(o.alphas)
    if not 0 < o.port < 65536:
        raise OptionsError(f"port {o.port} is not a TCP port", where="--port", fix="use 1-65535")
    if o.max_loras is not None and o.max_loras < 1:
        raise OptionsError(f"--max-loras must be at least 1, got {o.max_loras}", where="--max-loras")
    if o.rank is not None and o.rank < 1:
        raise OptionsError(f"--rank must be a positive integer, got {o.rank}", where="--rank")
    if o.ready_timeout <= 0:
        raise OptionsError("--ready-timeout must be positive", where="--ready-timeout")
    if o.alpha_range is not None and not o.any_alpha:
        raise OptionsError("--alpha-range needs --any-alpha", where="--alpha-range",
                           fix="add --any-alpha, or remove --alpha-range")
    rng = parse_range(o.alpha_range or DEFAULT_ALPHA_RANGE) if o.any_alpha else None
    if rng is not None:
        for a in o.alphas:
            check_alpha_range(a, rng, where="--alpha")
    return rng


def check_port(host: str, port: int) -> None:
    """One line when `host:port` cannot be listened on (in use, or an address not on this machine)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OptionsError(f"cannot resolve the address {host!r}: {e.strerror}", where="--host",
                           fix="use an address of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a closing port is free
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == 98:  # EADDRINUSE
                raise OptionsError(f"port {port} on {host} is already in use", where=f"--port {port}",
                                   fix="stop what listens there, or pass another --port") from None
            raise OptionsError(f"cannot listen on {host}:{port}: {e.strerror}", where="--host",
                               fix="use an address of this machine, e.g. 127.0.0.1") from None


def check_fits(valve: Valve, base: str | os.PathLike) -> None:
    """Every module the valve adapts is a linear weight of the base with the same shape."""
    ckpt = Checkpoint.open(base)
    for m in valve.modules:
        name = m.module + ".weight"
        shape = tuple(ckpt.info(name).shape) if name in ckpt else None
        if shape != tuple(m.shape):
            raise MismatchError(f"the valve does not fit the base: {name} is {shape or 'absent'} in the base, "
                                f"{tuple(m.shape)} in the valve", where=f"{valve.path} on {base}",
                                fix="serve the valve on the model it was trained (or factored) on")


# --- the plan ---------------------------------------------------------------------------------


def plan_serve(*, base: str | os.PathLike, valve: str | os.PathLike, options: ServeOptions,
               engine_options: EngineOptions = EngineOptions(), progress: bool = True) -> ServePlan:
    """Check the options and the valve, build the α adapters, and the vLLM arguments (nothing started)."""
    o, eo = options, engine_options
    rng = check_serve_options(o)
    check_engine_options(eo)
    cache = cache_dir(o.cache)
    path = factored_valve(valve=valve, base=base, rank=o.rank, cache=cache, progress=progress) if o.rank else valve
    v = open_valve(path)  # refuses a full-rank delta or a reasoner with the command that factors it
    check_fits(v, base)
    adapters = alpha_adapters(v, o.alphas, cache=cache)  # α = 0 too: B = 0, the base's outputs exactly
    names = {served_name(o.name, a): p for a, p in sorted(adapters.items())}
    max_loras = o.max_loras or len(adapters) + (4 if o.any_alpha else 0)
    modules = [json.dumps({"name": n, "path": str(p), "base_model_name": base_name(o.name)}) for n, p in names.items()]
    argv = [str(base), "--served-model-name", base_name(o.name), "--host", o.host, "--port", str(o.port),
            "--enable-lora", "--max-lora-rank", str(v.rank), "--max-loras", str(max_loras),
            "--max-cpu-loras", str(max(max_loras, len(adapters)) + (16 if o.any_alpha else 0)),
            "--generation-config", "vllm", "--seed", "0", *engine_args(eo)]
    argv += ["--lora-modules", *modules]
    env: dict[str, str | None] = {
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1" if o.any_alpha else None,  # vLLM asks resolvers only then
        "VLLM_LORA_RESOLVER_CACHE_DIR": None, "VLLM_LORA_RESOLVER_HF_REPO_LIST": None,  # no other resolvers
        "VLLM_CPU_KVCACHE_SPACE": str(eo.cpu_kv_cache_gb) if eo.cpu_kv_cache_gb is not None else
        os.environ.get("VLLM_CPU_KVCACHE_SPACE")}
    if o.api_key:
        env["VLLM_API_KEY"] = o.api_key  # the key stays out of the process list
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(o.host, o.host)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{o.port}/v1"
    spec = {"argv": argv, "any_alpha": o.any_alpha, "name": o.name, "alpha_range": list(rng) if rng else None,
            "valve": str(path), "cache": str(cache)}
    log = Path(o.log) if o.log else cache / "logs" / f"serve-{o.name}-{o.port}.log"
    return ServePlan(url, names, v, argv, env, spec, log, rng)


def factored_valve(*, valve: str | os.PathLike, base: str | os.PathLike, rank: int,
                   cache: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """A full-rank delta or a reasoner factored at `rank` (`svd_rank`, only linear weights kept, the rest
    dropped since a LoRA cannot carry it); cached by the inputs' fingerprint and rank, and re-used when
    svd-rank's own record matches."""
    kind = valve_kind(valve)
    if kind in ("peft", "factored"):
        return Path(valve)
    src = DeltaSource(base=None, delta=str(valve)) if kind == "delta" else \
        DeltaSource(base=str(base), reasoner=str(valve))
    key = hashlib.sha256(f"{src.fingerprint()}:{rank}".encode()).hexdigest()[:16]
    out = cache_dir(cache) / "factored" / f"{key}-r{rank}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    svd_rank(source=src, output=out, options=LowRankOptions(rank=rank, drop_unfactored=True, overwrite=True,
                                                            progress=progress))
    return out


def engine_args(eo: EngineOptions) -> list[str]:
    """vLLM `serve` flags for the engine options (LoRA flags are serve's own)."""
    a = ["--dtype", eo.dtype, "--tensor-parallel-size", str(eo.tensor_parallel_size),
         "--pipeline-parallel-size", str(eo.pipeline_parallel_size),
         "--gpu-memory-utilization", str(eo.gpu_memory_utilization)]
    for flag, value in (("--max-model-len", eo.max_model_len), ("--max-num-seqs", eo.max_num_seqs),
                        ("--distributed-executor-backend", eo.distributed_executor_backend)):
        if value is not None:
            a += [flag, str(value)]
    a += ["--enforce-eager"] if eo.enforce_eager else []
    a += ["--trust-remote-code"] if eo.trust_remote_code else []
    return a


def banner(plan: ServePlan, *, api_key: bool) -> str:
    """What a user sees once the server answers: URL, names, a curl line, how to stop."""
    names, name = list(plan.names), plan.spec["name"]
    auth = " -H 'Authorization: Bearer <key>'" if api_key else ""
    example = names[-1]
    anyline = (f"\n  any α: {name}@α for α in [{format_alpha(plan.alpha_range[0])}, "
               f"{format_alpha(plan.alpha_range[1])}], built on its first request") if plan.alpha_range else ""
    return (f"tvtool: serving {plan.valve.describe()} at {plan.url} (vLLM {vllm_version()}, OpenAI API)\n"
            f"  models: {', '.join(names)}; {base_name(name)} is the base without adapter{anyline}\n"
            f"  try:    curl {plan.url}/chat/completions{auth} -H 'Content-Type: application/json' -d "
            f"'{{\"model\": \"{example}\", \"messages\": [{{\"role\": \"user\", \"content\": \"…\"}}]}}'\n"
            f"  log:    {plan.log}\n"
            f"  stop:   Ctrl-C")


__all__ = ["ServeOptions", "ServePlan", "banner", "base_name", "check_fits", "check_port", "check_serve_options",
           "engine_args", "factored_valve", "parse_range", "plan_serve", "requested_alpha", "served_name"]
