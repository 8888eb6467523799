"""The training loop behind `tvtool.valve.train`: PEFT LoRA, per-sample β hooks, accelerate, checkpoints.

One plain loop (no Trainer) because a step must see its whole global batch: the loss is the token
mean over the global batch, each process takes its share (`train_data.micro_batches`), so one step is
the same computation for any number of processes. accelerate supplies the device, the DDP wrapper,
gradient sync (`no_sync` on all but the last micro-batch) and the reductions; with `fsdp`
the frozen base is sharded instead (`tvtool.valve.sharding`, FSDP2), and gradient sync is FSDP's.
`grad_checkpointing` is transformers' own (torch.utils.checkpoint, non-reentrant) on the decoder
layers: the recomputation runs the same forward hooks, so β stays set until the backward pass ends.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from tvtool.errors import OptionsError
from tvtool.io.atomic import atomic_write, partial_path, resumable_dir
from tvtool.valve.sharding import (build_empty, load_optimizer_state, local_bytes, lora_state, optimizer_state,
                                   share)
from tvtool.valve.train_data import collate, micro_batches, padding

CHECKPOINT = "checkpoint.pt"


# --- per-sample β on the LoRA branch ---------------------------------------------------------


class BetaScale:
    """Multiplies every lora_A output [B, T, r] by the batch's β [B] (as [B, 1, 1]).

    PEFT's plain LoRA adds `lora_B(lora_A(dropout(x))) * scaling`, and B·(β·a) = β·(B·a), so scaling
    the rank-r lora_A output by β gives θ + β·Δθ′ per sample (eq. 3) at r/out of the cost of scaling
    the lora_B output (bench/bench_train.py: ~1.1× the hook-free step that way, noise-level this way).
    DoRA and merged layers do not go through that sum: they are refused."""

    def __init__(self, model: Any):
        from peft.tuners.lora import Linear, LoraLayer

        self.beta: torch.Tensor | None = None
        self.handles = []
        for name, m in model.named_modules():
            if not isinstance(m, LoraLayer):
                continue
            if not isinstance(m, Linear) or getattr(m, "lora_variant", None) or any(getattr(m, "use_dora", {}).values()):
                raise OptionsError(f"per-sample β needs plain LoRA on linear layers; {name} is "
                                   f"{'DoRA' if any(getattr(m, 'use_dora', {}).values()) else type(m).__name__}",
                                   where="valve++", fix="train plain LoRA (no DoRA) on linear layers")
            if m.merged:
                raise OptionsError(f"per-sample β cannot scale a merged LoRA layer ({name})", where="valve++",
                                   fix="unmerge the adapter before training")
            for a in m.lora_A.values():
                self.handles.append(a.register_forward_hook(self._hook))
        if not self.handles:
            raise OptionsError("the model has no LoRA layers to scale", where="valve++")

    def _hook(self, module, args, out):
        b = self.beta
        if b is None:
            return out
        if out.dim() != 3 or out.shape[0] != b.shape[0]:
            raise OptionsError(f"cannot scale a LoRA output of shape {tuple(out.shape)} per sample "
                               f"({b.shape[0]} samples)", where="valve++",
                               fix="use a model whose linear layers see [batch, tokens, features]")
        return out * b.to(out.dtype).view(-1, 1, 1)

    def set(self, beta: torch.Tensor | None) -> None:
        self.beta = beta

    @contextlib.contextmanager
    def scaled(self, beta: torch.Tensor):
        """β for everything inside: the forward pass and the backward pass, whose activation checkpointing
        re-runs these hooks."""
        self.beta = beta
        try:
            yield
        finally:
            self.beta = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# --- model ----------------------------------------------------------------------------------


def build_peft_model(model: str, *, rank: int, lora_alpha: float, target_modules: str, dropout: float,
                     rslora: bool, seed: int, dtype: torch.dtype, empty: bool = False):
    """The base model with a fresh LoRA (PEFT's init, seeded); only LoRA parameters train. `empty`: the
    parameters on the meta device, to receive them from another process (`tvtool.valve.sharding`)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    targets: Any = "all-linear" if target_modules == "all-linear" else \
        [t.strip() for t in target_modules.split(",") if t.strip()]
    cfg = LoraConfig(r=rank, lora_alpha=int(lora_alpha) if float(lora_alpha).is_integer() else lora_alpha,
                     target_modules=targets, lora_dropout=dropout, bias="none", use_rslora=rslora,
                     task_type="CAUSAL_LM")
    if empty:
        net = build_empty(model=model, dtype=dtype, lora_config=cfg)
        _check_targets(net.get_base_model(), targets)
        return net
    base = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    _check_targets(base, targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = get_peft_model(base, cfg)
    return net


def _check_targets(base, targets) -> None:
    if targets != "all-linear":
        linear = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
        if not any(n == t or n.endswith("." + t) for n in linear for t in targets):
            raise OptionsError(f"target modules {','.join(targets)} match no linear layer of the model",
                               where="--target-modules",
                               fix=f"use all-linear, or module names such as {_suffixes(linear)}")


def _suffixes(names: Sequence[str]) -> str:
    return ",".join(sorted({n.rsplit(".", 1)[-1] for n in names} - {"lm_head"})[:6])


# --- loss -----------------------------------------------------------------------------------


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: (sum of target-token NLL [B] in float32, number of target tokens [B])."""
    lg = logits[:, :-1].float()  # [B, T-1, V]: position t predicts token t+1
    y = labels[:, 1:]  # [B, T-1]
    nll = torch.nn.functional.cross_entropy(lg.transpose(1, 2), y, ignore_index=-100, reduction="none")  # [B, T-1]
    mask = y != -100
    return (nll * mask).sum(1), mask.sum(1)


def forward_nll(net, batch: dict, beta: BetaScale | None, autocast=contextlib.nullcontext):
    """(NLL sums [B], target counts [B]) of a collated batch at θ + β·Δθ′ (β = 1 without hooks)."""
    if beta is not None:
        beta.set(batch["beta"])
    try:
        with autocast():
            logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    finally:
        if beta is not None:
            beta.set(None)
    return token_nll(logits, batch["labels"])


# --- checkpoints ----------------------------------------------------------------------------


def save_checkpoint(tmp: Path, state: dict) -> None:
    with atomic_write(tmp / CHECKPOINT) as part:
        torch.save(state, part)


def load_checkpoint(tmp: Path) -> dict | None:
    f = tmp / CHECKPOINT
    return torch.load(f, map_location="cpu", weights_only=True) if f.is_file() else None


def barrier() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


# --- the loop -------------------------------------------------------------------------------


def run(*, mode: str, model: str, out: Path, encoded: list[dict], options, settings: dict, pad_id: int):
    """Train every stage; on the main process returns (partial folder, per-step losses, stage adapter folders,
    execution record: processes, device, padding share, memory per process); None on the others."""
    from accelerate import Accelerator
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from tqdm.auto import tqdm

    o = options
    if o.threads > 0:
        torch.set_num_threads(o.threads)
    # cpu=True without CUDA: under torchrun / `accelerate launch --multi_gpu` accelerate then runs DDP on
    # gloo (MULTI_CPU); without it, each CPU process would train alone, as if it were the only one.
    # bf16 is torch.autocast below, not accelerate's mixed_precision: accelerate keeps that in a process-wide
    # singleton, so a second train() in one process (a sweep) could not switch between fp32 and bf16.
    acc = Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available())
    main, world = acc.is_main_process, acc.num_processes
    fsdp = o.fsdp and world > 1
    net = build_peft_model(model, rank=o.rank, lora_alpha=o.lora_alpha, target_modules=o.target_modules,
                           dropout=o.dropout, rslora=o.rslora, seed=o.seed,
                           dtype=torch.bfloat16 if o.precision == "bf16" else torch.float32, empty=fsdp and not main)
    beta = BetaScale(net) if mode == "valve++" else None  # refuses what it cannot scale, before any output
    tmp = partial_path(out)
    if main:  # kept when started with the same settings: training resumes from its checkpoint
        resumable_dir(out, key=json.dumps(settings, sort_keys=True, default=str))
    acc.wait_for_everyone()
    ck = load_checkpoint(tmp)
    if ck is not None and not (fsdp and not main):  # under FSDP the others receive it with their shards
        set_peft_model_state_dict(net, ck["lora"])
    net.train()  # LoRA dropout, and transformers checkpoints layers only in training mode
    if o.grad_checkpointing:
        net.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if fsdp:
        share(net, main=main)
        ddp = net
    else:
        ddp = acc.prepare(net)
    losses: list[dict] = list(ck["losses"]) if ck else []
    plan = [min(math.ceil(len(e["samples"]) / o.batch_size) * o.epochs, o.max_steps or 10**12) for e in encoded]
    bar = tqdm(total=sum(plan), initial=len(losses), desc=f"train {mode}", unit="step",
               disable=not (o.progress and main), dynamic_ncols=True)
    r = _Run(acc, ddp, net, [p for p in net.parameters() if p.requires_grad], beta, o, fsdp, tmp, pad_id, bar, losses)
    stage_dirs: list[Path] = []
    with contextlib.ExitStack() as stack:
        if o.precision == "bf16":  # autocast casts to bf16 anyway: PEFT's fp32 copy of each LoRA input is waste
            from peft.helpers import disable_input_dtype_casting  # optional dependency (train extra)

            stack.enter_context(disable_input_dtype_casting(net))
        for si, (st, steps) in enumerate(zip(encoded, plan)):
            sdir = tmp / "stages" / f"{si + 1}-{st['name']}"
            if mode == "progressive":
                stage_dirs.append(sdir)
            if ck is not None and ck["stage"] > si or not st["samples"]:
                continue
            _stage(r, st, si, steps, ck if ck is not None and ck["stage"] == si else None)
            lora = lora_state(net)
            if main:
                if mode == "progressive":
                    net.save_pretrained(sdir, state_dict=lora)
                save_checkpoint(tmp, {"stage": si + 1, "step": 0, "losses": losses,
                                      "lora": get_peft_model_state_dict(net, state_dict=lora)})
            acc.wait_for_everyone()
    bar.close()
    if beta is not None:
        beta.remove()
    lora = lora_state(net)
    if main:
        net.save_pretrained(tmp, state_dict=lora)
    execution = _execution(r)
    acc.wait_for_everyone()
    return (tmp, losses, stage_dirs, execution) if main else None


@dataclass
class _Run:
    """What every step of a run uses."""

    acc: Any
    model: Any  # what the forward pass calls: the DDP wrapper, or the (FSDP-sharded) PEFT model itself
    net: Any  # the PEFT model
    params: list  # the LoRA parameters
    beta: BetaScale | None
    o: Any  # TrainOptions
    fsdp: bool
    tmp: Path
    pad_id: int
    bar: Any
    losses: list[dict]
    stats: dict = field(default_factory=lambda: {"padded": 0, "positions": 0, "tokens": 0, "seconds": 0.0,
                                                 "cpu_seconds": 0.0})


def _stage(r: _Run, st: dict, si: int, steps: int, ck: dict | None) -> None:
    """One stage's optimizer steps (a fresh AdamW and schedule, or the checkpoint's when resuming in it)."""
    from peft import get_peft_model_state_dict
    from transformers import get_scheduler

    acc, o, net, stats = r.acc, r.o, r.net, r.stats
    samples, name, bs = st["samples"], st["name"], o.batch_size
    world, rank = acc.num_processes, acc.process_index
    autocast = (functools.partial(torch.autocast, acc.device.type, dtype=torch.bfloat16) if o.precision == "bf16"
                else contextlib.nullcontext)
    lengths = [len(e.input_ids) for e in samples]
    opt = torch.optim.AdamW(r.params, lr=o.lr, weight_decay=o.weight_decay)
    sched = get_scheduler(o.scheduler, opt, num_warmup_steps=int(o.warmup_ratio * steps), num_training_steps=steps)
    start = 0
    if ck is not None and ck.get("optimizer"):
        load_optimizer_state(net, opt, ck["optimizer"], sharded=r.fsdp)
        sched.load_state_dict(ck["scheduler"])
        start = ck["step"]
    per_epoch = math.ceil(len(samples) / bs)
    for step in range(start, steps):
        t0, c0 = time.perf_counter(), time.process_time()
        epoch, b_i = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(o.seed * 1_000_003 + si * 1009 + epoch)
        perm = torch.randperm(len(samples), generator=g)
        idx = perm[b_i * bs:(b_i + 1) * bs].tolist()
        n_tok = sum(samples[i].n_target for i in idx)  # the whole step's targets, every process
        parts = micro_batches(idx=idx, lengths=lengths, world=world, grad_accum=o.grad_accum,
                              by_length=o.group_by_length)
        pad, positions = padding(parts, lengths)
        stats["padded"] += pad
        stats["positions"] += positions
        stats["tokens"] += positions - pad
        torch.manual_seed(o.seed + 7919 * len(r.losses) + rank)  # dropout, reproducible on resume
        local = torch.zeros((), device=acc.device)
        for m_i, micro in enumerate(parts[rank]):
            weight = 1.0 if micro else 0.0  # an empty share still joins the gradient sync (and FSDP's gathers)
            batch = {k: v.to(acc.device) for k, v in collate([samples[i] for i in micro or idx[:1]],
                                                             pad_id=r.pad_id).items()}
            last = m_i == len(parts[rank]) - 1
            if r.fsdp:
                net.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext() if r.fsdp or last else acc.no_sync(r.model)
            with sync, r.beta.scaled(batch["beta"]) if r.beta is not None else contextlib.nullcontext():
                s, _ = forward_nll(r.model, batch, None, autocast)
                (s.sum() * (weight * world / n_tok)).backward()  # DDP and FSDP average over processes
            local += s.sum().detach() * weight
        if o.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(r.params, o.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = float(acc.reduce(local, reduction="sum")) / n_tok
        stats["seconds"] += time.perf_counter() - t0
        stats["cpu_seconds"] += time.process_time() - c0  # on a shared machine, steadier than the wall clock
        r.losses.append({"stage": name, "step": len(r.losses) + 1, "epoch": round(step / per_epoch + 1 / per_epoch, 4),
                         "loss": loss, "lr": sched.get_last_lr()[0]})
        r.bar.update(1)
        r.bar.set_postfix_str(f"{name} loss {loss:.4f}", refresh=False)
        if (step + 1) % o.save_steps == 0 or (step + 1) % per_epoch == 0:
            lora, optim = lora_state(net), optimizer_state(net, opt)  # collectives: every process
            if acc.is_main_process:
                save_checkpoint(r.tmp, {"stage": si, "step": step + 1, "losses": r.losses,
                                        "lora": get_peft_model_state_dict(net, state_dict=lora), "optimizer": optim,
                                        "scheduler": sched.state_dict()})
            acc.wait_for_everyone()


def _execution(r: _Run) -> dict:
    """How the run was executed, for train.json: processes, sharding, padding, and per process the base
    parameter bytes held (its shards under FSDP), the peak RSS and (on a GPU) the peak allocated memory."""
    acc, o, stats = r.acc, r.o, r.stats
    mine = {"base_bytes": local_bytes(r.net),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_device_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}
    every = [mine]
    if acc.num_processes > 1:
        every = [None] * acc.num_processes
        torch.distributed.all_gather_object(every, mine)
    return {"processes": acc.num_processes, "device": str(acc.device), "fsdp": r.fsdp,
            "grad_accum": o.grad_accum, "grad_checkpointing": o.grad_checkpointing,
            "group_by_length": o.group_by_length,
            "dtypes": {k: sorted({str(p.dtype).removeprefix("torch.") for p in r.net.parameters()
                                  if p.requires_grad == t}) for k, t in (("base", False), ("lora", True))},
            "padding_share": round(stats["padded"] / stats["positions"], 4) if stats["positions"] else None,
            "tokens": stats["tokens"], "train_seconds": round(stats["seconds"], 3),
            "train_cpu_seconds": round(stats["cpu_seconds"], 3),
            "tokens_per_second": round(stats["tokens"] / stats["seconds"], 1) if stats["seconds"] else None,
            **{k: [e[k] for e in every] for k in mine}}


__all__ = ["BetaScale", "barrier", "build_peft_model", "forward_nll", "load_checkpoint", "run", "token_nll"]
