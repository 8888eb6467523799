"""What one vLLM engine holds, planned from the model's shapes and `EngineOptions` (no vLLM, no torch): the
weights in the engine's dtype per GPU, LoRA slots, the KV cache the rest leaves, and the copies of θ1 and Δ the
resident α swap keeps besides them.

Per GPU under tensor (TP) and pipeline (PP) parallelism, each GPU holding 1/(TP·PP) of the weights (vLLM
shards the projections and the vocabulary; the few replicated norms are noise):
  weights   W / (TP·PP), W = Σ numel × the engine dtype's bytes over the served tensors
  LoRA      `max_loras` (vLLM's default, 1) adapter slots at `max_lora_rank`: A [r, in] and B [out, r] per
            projection of every layer, in the engine dtype
  KV cache  on a GPU: gpu_memory_utilization × the GPU's memory, less the above and less vLLM's activation
            peak and CUDA graphs (profiled by vLLM at start: not planned); on a CPU: `cpu_kv_cache_gb`.
            Per token: 2 (K and V) × layers/PP × KV heads/TP × head_dim × the dtype's bytes.
  resident  an α sweep with `--resident auto|gpu|cpu` keeps, per worker, what `placement.held_bytes` counts
            (θ1, and θ2 or a float32 M) outside vLLM's budget: on the GPU in the memory vLLM leaves
            ((1 − utilization) × memory), else in (pinned) CPU memory, one copy per worker of the host; where
            it goes is `placement.choose`'s decision (the engine's own, from what is free at start; planned
            here against the GPU's headroom and this machine's whole RAM).
A GPU engine starts only when the KV cache holds at least one sequence of `max_model_len` tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from tvtool.engine.options import EngineOptions
from tvtool.engine.placement import choose

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LORA_SLOTS = 1  # vLLM's default max_loras (tvtool does not set it): adapter slots allocated at start


def engine_dtype(options: EngineOptions, stored: str) -> str:
    """The dtype the engine computes in: `--dtype`, or vLLM 0.32's `auto` rule (`_resolve_auto_dtype`): the
    checkpoint's dtype, a float32 one downcast to the platform's first supported dtype (bfloat16 on Ampere and
    later GPUs and on x86 CPUs)."""
    if options.dtype != "auto":
        return options.dtype
    return "bfloat16" if stored == "float32" else stored


@dataclass(frozen=True)
class EngineMemory:
    """One engine's memory, per GPU (or in RAM for a CPU engine), by component (bytes)."""

    device: str  # "GPU" or "CPU"
    dtype: str
    gpus: int  # GPUs per engine: tensor × pipeline parallel size
    components: dict[str, int]  # weights, copies, LoRA slots: what the engine holds besides its KV cache
    budget: int | None  # what vLLM may use per GPU (gpu_memory_utilization × memory), or the RAM (CPU)
    kv: int | None  # the KV cache: what the budget leaves (GPU), cpu_kv_cache_gb (CPU); None: unknown
    kv_token: int  # KV-cache bytes per token, per GPU
    context: int  # tokens of one sequence (max_model_len, else the model's)
    notes: list[str] = field(default_factory=list)
    resident: dict | None = None  # the resident α swap: need (bytes per worker), placement, message

    @property
    def held(self) -> int:
        return sum(self.components.values())

    @property
    def kv_tokens(self) -> int | None:
        return None if self.kv is None else max(0, self.kv) // max(1, self.kv_token)

    @property
    def fits(self) -> bool | None:
        if self.resident is not None and self.resident["refused"]:
            return False
        if self.budget is None:
            return None
        if self.device == "CPU":
            return self.held + (self.kv or 0) <= self.budget
        return self.kv is not None and self.kv >= self.context * self.kv_token

    def to_dict(self) -> dict:
        return {**asdict(self), "held": self.held, "kv_tokens": self.kv_tokens, "fits": self.fits}

    def lines(self) -> list[str]:
        where = f"per GPU ({self.gpus} GPU{'s' * (self.gpus > 1)} per engine)" if self.device == "GPU" else "in RAM"
        out = [f"engine ({self.dtype}, {self.device}), {where}:"]
        out += [f"  {k:<34}{gib(v):>11}" for k, v in self.components.items()]
        if self.device == "GPU":
            if self.budget is None:
                out.append("  GPU memory unknown (--gpu-memory): KV cache not planned")
            else:
                out.append(f"  {'vLLM budget (utilization × memory)':<34}{gib(self.budget):>11}")
                out.append(f"  {'KV cache (budget − the above)':<34}{gib(max(0, self.kv)):>11}"
                           f"  ≈ {self.kv_tokens:,} tokens ({gib(self.kv_token, small=True)} per token); "
                           f"{self.kv_tokens // max(1, self.context)} sequences of {self.context:,}, less vLLM's "
                           "activation peak")
        else:
            kv = "vLLM's default (VLLM_CPU_KVCACHE_SPACE)" if self.kv is None else gib(self.kv)
            out.append(f"  {'KV cache (cpu_kv_cache_gb)':<34}{kv:>11}")
            if self.budget is not None:
                out.append(f"  {'RAM of this machine':<34}{gib(self.budget):>11}")
        if self.resident is not None:
            rs = self.resident
            where = {"gpu": "on each GPU, beside vLLM's budget", "cpu": "in (pinned) CPU memory, per worker"}.get(
                rs["placement"], "")
            out.append(f"  {'resident θ1, Δ (' + rs['mode'] + ')':<34}{gib(rs['need']):>11}  per worker; "
                       + (rs["message"] or where))
        out += [f"  note: {n}" for n in self.notes]
        if self.fits is not None:
            refused = self.resident is not None and self.resident["refused"]
            out.append("  fits" if self.fits else f"  does not fit: {self.resident['message']}" if refused else
                       "  does not fit: " + ("the KV cache cannot hold one sequence of max_model_len "
                                             f"({self.context:,} tokens): raise tensor_parallel_size or "
                                             "gpu_memory_utilization, or lower max_model_len"
                                             if self.device == "GPU" else "weights and KV cache exceed the RAM"))
        return out


