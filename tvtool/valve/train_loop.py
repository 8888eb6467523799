"""The training loop behind `tvtool.valve.train`: PEFT LoRA, per-sample β hooks, accelerate, checkpoints.

One plain loop (no Trainer) because a step must see its whole global batch: the loss is the token
mean over the global batch, each process takes its share (`idx[rank::world]`), so one step is the
same computation for any number of processes. accelerate supplies the device, the DDP wrapper,
gradient sync (`no_sync` on all but the last micro-batch), autocast and the reductions.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from tvtool.io.atomic import atomic_write, partial_path, resumable_dir
from tvtool.errors import OptionsError
from tvtool.valve.train_data import collate

CHECKPOINT = "checkpoint.pt"


# --- per-sample β on the LoRA branch ---------------------------------------------------------


class BetaScale:
    """Multiplies every lora_B output [B, T, out] by the batch's β [B] (as [B, 1, 1]).

    PEFT's plain LoRA adds `lora_B(lora_A(dropout(x))) * scaling`, so scaling the lora_B output
    by β gives θ + β·Δθ′ per sample (eq. 3). DoRA and merged layers do not go through that sum:
    they are refused."""

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
            for b in m.lora_B.values():
                self.handles.append(b.register_forward_hook(self._hook))
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

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# --- model ----------------------------------------------------------------------------------


def build_peft_model(model: str, *, rank: int, lora_alpha: float, target_modules: str, dropout: float,
                     rslora: bool, seed: int, dtype: torch.dtype):
    """The base model with a fresh LoRA (PEFT's init, seeded); only LoRA parameters train."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    targets: Any = "all-linear" if target_modules == "all-linear" else \
        [t.strip() for t in target_modules.split(",") if t.strip()]
    if targets != "all-linear":
        linear = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
        if not any(n == t or n.endswith("." + t) for n in linear for t in targets):
            raise OptionsError(f"target modules {','.join(targets)} match no linear layer of the model",
                               where="--target-modules",
                               fix=f"use all-linear, or module names such as {_suffixes(linear)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = LoraConfig(r=rank, lora_alpha=int(lora_alpha) if float(lora_alpha).is_integer() else lora_alpha,
                         target_modules=targets, lora_dropout=dropout, bias="none", use_rslora=rslora,
                         task_type="CAUSAL_LM")
        net = get_peft_model(base, cfg)
    return net


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
            logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
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
    {processes, device}); None on the others."""
    from accelerate import Accelerator
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    o = options
    if o.threads > 0:
        torch.set_num_threads(o.threads)
    # cpu=True without CUDA: under torchrun / `accelerate launch --multi_gpu` accelerate then runs DDP on
    # gloo (MULTI_CPU); without it, each CPU process would train alone, as if it were the only one.
    acc = Accelerator(mixed_precision="bf16" if o.precision == "bf16" else "no", cpu=not torch.cuda.is_available())
    net = build_peft_model(model, rank=o.rank, lora_alpha=o.lora_alpha, target_modules=o.target_modules,
                           dropout=o.dropout, rslora=o.rslora, seed=o.seed,
                           dtype=torch.bfloat16 if o.precision == "bf16" else torch.float32)
    beta = BetaScale(net) if mode == "valve++" else None  # refuses what it cannot scale, before any output
    tmp = partial_path(out)
    if acc.is_main_process:  # kept when started with the same settings: training resumes from its checkpoint
        resumable_dir(out, key=json.dumps(settings, sort_keys=True, default=str))
    acc.wait_for_everyone()
    ck = load_checkpoint(tmp)
    if ck is not None:
        set_peft_model_state_dict(net, ck["lora"])
    ddp = acc.prepare(net)
    params = [p for p in net.parameters() if p.requires_grad]
    world, rank, bs = acc.num_processes, acc.process_index, o.batch_size
    losses: list[dict] = list(ck["losses"]) if ck else []
    plan = [min(math.ceil(len(e["samples"]) / bs) * o.epochs, o.max_steps or 10**12) for e in encoded]
    bar = tqdm(total=sum(plan), initial=len(losses), desc=f"train {mode}", unit="step",
               disable=not (o.progress and acc.is_main_process), dynamic_ncols=True)
    stage_dirs: list[Path] = []
    for si, (st, steps) in enumerate(zip(encoded, plan)):
        samples, name = st["samples"], st["name"]
        sdir = tmp / "stages" / f"{si + 1}-{name}"
        if mode == "progressive":
            stage_dirs.append(sdir)
        if ck is not None and ck["stage"] > si or not samples:
            continue
        opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
        sched = get_scheduler(o.scheduler, opt, num_warmup_steps=int(o.warmup_ratio * steps),
                              num_training_steps=steps)
        start = 0
        if ck is not None and ck["stage"] == si and ck.get("optimizer"):
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            start = ck["step"]
        per_epoch = math.ceil(len(samples) / bs)
        for step in range(start, steps):
            epoch, b_i = divmod(step, per_epoch)
            g = torch.Generator().manual_seed(o.seed * 1_000_003 + si * 1009 + epoch)
            perm = torch.randperm(len(samples), generator=g)
            idx = perm[b_i * bs:(b_i + 1) * bs].tolist()
            n_tok = sum(samples[i].n_target for i in idx)  # the whole step's targets, every process
            mine = idx[rank::world]
            micros = [mine[k::o.grad_accum] for k in range(o.grad_accum)]
            torch.manual_seed(o.seed + 7919 * len(losses) + rank)  # dropout, reproducible on resume
            local = torch.zeros((), device=acc.device)
            for m_i, micro in enumerate(micros):
                weight = 1.0 if micro else 0.0  # an empty share still joins the DDP gradient sync
                batch = {k: v.to(acc.device) for k, v in collate([samples[i] for i in micro or idx[:1]],
                                                                 pad_id=pad_id).items()}
                sync = contextlib.nullcontext() if m_i == len(micros) - 1 else acc.no_sync(ddp)
                with sync:
                    s, _ = forward_nll(ddp, batch, beta, acc.autocast)
                    (s.sum() * (weight * world / n_tok)).backward()  # DDP averages over processes
                local += s.sum().detach() * weight
            if o.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss = float(acc.reduce(local, reduction="sum")) / n_tok
            losses.append({"stage": name, "step": len(losses) + 1, "epoch": round(step / per_epoch + 1 / per_epoch, 4),
                           "loss": loss, "lr": sched.get_last_lr()[0]})
            bar.update(1)
            bar.set_postfix_str(f"{name} loss {loss:.4f}", refresh=False)
            if (step + 1) % o.save_steps == 0 or (step + 1) % per_epoch == 0:
                if acc.is_main_process:
                    save_checkpoint(tmp, {"stage": si, "step": step + 1, "losses": losses,
                                          "lora": get_peft_model_state_dict(net), "optimizer": opt.state_dict(),
                                          "scheduler": sched.state_dict()})
                acc.wait_for_everyone()
        if acc.is_main_process:
            if mode == "progressive":
                net.save_pretrained(sdir)
            save_checkpoint(tmp, {"stage": si + 1, "step": 0, "losses": losses, "lora": get_peft_model_state_dict(net)})
        acc.wait_for_everyone()
    bar.close()
    if beta is not None:
        beta.remove()
    if acc.is_main_process:
        net.save_pretrained(tmp)
    acc.wait_for_everyone()
    return (tmp, losses, stage_dirs, {"processes": world, "device": str(acc.device)}) if acc.is_main_process else None


__all__ = ["BetaScale", "barrier", "build_peft_model", "forward_nll", "load_checkpoint", "run", "token_nll"]
