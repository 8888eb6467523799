"""The memory plan of `tvtool train`: what one process holds, by component, from the model's config.json alone.

A 32B bf16 base replicated per process, with activations for 4K-token chains, does not fit an 80 GB GPU:
the plan says so before anything loads, and names the smallest change that fits (shard the base, checkpoint
activations, a smaller micro-batch with more accumulation, a shorter --max-seq-len, more GPUs).

Bytes per process (N = micro-batch × T tokens; a = 2 (bf16 autocast) or 4 (fp32) bytes per activation; w the
same for the weights). The activation terms are what autograd keeps for a Llama/Qwen2/Mistral decoder layer
with a frozen base and LoRA on the listed projections (PyTorch's saved tensors, counted; checked against the
measured peak in tests/valve/test_train_memory.py and, on a GPU, scripts/gpu_check_memory.py):
  base weights    P·w, ÷ processes under --fsdp; FSDP also holds the unsharded unit being computed and the
                  prefetched next one (2 decoder layers, or a layer and the LM head)
  LoRA            weights, gradients (the accumulating unsharded copy) and AdamW's two moments, fp32
  activations     per layer and token: the two RMSNorm inputs in fp32 (8h) and their rsqrt; the LoRA-A inputs
                  that no other op keeps (normed input h·a for q/k/v, for gate/up; the MLP product i·a for
                  down; with LoRA dropout, each projection's dropped input and its mask); attention's q, k, v
                  and output ((2H + 2K)·d·a, K = H when a padding mask makes HF repeat the kv heads, i.e.
                  micro-batch > 1) and log-sum-exp (4H); the MLP's gate, SiLU(gate) and up (3·i·a); each
                  LoRA-A output (r·a); with padding, sdpa's additive mask (T·a per token).
                  --grad-checkpointing keeps one layer input (h·a) per layer and recomputes one layer's set
                  in the backward pass
  logits          12·N·V: the fp32 log-softmax kept for the backward pass, its gradient and the logits' gradient
  overhead        OVERHEAD_FIXED + OVERHEAD_SHARE of the rest: CUDA context, NCCL buffers, allocator
                  fragmentation
Peak = weights + LoRA + activations + max(logits, one recomputed layer with its backward temporaries) + overhead.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from tvtool.errors import CheckpointError, OptionsError
from tvtool.io.layout import parse_hub_ref
from tvtool.valve.options import TrainOptions, resolve

GiB = 2**30
OVERHEAD_FIXED = int(0.75 * GiB)  # CUDA context (~0.5 GiB) and NCCL buffers
OVERHEAD_SHARE = 0.10  # caching-allocator fragmentation, on top of the planned tensors
ARCHES = ("llama", "mistral", "qwen2")  # dense decoders whose saved tensors the formulas above count
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # PEFT all-linear


# --- the model, from config.json ------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """The shapes the plan needs, read from a Hugging Face config.json."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    context: int

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, where: str) -> "Arch":
        kind = cfg.get("model_type")
        if kind not in ARCHES:
            raise OptionsError(f"no memory plan for model type {kind!r}", where=where,
                               fix=f"the plan knows {', '.join(ARCHES)} decoders; pass --no-check-memory to train "
                                   "without one")
        h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        bias = bool(cfg.get("attention_bias", False))
        return cls(kind, h, int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"]), heads,
                   int(cfg.get("num_key_value_heads") or heads), int(cfg.get("head_dim") or h // heads),
                   int(cfg["vocab_size"]), bool(cfg.get("tie_word_embeddings", False)),
                   qkv_bias=bias or kind == "qwen2", o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)),
                   context=int(cfg.get("max_position_embeddings") or 4096))

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection of one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter tensor of the Hugging Face checkpoint, by name, with its shape: what a model's
        weights look like from config.json alone (`params` is their sum)."""
        h, lin = self.hidden, self.linears()
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        biased = {"q_proj": self.qkv_bias, "k_proj": self.qkv_bias, "v_proj": self.qkv_bias, "o_proj": self.o_bias,
                  "gate_proj": self.mlp_bias, "up_proj": self.mlp_bias, "down_proj": self.mlp_bias}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = (h,)
            for name, (fan_in, fan_out) in lin.items():
                where = p + ("self_attn." if name in PROJECTIONS[:4] else "mlp.") + name
                out[where + ".weight"] = (fan_out, fan_in)  # [out, in], as nn.Linear stores it
                if biased[name]:
                    out[where + ".bias"] = (fan_out,)
            out[p + "post_attention_layernorm.weight"] = (h,)
        out["model.norm.weight"] = (h,)
        if not self.tied:
            out["lm_head.weight"] = (self.vocab, h)
        return out

    def layer_params(self) -> int:
        lin = self.linears()
        biases = (self.qkv_bias * sum(lin[n][1] for n in ("q_proj", "k_proj", "v_proj")) + self.o_bias * self.hidden
                  + self.mlp_bias * (2 * self.intermediate + self.hidden))
        return sum(a * b for a, b in lin.values()) + biases + 2 * self.hidden  # + two RMSNorm weights

    def head_params(self) -> int:
        return self.vocab * self.hidden

    def params(self) -> int:
        """Every parameter of the base: embeddings, layers, final norm and (untied) LM head."""
        return self.head_params() * (1 if self.tied else 2) + self.layers * self.layer_params() + self.hidden

    def lora_params(self, *, rank: int, targets: tuple[str, ...]) -> int:
        return self.layers * sum(rank * (a + b) for n, (a, b) in self.linears().items() if n in targets)


def targets_of(target_modules: str) -> tuple[str, ...]:
    """The projections a --target-modules value adapts (PEFT's all-linear: all seven; the LM head never)."""
    if target_modules == "all-linear":
        return PROJECTIONS
    names = {t.strip().rsplit(".", 1)[-1] for t in target_modules.split(",")}
    return tuple(p for p in PROJECTIONS if p in names)


def load_config(model: str | os.PathLike) -> tuple[dict, str]:
    """(config.json, where it was read) of a model folder (weights not needed), a config file, or a Hub id (the
    HF cache first; else config.json alone is fetched)."""
    ref = str(model)
    p = Path(ref)
    if p.exists():  # a folder; a config .json itself; or a single .safetensors file beside its config.json
        f = p / "config.json" if p.is_dir() else p if p.suffix == ".json" else p.parent / "config.json"
        if not f.is_file():
            raise CheckpointError("no config.json", where=str(p),
                                  fix="the memory plan needs the model's config.json (the weights are not needed)")
        return _read_json(f), str(f)
    hub = parse_hub_ref(ref)
    if hub is None:
        raise CheckpointError("model not found", where=ref, fix="give a model folder or a Hub id like org/name")
    from huggingface_hub import hf_hub_download, try_to_load_from_cache  # a Hub id only: the local cache first

    repo_id, revision = hub
    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if isinstance(cached, str):
        return _read_json(Path(cached)), ref
    try:
        return _read_json(Path(hf_hub_download(repo_id, "config.json", revision=revision))), ref
    except Exception as e:  # offline, unknown repo, gated: huggingface_hub raises several types
        raise CheckpointError(f"config.json is not in the Hugging Face cache and could not be fetched "
                              f"({type(e).__name__})", where=ref,
                              fix="download it on a machine with a network, or pass a folder holding config.json"
                              ) from None


def _read_json(f: Path) -> dict:
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError("config.json is not JSON", where=str(f)) from None
    return cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}


