"""LoRA adapters (PEFT format, loadable by PEFT and vLLM) from a factored delta.

One adapter folder per α: `adapter_model.safetensors`, `adapter_config.json`, README.md.
α is baked into B (B_α = α·B in float32, rounded once) with lora_alpha = r, so the
scaling is exactly 1 and every α is an ordinary adapter that one vLLM engine can serve
side by side with the others. Ranks are zero-padded up to a rank vLLM accepts
(1, 8, 16, 32, 64, 128, 256, 320, 512), one rank for all modules (no rank_pattern).

A LoRA adapter can only carry the factorized linear weights. It cannot carry 1-D
deltas (norms; biases, e.g. Qwen2's q/k/v biases), embeddings/lm_head, or tensors
kept full: their share of ‖Δ‖² is stated in the model card and the report.
`modules_to_save` is never written (vLLM rejects it).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from huggingface_hub import ModelCard, ModelCardData

from tvtool._version import __version__
from tvtool.io.atomic import atomic_dir
from tvtool.io.checkpoint import Checkpoint
from tvtool.errors import CheckpointError
from tvtool.io.layout import ALPHA_TEMPLATE, FACTOR_A, FACTOR_B, alpha_name, format_alpha, is_hub_id
from tvtool.lowrank.report import TensorReport, adapter_shares, carried_by_adapter, reports_from_metadata
from tvtool.io.writer import check_free
from tvtool.io.safetensors_io import StreamWriter

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def padded_rank(r: int) -> int:
    """The smallest rank vLLM accepts that is ≥ r (r itself above 512: vLLM cannot serve it)."""
    return next((v for v in VLLM_RANKS if v >= r), r)


def adapter_folders(*, output: str | os.PathLike, alphas: tuple[float, ...],
                    name_template: str = ALPHA_TEMPLATE) -> dict[float, Path]:
    """α → `<output>/alpha-<α>` (the same naming as `materialize`)."""
    return {float(a): Path(output) / alpha_name(a, name_template) for a in dict.fromkeys(alphas)}


def target_modules(reports: list[TensorReport]) -> list[str]:
    """Module suffixes (q_proj…) where every such module is carried; full module names otherwise."""
    groups: dict[str, list[TensorReport]] = {}
    for t in reports:
        if len(t.shape) == 2 and t.name.endswith(".weight"):
            groups.setdefault(t.name.removesuffix(".weight").rsplit(".", 1)[-1], []).append(t)
    out: list[str] = []
    for suffix, ts in sorted(groups.items()):
        carried = [t for t in ts if carried_by_adapter(t)]
        if carried and len(carried) == len(ts):
            out.append(suffix)
        else:
            out += [t.name.removesuffix(".weight") for t in carried]
    return out


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear module: Δ[module.weight] = scale · B @ A, its factors read on demand."""

    module: str  # e.g. model.layers.0.self_attn.q_proj
    read_a: Callable[[], torch.Tensor]  # A [k, in]
    read_b: Callable[[], torch.Tensor]  # B [out, k]
    shape: tuple[int, int]  # (out, in)
    scale: float = 1.0


def factored_modules(ckpt: Checkpoint, carried: list[TensorReport]) -> list[LoraModule]:
    """The factors of a factored delta (`X.lora_A`, `X.lora_B`), scale 1."""
    return [LoraModule(t.name.removesuffix(".weight"), functools.partial(ckpt.read, t.name + FACTOR_A),
                       functools.partial(ckpt.read, t.name + FACTOR_B), tuple(t.shape)) for t in carried]


