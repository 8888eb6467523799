"""The options of the valve verbs (`train`, `mixchain`), light to import: recipes validate them without
loading the trainer or an engine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from tvtool.errors import OptionsError
from tvtool.options import CliOptions, opt

MODES = ("valve", "valve++", "progressive")
PRESETS = {  # paper appendix A.2
    "qwq": dict(rank=2, lora_alpha=8.0, lr=1e-5, batch_size=64, epochs=5, weight_decay=0.01),
    "llama": dict(rank=32, lora_alpha=64.0, lr=4e-5, scheduler="cosine", weight_decay=0.01, batch_size=64,
                  epochs=8),
}
DEFAULTS = dict(rank=8, lr=2e-4, scheduler="linear", weight_decay=0.0, batch_size=32, epochs=3)


@dataclass(frozen=True)
class TrainOptions(CliOptions):
    preset: Literal["none", "qwq", "llama"] = opt(
        "none", "Paper settings (A.2). qwq: r 2, lora_alpha 8, lr 1e-5, batch 64, 5 epochs, weight decay 0.01; "
                "llama: r 32, lora_alpha 64, lr 4e-5, cosine, weight decay 0.01, batch 64, 8 epochs. "
                "Options given explicitly win.")
    column: str | None = opt(None, "valve: the solution column to learn (default solution_0; pairs: solution).")
    rank: int | None = opt(None, "LoRA rank r (default 8).")
    lora_alpha: float | None = opt(None, "LoRA alpha: the branch is scaled by lora_alpha/r (default 2·r).")
    rslora: bool = opt(False, "rsLoRA: scale by lora_alpha/sqrt(r).")
    target_modules: str = opt("all-linear", "Layers to adapt: all-linear, or comma-separated module names "
                                            "(q_proj,v_proj).")
    dropout: float = opt(0.0, "LoRA dropout.")
    lr: float | None = opt(None, "Peak learning rate (default 2e-4).")
    scheduler: Literal["constant", "linear", "cosine"] | None = opt(None, "Decay after warm-up (default linear).")
    warmup_ratio: float = opt(0.0, "Share of each stage's steps spent warming up linearly.")
    weight_decay: float | None = opt(None, "AdamW weight decay (default 0).")
    max_grad_norm: float = opt(1.0, "Clip the gradient norm (0: off).")
    epochs: int | None = opt(None, "Epochs (progressive: per stage; paper 2). Default 3, progressive 2.")
    max_steps: int | None = opt(None, "Stop a stage after this many optimizer steps.")
    batch_size: int | None = opt(None, "Samples per optimizer step over all processes and accumulation (default 32).")
    grad_accum: int = opt(1, "Micro-batches per optimizer step in each process.")
    max_seq_len: int | None = opt(None, "Longest prompt + solution; longer samples are skipped and counted "
                                        "(default: the model's max_position_embeddings).")
    seed: int = opt(0, "Seed of the LoRA init, the epoch order and dropout.")
    threads: int = opt(0, "CPU threads for torch (0: torch's default; 1 is fastest on a busy shared CPU).")
    precision: Literal["fp32", "bf16"] = opt("fp32", "fp32; or bf16 (base weights bf16, LoRA fp32, bf16 autocast).")
    fsdp: bool = opt(False, "Shard the frozen base across the processes (PyTorch FSDP2, one unit per decoder layer); "
                            "launch with `torchrun --nproc_per_node N -m tvtool train …` or `accelerate launch`. "
                            "Without it several processes run DDP, each holding the whole base.")
    grad_checkpointing: bool = opt(False, "Recompute each decoder layer's activations in the backward pass "
                                          "(non-reentrant activation checkpointing): less memory, ~1/3 more compute.")
    group_by_length: bool = opt(False, "Form each step's micro-batches from samples of similar length (less padding); "
                                       "the step's samples and its loss are unchanged.")
    skip_zero_beta: bool = opt(True, "valve++: skip samples with β = 0 (their LoRA gradient is exactly zero).")
    save_steps: int = opt(200, "Checkpoint every N optimizer steps (and at each epoch end) for resuming.")
    overwrite: bool = opt(False, "Replace an output folder that holds something else (a finished run with the "
                                 "same settings is kept).")
    progress: bool = opt(True, "Show a progress bar with the loss.")


# How a run is executed, not what it computes: left out of the finished-work record and the resume key, so a
# run resumes (or counts as finished) with another process count, sharding, checkpointing or grouping.
EXECUTION = ("overwrite", "progress", "save_steps", "threads", "fsdp", "grad_checkpointing", "group_by_length",
             "grad_accum")


@dataclass(frozen=True)
class PlanOptions(CliOptions):
    gpus: int | None = opt(None, "Processes (GPUs) to plan for (default: this launch's WORLD_SIZE, else 1).")
    gpu_memory: str | None = opt(None, "Memory per process, e.g. 80GiB, 24GB or 81559MiB (default: this machine's "
                                       "GPU; on a CPU, its RAM shared by the processes of this machine).")
    check_memory: bool = opt(True, "Refuse a run whose memory plan does not fit, before the model loads.")


def resolve(o: TrainOptions, *, mode: str) -> TrainOptions:
    """Fill unset options from the preset, then the defaults; check every value."""
    if mode not in MODES:
        raise OptionsError(f"unknown mode {mode!r}", where="MODE", fix="use valve, valve++ or progressive")
    fill = {**DEFAULTS, **({"epochs": 2} if mode == "progressive" else {}), **PRESETS.get(o.preset, {})}
    o = replace(o, **{k: v for k, v in fill.items() if getattr(o, k) is None})
    if o.lora_alpha is None:
        o = replace(o, lora_alpha=2.0 * o.rank)
    checks = [("rank", o.rank >= 1, "LoRA rank must be ≥ 1"), ("lora-alpha", o.lora_alpha > 0, "lora_alpha must be > 0"),
              ("lr", o.lr > 0, "the learning rate must be > 0"), ("epochs", o.epochs >= 1, "epochs must be ≥ 1"),
              ("batch-size", o.batch_size >= 1, "the batch size must be ≥ 1"),
              ("grad-accum", o.grad_accum >= 1, "grad_accum must be ≥ 1"),
              ("dropout", 0 <= o.dropout < 1, "dropout must be in [0, 1)"),
              ("max-steps", o.max_steps is None or o.max_steps >= 1, "max_steps must be ≥ 1"),
              ("save-steps", o.save_steps >= 1, "save_steps must be ≥ 1"),
              ("warmup-ratio", 0 <= o.warmup_ratio < 1, "warmup_ratio must be in [0, 1)")]
    for flag, ok, what in checks:
        if not ok:
            raise OptionsError(f"{what}, got {getattr(o, flag.replace('-', '_'))}", where=f"--{flag}")
    return o
PAPER_ALPHAS = (0.2, 0.4, 0.6, 0.8)


@dataclass(frozen=True)
class MixChainOptions(CliOptions):
    dataset: str = opt("gsm8k", "Questions with gold answers: gsm8k | math500 | toy, a .jsonl/.xml path, or a Hub id.")
    split: str = opt("train", "Dataset split (the paper uses the GSM8K train questions).")
    limit: int | None = opt(None, "Use only this many questions (the first N, or N random with --seed).")
    seed: int | None = opt(None, "Shuffle the questions with this seed before --limit.")
    kind: str | None = opt(None, "Answer format of a file dataset: gsm8k | math500 | asdiv (default: detected).")
    alphas: tuple[float, ...] = opt(PAPER_ALPHAS, "α values, one solution each (default 0.2,0.4,0.6,0.8; repeat "
                                                  "or comma-separate; sorted ascending: solution_1 = smallest α).",
                                    flag="--alpha", short="-a")
    min_correct: str = opt("all", "Keep a question with at least this many correct generated solutions: "
                                  "all (as the released data), any (≥ 1), or a number 0..K.")
    keep_truncated: bool = opt(False, "Count a correct chain that hit --max-tokens as correct (default: drop it).")
    batch_size: int = opt(64, "Questions per generation batch; generations are saved after each batch.")
    work_dir: str | None = opt(None, "Folder for the per-α generations (resumable; default: <output>.generations).")
    license: str | None = opt(None, "Card license (default: gsm8k/math500 → mit, else other).")
    jsonl: bool = opt(True, "Also write the rows as JSON lines (mixchain.jsonl) beside the parquet file.")
    overwrite: bool = opt(False, "Replace an existing dataset folder; discard generations made with other settings.")
    progress: bool = opt(True, "Show progress bars.")


def parse_min_correct(value: str | int, *, k: int) -> int:
    """'all' → K, 'any' → 1, 'N' → N (0 ≤ N ≤ K)."""
    v = str(value).strip().lower()
    n = k if v == "all" else 1 if v == "any" else int(v) if v.isdigit() else None
    if n is None or n > k:
        raise OptionsError(f"bad --min-correct {value!r}", where=f"{k} α values",
                           fix=f"use all, any, or a number from 0 to {k}")
    return n