# --- the plan --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fix:
    """The smallest change that fits: option changes (TrainOptions fields, or `gpus`) and the peak it gives."""

    changes: dict[str, Any]
    peak: int

    def text(self) -> str:
        flags = {"fsdp": "--fsdp", "grad_checkpointing": "--grad-checkpointing"}
        parts = [flags[k] for k in ("fsdp", "grad_checkpointing") if self.changes.get(k)]
        if "grad_accum" in self.changes:
            parts.append(f"--grad-accum {self.changes['grad_accum']} (micro-batch {self.changes['micro_batch']})")
        if "max_seq_len" in self.changes:
            parts.append(f"--max-seq-len {self.changes['max_seq_len']} (longer samples are skipped)")
        if "gpus" in self.changes:
            parts.append(f"on {self.changes['gpus']} processes")
        return " ".join(parts)


@dataclass(frozen=True)
class TrainPlan:
    """One process's memory during `tvtool train`, by component (bytes)."""

    model: str
    mode: str
    processes: int
    fsdp: bool
    grad_checkpointing: bool
    precision: str
    batch_size: int
    grad_accum: int
    micro_batch: int
    seq_len: int
    seq_len_from: str  # "--max-seq-len", "the longest sample" or "max_position_embeddings"
    rank: int
    params: int  # base parameters
    lora_params: int
    components: dict[str, int]  # what the peak adds up, in order
    activations: dict[str, int]  # saved activations with and without checkpointing ("checkpointed", "full")
    peak: int
    device_memory: int | None
    fix: Fix | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.peak <= self.device_memory

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fits"] = self.fits
        d["fix"] = None if self.fix is None else {**self.fix.changes, "peak": self.fix.peak, "text": self.fix.text()}
        return d

    def lines(self) -> list[str]:
        """The plan as text: the setup, one line per component, the verdict and the fix."""
        procs = f"{self.processes} process{'es' * (self.processes > 1)}"
        out = [f"memory plan: {self.mode} on {self.model}, {procs}{', FSDP (base sharded)' if self.fsdp else ''}, "
               f"{self.precision}, micro-batch {self.micro_batch} × {self.seq_len} tokens ({self.seq_len_from}), "
               f"{'activation checkpointing' if self.grad_checkpointing else 'no activation checkpointing'}",
               f"  batch {self.batch_size} ÷ {procs} ÷ grad-accum {self.grad_accum} → micro-batch "
               f"{self.micro_batch}; base {count(self.params)} parameters, LoRA r {self.rank}: "
               f"{count(self.lora_params)} parameters"]
        out += [f"  {name:<36}{gib(b):>11}" for name, b in self.components.items()]
        out.append(f"  {'peak per process':<36}{gib(self.peak):>11}")
        out.append(f"  activations: {gib(self.activations['checkpointed'])} checkpointed, "
                   f"{gib(self.activations['full'])} without")
        out += [f"  note: {n}" for n in self.notes]
        if self.device_memory is None:
            out.append("  device memory unknown (--gpu-memory): fit not checked")
        elif self.fits:
            out.append(f"  fits: {gib(self.peak)} of {gib(self.device_memory)}")
        else:
            out.append(f"  does not fit: {gib(self.peak)} > {gib(self.device_memory)}; "
                       + (f"smallest change that fits: {self.fix.text()} → {gib(self.fix.peak)}" if self.fix
                          else "nothing tried fits"))
        return out