def write_lora_weights(path: Path, modules: list[LoraModule], *, rank: int, alpha: float,
                       dtype: torch.dtype) -> None:
    """PEFT keys base_model.model.<module>.lora_{A,B}.weight: A [r, in] and B_α = (α·scale)·B [out, r], both
    zero-padded to `rank`; B_α is computed in float32 and rounded to `dtype` once."""
    plan = []
    for m in modules:
        key = "base_model.model." + m.module
        out_f, in_f = m.shape
        plan += [(key + ".lora_A.weight", dtype, (rank, in_f)), (key + ".lora_B.weight", dtype, (out_f, rank))]
    w = StreamWriter(path, plan, {"format": "pt"})
    try:
        for m in modules:
            key = "base_model.model." + m.module
            A = m.read_a()  # [k, in]
            B = m.read_b().float() * (alpha * m.scale)  # [out, k] fp32
            k = A.shape[0]
            A_pad = torch.zeros((rank, A.shape[1]), dtype=dtype)
            A_pad[:k] = A
            B_pad = torch.zeros((B.shape[0], rank), dtype=dtype)
            B_pad[:, :k] = B.to(dtype)
            w.write(key + ".lora_A.weight", A_pad)
            w.write(key + ".lora_B.weight", B_pad)
        w.close()
    except BaseException:
        w.abort()
        raise


@dataclass(frozen=True)
class FactoredAdapter:
    """A factored delta read as LoRA adapters: the factors an adapter carries, one rank vLLM accepts, the
    adapter_config.json and what the adapter leaves out (`adapter_shares`)."""

    path: Path
    meta: dict
    modules: list[LoraModule]
    rank: int
    dtype: torch.dtype
    base: dict
    config: dict
    shares: dict

    def write(self, folder: Path, alpha: float) -> None:
        """adapter_model.safetensors (B scaled by α), adapter_config.json and README.md into `folder`."""
        write_lora_weights(folder / "adapter_model.safetensors", self.modules, rank=self.rank, alpha=alpha,
                           dtype=self.dtype)
        (folder / "adapter_config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        (folder / "README.md").write_text(adapter_card(alpha=alpha, rank=self.rank, base=self.base,
                                                       shares=self.shares, meta=self.meta,
                                                       targets=self.config["target_modules"]))


def open_factored(factored: str | os.PathLike) -> FactoredAdapter:
    """A factored delta (`tvtool svd-rank` output) as LoRA adapters (headers only; factors are read on write)."""
    ckpt = Checkpoint.open(factored)
    meta = ckpt.metadata
    if meta.get("tvtool.kind") != "factored-delta":
        raise CheckpointError("not a factored delta (tvtool.kind is not factored-delta)", where=str(factored),
                              fix="create it with `tvtool svd-rank`")
    reports = reports_from_metadata(json.loads(meta["tvtool.low_rank"]))
    carried = [t for t in reports if carried_by_adapter(t)]
    if not carried:
        raise CheckpointError("no factorized linear weight can go into a LoRA adapter", where=str(factored),
                              fix="factorize the projections (e.g. --include 'proj')")
    r = padded_rank(max(max(ckpt.info(t.name + FACTOR_A).shape[0] for t in carried), 1))
    base = json.loads(meta.get("tvtool.base") or "null") or {}
    config = lora_config(base_id=base.get("repo_id") or base.get("source"), rank=r, targets=target_modules(reports))
    return FactoredAdapter(Path(factored), meta, factored_modules(ckpt, carried), r,
                           ckpt.info(carried[0].name + FACTOR_A).dtype, base, config, adapter_shares(reports))