def kv_bytes_per_token(config: Mapping[str, Any], *, dtype: str, options: EngineOptions) -> int:
    """KV-cache bytes per token on one GPU: K and V of every layer this GPU runs, its share of the KV heads."""
    cfg = config.get("text_config", config)
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    layers = math.ceil(int(cfg["num_hidden_layers"]) / options.pipeline_parallel_size)
    per_gpu = max(1, math.ceil(kv_heads / options.tensor_parallel_size))  # vLLM replicates KV heads below TP
    return 2 * layers * per_gpu * head_dim * DTYPE_BYTES[dtype]


def plan_engine(*, weights: int, dtype: str, config: Mapping[str, Any], options: EngineOptions,
                gpu_memory: int | None, ram: int | None = None, lora: int = 0,
                resident: int | None = None) -> EngineMemory:
    """The memory of an engine serving `weights` bytes (in `dtype`) of a model with `config` (config.json), on
    GPUs of `gpu_memory` bytes each (None: a CPU engine, planned against `ram`). `lora`: bytes of one LoRA slot
    (all GPUs); `resident`: bytes the resident α swap would keep per worker (`placement.held_bytes` summed over
    its share; None: no in-place α sweep on this engine)."""
    gpus = options.tensor_parallel_size * options.pipeline_parallel_size
    cfg = config.get("text_config", config)
    context = options.max_model_len or int(cfg.get("max_position_embeddings") or 4096)
    kv_token = kv_bytes_per_token(config, dtype=dtype, options=options)
    device = "GPU" if gpu_memory is not None else "CPU"
    share = gpus if device == "GPU" else 1
    comp = {"weights": weights // share}
    if lora:
        comp[f"LoRA slots ({LORA_SLOTS} × rank {options.max_lora_rank})"] = LORA_SLOTS * lora // share
    if device == "GPU":
        budget = int(options.gpu_memory_utilization * gpu_memory)
        kv = budget - sum(comp.values())
    else:
        budget, kv = ram, None if options.cpu_kv_cache_gb is None else options.cpu_kv_cache_gb * GiB
    res = None
    if resident is not None and options.resident != "off":
        c = choose(mode=options.resident, need=resident, free_gpu=None if device == "CPU" else gpu_memory - budget,
                   free_cpu=ram or 0, workers_per_host=share)
        res = {"mode": options.resident, "need": resident, "placement": c.placement, "message": c.message,
               "refused": c.refused}
        if device == "CPU" and c.placement is not None:
            comp["resident θ1 and Δ"] = resident
    notes = []
    if device == "CPU" and options.tensor_parallel_size > 1:
        notes.append(f"tensor_parallel_size {options.tensor_parallel_size} on a CPU: planned as one process")
    return EngineMemory(device, dtype, gpus if device == "GPU" else 1, comp, budget, kv, kv_token, context, notes, res)


def gib(n: float, *, small: bool = False) -> str:
    """Bytes as GiB (MiB below 1 GiB; KiB below 1 MiB with `small`)."""
    if small and n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


__all__ = ["EngineMemory", "engine_dtype", "kv_bytes_per_token", "plan_engine"]