def gib(n: float) -> str:
    """Bytes as GiB (MiB below 1 GiB)."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else str(n)


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}


def parse_memory(text: str | int) -> int:
    """'80GiB' → 80·2^30, '24GB' → 24·10^9, '81559MiB'; a bare number is bytes. (tvtool.io.writer.parse_size
    has the same units but imports the writer's torch/hub stack, which a plan does not need.)"""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]I?B|B)?\s*", str(text).upper())
    if not m or float(m.group(1)) <= 0:
        raise OptionsError(f"bad memory size {text!r}", where="--gpu-memory", fix="use e.g. 80GiB, 24GB or 81559MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2) or "B"])


def plan_training(*, model: str | os.PathLike | Mapping[str, Any], mode: str, options: TrainOptions = TrainOptions(),
                  gpus: int = 1, gpu_memory: int | str | None = None, seq_len: int | None = None,
                  search: bool = True) -> TrainPlan:
    """The per-process memory plan of training `mode` on `model` (a folder or Hub id: only config.json is read;
    or the config itself) with `gpus` processes of `gpu_memory` bytes each. `seq_len`: the longest sample when
    the data is at hand (else --max-seq-len, else the model's context). With `search`, a plan that does not fit
    carries the smallest change that does."""
    if isinstance(model, Mapping):
        cfg, name = dict(model), str(model.get("_name_or_path") or model.get("model_type"))
    else:
        cfg, name = load_config(model)[0], str(model)
    arch = Arch.from_config(cfg, where=name)
    o = resolve(options, mode=mode)
    if gpus < 1:
        raise OptionsError(f"the process count must be ≥ 1, got {gpus}", where="--gpus")
    if o.fsdp and gpus == 1:
        raise OptionsError("--fsdp in a single process shards nothing", where="--fsdp",
                           fix="launch several processes (torchrun --nproc_per_node N -m tvtool train …, or "
                               "--gpus N for a plan), or drop --fsdp")
    mem = None if gpu_memory is None else parse_memory(gpu_memory)
    if seq_len is not None:
        t, src = seq_len, "the longest sample"
    elif o.max_seq_len:
        t, src = o.max_seq_len, "--max-seq-len"
    else:
        t, src = arch.context, "max_position_embeddings"
    plan = _plan(arch, o, mode=mode, name=name, gpus=gpus, mem=mem, t=t, src=src)
    if src == "max_position_embeddings":
        plan.notes.append(f"no --max-seq-len (and no data): planned at the model's whole context, {t} tokens")
    if search and plan.fits is False:
        plan = replace(plan, fix=_smallest_fix(arch, o, mode=mode, gpus=gpus, mem=mem, t=t))
    return plan


def _plan(arch: Arch, o: TrainOptions, *, mode: str, name: str, gpus: int, mem: int | None, t: int,
          src: str) -> TrainPlan:
    w = a = 2 if o.precision == "bf16" else 4
    b = math.ceil(o.batch_size / (gpus * o.grad_accum))  # the largest micro-batch of a step
    n = b * t
    targets = targets_of(o.target_modules)
    lora = arch.lora_params(rank=o.rank, targets=targets)
    shard = gpus if o.fsdp else 1
    layer_w = arch.layer_params() * w + lora // arch.layers * 4
    comp = {"base weights" + (f" (1/{gpus} shard)" if o.fsdp else ""): arch.params() * w // shard}
    if o.fsdp:
        comp["gathered units (FSDP)"] = max(2 * layer_w, layer_w + arch.head_params() * w)
    comp["LoRA weights (fp32)"] = lora * 4 // shard
    comp["LoRA gradients (fp32)"] = lora * 4 + (lora * 4 // shard if o.fsdp else 0)
    comp["AdamW state (fp32)"] = 2 * lora * 4 // shard
    if gpus > 1 and not o.fsdp:
        comp["DDP gradient buckets"] = lora * 4
    acts = _activations(arch, b=b, t=t, a=a, rank=o.rank, targets=targets, dropout=o.dropout > 0)
    saved = acts["checkpointed"] if o.grad_checkpointing else acts["full"]
    comp["activations" + (" (checkpointed)" if o.grad_checkpointing else "")] = saved
    logits = 12 * n * arch.vocab
    recompute = acts["layer"] + acts["backward"] if o.grad_checkpointing else acts["backward"]
    comp["logits (fp32 log-softmax + grads)" if logits >= recompute else "one layer recomputed + backward"] = \
        max(logits, recompute)
    comp["overhead"] = OVERHEAD_FIXED + int(OVERHEAD_SHARE * sum(comp.values()))
    return TrainPlan(model=name, mode=mode, processes=gpus, fsdp=o.fsdp, grad_checkpointing=o.grad_checkpointing,
                     precision=o.precision, batch_size=o.batch_size, grad_accum=o.grad_accum, micro_batch=b,
                     seq_len=t, seq_len_from=src, rank=o.rank, params=arch.params(), lora_params=lora,
                     components=comp, activations={k: acts[k] for k in ("checkpointed", "full")},
                     peak=sum(comp.values()), device_memory=mem)


def _activations(arch: Arch, *, b: int, t: int, a: int, rank: int, targets: tuple[str, ...],
                 dropout: bool = False) -> dict[str, int]:
    """Bytes autograd keeps: 'full' (every layer), 'checkpointed' (layer inputs), 'layer' (one layer's set,
    recomputed under checkpointing) and 'backward' (a layer's gradient temporaries)."""
    h, i, d, n = arch.hidden, arch.intermediate, arch.head_dim, b * t
    kv = arch.heads if b > 1 else arch.kv_heads  # HF repeats the kv heads when sdpa gets a padding mask
    per_token = (2 * (4 * h + 4)  # the two RMSNorm inputs (kept in fp32) and their rsqrt
                 + a * h * any(p in targets for p in ("q_proj", "k_proj", "v_proj"))  # LoRA-A input, normed
                 + a * h * any(p in targets for p in ("gate_proj", "up_proj"))
                 + a * i * ("down_proj" in targets)  # the MLP product, LoRA-A input of down
                 + a * (2 * arch.heads + 2 * kv) * d + 4 * arch.heads  # q, k, v, output; log-sum-exp
                 + 3 * a * i  # gate, SiLU(gate), up
                 + a * rank * len(targets)  # LoRA-A outputs
                 + dropout * sum(arch.linears()[p][0] * (a + 1) for p in targets))  # LoRA dropout: input + mask
    mask = b * t * t * a if b > 1 else 0  # sdpa's additive mask, one per layer
    layer = n * per_token + mask
    outside = n * (4 * h + 4) + 2 * t * d * a + (b * t * t if b > 1 else 0)  # final norm input; cos/sin; bool mask
    return {"full": arch.layers * layer + outside, "layer": layer,
            "checkpointed": arch.layers * n * h * a + outside,
            "backward": n * (i + 2 * h) * a}


def _smallest_fix(arch: Arch, o: TrainOptions, *, mode: str, gpus: int, mem: int, t: int) -> Fix | None:
    """Try, in order: shard, checkpoint, both; then each smaller micro-batch (more accumulation) with the
    fewest of those; then the longest --max-seq-len that fits with all of them; then more processes."""
    def peak(**ch) -> int:
        q = replace(o, **{k: v for k, v in ch.items() if k in ("fsdp", "grad_checkpointing", "grad_accum")})
        return _plan(arch, q, mode=mode, name="", gpus=ch.get("gpus", gpus), mem=mem, t=ch.get("max_seq_len", t),
                     src="").peak

    toggles = [{}] + ([{"fsdp": True}] if gpus > 1 and not o.fsdp else []) + \
              ([{"grad_checkpointing": True}] if not o.grad_checkpointing else [])
    if len(toggles) == 3:
        toggles.append({"fsdp": True, "grad_checkpointing": True})
    micro = math.ceil(o.batch_size / (gpus * o.grad_accum))
    for m in range(micro, 0, -1):
        ga = o.grad_accum if m == micro else math.ceil(o.batch_size / (gpus * m))
        if m < micro and math.ceil(o.batch_size / (gpus * ga)) != m:
            continue  # no accumulation count gives exactly this micro-batch
        for tg in toggles:
            ch = {**tg, **({"grad_accum": ga, "micro_batch": m} if m < micro else {})}
            if ch and (p := peak(**ch)) <= mem:
                return Fix(ch, p)
    most = {**toggles[-1], "grad_accum": math.ceil(o.batch_size / gpus), "micro_batch": 1}
    lo, hi = 0, t  # the longest length (a multiple of 64) that fits with every other change
    while hi - lo > 64:
        mid = (lo + hi) // 2 // 64 * 64 or 64
        lo, hi = (mid, hi) if peak(**most, max_seq_len=mid) <= mem else (lo, mid)
    if lo >= 64:
        return Fix({**most, "max_seq_len": lo}, peak(**most, max_seq_len=lo))
    for g in range(gpus + 1, 4097):
        ch = {"fsdp": True, "grad_checkpointing": True, "gpus": g, "grad_accum": math.ceil(o.batch_size / g),
              "micro_batch": 1}
        if (p := peak(**ch)) <= mem:
            return Fix(ch, p)
    return None


__all__ = ["Arch", "Fix", "GiB", "TrainPlan", "load_config", "parse_memory", "plan_training", "targets_of"]