def lora_config(*, base_id: str | None, rank: int, targets: list[str]) -> dict:
    """adapter_config.json of a plain LoRA with scale 1 (lora_alpha = r) and no per-module patterns."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_id,
            "r": rank, "lora_alpha": rank, "target_modules": targets, "lora_dropout": 0.0,
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False,
            "use_dora": False, "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {},
            "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None}


def write_peft_adapters(*, factored: str | os.PathLike, output: str | os.PathLike, alphas: tuple[float, ...],
                        overwrite: bool = False) -> dict[float, Path]:
    """Write one PEFT LoRA adapter per α from a factored delta (`tvtool svd-rank` output)."""
    adapter = open_factored(factored)
    folders = adapter_folders(output=output, alphas=alphas)
    for f in folders.values():
        check_free(f, overwrite=overwrite, what="adapter folder")
    for a, folder in folders.items():
        with atomic_dir(folder) as tmp:
            adapter.write(tmp, a)
    return folders


def adapter_card(*, alpha: float, rank: int, base: dict, shares: dict, meta: dict, targets: list[str]) -> str:
    """README.md for an adapter: valid YAML (base_model, library_name: peft, tags) and what it leaves out."""
    base_id = base.get("repo_id") or base.get("source") or "BASE"
    low_rank = json.loads(meta.get("tvtool.low_rank") or "{}")
    reasoner = json.loads(meta.get("tvtool.reasoner") or "null") or {}
    merge = json.loads(meta.get("tvtool.merge") or "null")  # svd-rank of an operator's M (tvtool.lowrank.merged)
    data = ModelCardData(
        library_name="peft",
        base_model=base_id if is_hub_id(base_id) else None,
        tags=["tvtool", "lora", "peft", "task-arithmetic", "cot-valve"],
        tvtool={"version": __version__, "alpha": alpha, "rank": rank, "base": base, "reasoner": reasoner,
                "rank_option": low_rank.get("rank"), "energy_option": low_rank.get("energy"),
                "method": low_rank.get("method"), "adapter_shares": {k: v for k, v in shares.items()
                                                                     if k != "not_carried_tensors"},
                **({"merge": merge} if merge else {})},
    )
    kinds = shares["not_carried_by_kind"]
    missing = "\n".join(f"- {k}: {100 * v:.3f}% of ‖Δ‖²" for k, v in sorted(kinds.items())) or "- nothing"
    names = shares["not_carried_tensors"]
    listed = ", ".join(f"`{n}`" for n in names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
    body = f"""
# LoRA adapter: θ₁ + {format_alpha(alpha)}·Δ, low rank (tvtool)

Δ = θ₂ − θ₁ between the base `{base_id}` and the reasoner `{reasoner.get('source', 'REASONER')}`,
{_merged(merge)}factorized per weight matrix by truncated SVD (tvtool {__version__}, `svd-rank`) and stored as LoRA
(rank {rank}; lower ranks are zero-padded so vLLM accepts it). α = {format_alpha(alpha)} is baked in
(B is scaled by α, `lora_alpha` = r, so the scaling is 1). Target modules: {', '.join(targets[:12])}.

Loading it gives θ₁ + α·B·A on the factorized weights (CoT-Valve: α controls the length of the
chain of thought). It keeps {100 * shares['kept']:.2f}% of ‖Δ‖²; truncation loses
{100 * shares['truncation']:.2f}%.

## What this adapter cannot carry

A LoRA adapter holds only low-rank updates of linear layers, and vLLM rejects `modules_to_save`
and LoRA biases. These parts of Δ ({100 * shares['not_carried']:.3f}% of ‖Δ‖²) stay at the base:

{missing}

Tensors: {listed or 'none'}.
For the full low-rank Δ (including these) use
`tvtool materialize BASE --delta <factored delta> --alpha {format_alpha(alpha)}`.

## Use

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base_id}"), "<this folder>")
```

vLLM: `LLM(model="{base_id}", enable_lora=True, max_lora_rank={rank})` and
`LoRARequest("alpha-{format_alpha(alpha)}", 1, "<this folder>")`.
"""
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body))


def _merged(merge: dict | None) -> str:
    """The card's line on the operator whose M was factored instead of Δ ('' for plain Δ)."""
    if not merge:
        return ""
    params = ", ".join(f"{k} {v}" for k, v in merge.items() if k not in ("method", "more"))
    more = f" with {len(merge['more'])} more task vector(s)" if merge.get("more") else ""
    return (f"merged by the `{merge['method']}` operator{more} ({params or 'default settings'}) into M,\n"
            "and M (not Δ) was ")


__all__ = ["FactoredAdapter", "LoraModule", "VLLM_RANKS", "adapter_card", "adapter_folders", "factored_modules",
           "lora_config", "open_factored", "padded_rank", "target_modules", "write_lora_weights", "write_peft_adapters"]
