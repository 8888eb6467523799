"""`train --fsdp`: the frozen base sharded across processes with PyTorch FSDP2, and the LoRA state out of it.

- `build_empty` + `share`: only the main process reads the checkpoint (the others build the model on the meta
  device, buffers real); `fully_shard` makes one FSDP unit per decoder layer (the classes transformers lists in
  `_no_split_modules`, as accelerate's auto-wrap does), one each for the untied embeddings and LM head,
  and the root; torch.distributed.checkpoint then broadcasts the main process's weights and every process
  keeps its own shard. So the machine holds one copy of the base in RAM, not one per process, and each
  GPU 1/N of it plus the units being computed.
- LoRA weights are fp32 and sharded with their layer (FSDP keeps per-unit dtypes as they are: bf16 base,
  fp32 LoRA; only the trainable ones must agree); gradients are reduce-scattered (averaged, like DDP);
  AdamW runs on the shards, so its state is sharded too.
- `lora_state` gathers only the LoRA tensors (DTensor.full_tensor per LoRA weight), never the base;
  `optimizer_state`/`load_optimizer_state` use torch.distributed.checkpoint's full state dict keyed by
  parameter name, so a checkpoint written by N processes loads in M processes, with or without FSDP.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from tvtool.errors import OptionsError


def build_empty(*, model: str, dtype: torch.dtype, lora_config: Any):
    """The PEFT model with its parameters on the meta device (buffers real), for the processes that receive
    their shards from the main one (`share`)."""
    from accelerate import init_empty_weights
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):  # rotary buffers are computed, not loaded: keep them real
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model), dtype=dtype)
        return get_peft_model(base, lora_config)


def share(net, *, main: bool) -> None:
    """Shard `net` (`shard`), then broadcast the main process's weights (it loaded them; the others hold meta
    tensors) so that each process keeps its own shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = net.state_dict() if main else {}
    shard(net)
    with warnings.catch_warnings():  # DCP's notes on how it picks the broadcast device (gloo/NCCL): not ours
        warnings.simplefilter("ignore", UserWarning)
        set_model_state_dict(net, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def require_fsdp():
    """FSDP2's fully_shard, or a one-line error naming the torch version (checked before a model loads)."""
    try:
        from torch.distributed.fsdp import fully_shard  # public from torch 2.6
    except ImportError:
        raise OptionsError(f"--fsdp needs PyTorch's FSDP2 (torch ≥ 2.6); this is torch {torch.__version__}",
                           where="--fsdp", fix="upgrade torch, or train without --fsdp (DDP)") from None
    return fully_shard


def shard(net) -> None:
    """fully_shard each decoder layer, the untied embeddings and LM head, then the root (the rest)."""
    fully_shard = require_fsdp()

    inner = net.get_base_model()
    names = set(getattr(inner, "_no_split_modules", None) or ())
    layers = [m for m in inner.modules() if type(m).__name__ in names]
    if not layers:
        raise RuntimeError(f"{type(inner).__name__} lists no decoder layer class (_no_split_modules) to shard")
    for m in layers:
        fully_shard(m)
    if not inner.config.get_text_config().tie_word_embeddings:  # tied: one weight, so it stays in the root unit
        fully_shard(inner.get_input_embeddings())
        fully_shard(inner.get_output_embeddings())
    fully_shard(net)


def local_bytes(net, *, trainable: bool = False) -> int:
    """Bytes of the (frozen, or trainable) parameters this process holds: its shards under FSDP."""
    return sum((p.to_local() if _is_dtensor(p) else p).nbytes for p in net.parameters()
               if p.requires_grad == trainable)


def lora_state(net) -> dict[str, torch.Tensor]:
    """The LoRA weights as full tensors (state-dict names), gathered from their shards under FSDP; every
    process must call it (the gather is a collective). The base is never gathered."""
    names = {n for n, p in net.named_parameters() if p.requires_grad}
    return {k: (v.full_tensor() if _is_dtensor(v) else v).detach().cpu()
            for k, v in net.state_dict().items() if k in names}


def _is_dtensor(t) -> bool:
    """A shard of FSDP2 (torch.distributed.tensor, public from torch 2.5; none can exist before)."""
    try:
        from torch.distributed.tensor import DTensor  # torch ≥ 2.5
    except ImportError:
        return False
    return isinstance(t, DTensor)


def optimizer_state(net, opt) -> dict:
    """The optimizer's full state keyed by parameter name (every process calls; the main one gets it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(net, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(net, opt, state: dict, *, sharded: bool) -> None:
    """Load `optimizer_state`'s output (any process count); sharded: every process passes the full state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if all(isinstance(k, int) for k in state.get("state", {})):  # a checkpoint of an earlier tvtool: by index
        opt.load_state_dict(state)
        return
    set_optimizer_state_dict(net, opt, optim_state_dict=state, options=StateDictOptions(full_state_dict=sharded))


__all__ = ["build_empty", "load_optimizer_state", "local_bytes", "lora_state", "optimizer_state", "require_fsdp", "shard", "share"]
