"""The plan and the config files of a merged model: which tensors, from which base tensor, in which dtype.

What both data paths need before any weight is merged: `materialize` lays out its shards with it, and the
engine (`tvtool.engine.engine`) writes its shell model from it. It imports no operator, top-k or kernel.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal, Protocol, Sequence

import torch

from tvtool.errors import MismatchError
from tvtool.io.checkpoint import Checkpoint
from tvtool.io.layout import DTYPES, LM_HEAD, dtype_name, embed_name, is_vocab_tensor


class Delta(Protocol):
    """What a plan reads of Δ (a `tvtool.vectors.taskvector.TaskVector`): names, shapes, provenance, files."""

    def names(self) -> list[str]: ...

    def __contains__(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def provenance(self) -> dict: ...

    def side_files(self, base: Checkpoint | None = None) -> dict[str, bytes]: ...


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its name, the base tensor it starts from, output dtype and shape."""

    name: str
    src: str  # the base tensor read (the embedding, for the lm_head of a tied base)
    dtype: torch.dtype
    shape: tuple[int, ...]


def merge_plan(base: Checkpoint, tv: Delta) -> list[tuple[str, str]]:
    """(output name, base name to read) for every output tensor; checks Δ fits the base."""
    names = base.names()
    plan = [(n, n) for n in names]
    prov = tv.provenance()
    absent = {s["name"] for s in prov.get("skipped") or []} | set((prov.get("missing") or {}).get("base_only", []))
    for n in sorted(names):
        if n not in tv and n not in absent and not prov.get("zero_elsewhere"):  # an adapter: Δ = 0 off its modules
            raise MismatchError(f"base tensor {n!r} has no delta, and the delta does not record it as skipped",
                                fix="use the base model the delta was computed from")
    for n in tv.names():
        src = n
        if n not in base:
            emb = embed_name(names)
            if n == LM_HEAD and emb is not None:  # tied base, untied reasoner
                plan.append((n, emb))
                src = emb
            else:
                raise MismatchError(f"the delta has tensor {n!r}, which the base does not have",
                                    fix="use the base model the delta was computed from")
        bs, ds = base.info(src).shape, tv.shape(n)
        if bs != ds and not (is_vocab_tensor(n) and bs[1:] == ds[1:] and ds[0] <= bs[0]):
            raise MismatchError(f"shape mismatch for tensor {n!r}: base {tuple(bs)} vs delta {tuple(ds)}",
                                fix="use the base model the delta was computed from")
    return plan


def output_plan(base: Checkpoint, tv: Delta, *,
                dtype: Literal["auto", "float32", "bfloat16", "float16"] | torch.dtype | None = "auto"
                ) -> list[PlannedTensor]:
    """Every output tensor with its dtype: `dtype` for float tensors, or as stored ("auto"/None)."""
    want = DTYPES[dtype] if isinstance(dtype, str) and dtype != "auto" else dtype if isinstance(dtype, torch.dtype) \
        else None
    out = []
    for n, src in merge_plan(base, tv):
        info = base.info(src)
        dt = want if want is not None and info.dtype.is_floating_point else info.dtype
        out.append(PlannedTensor(n, src, dt, tuple(info.shape)))
    return out


def merged_config(*, base: Checkpoint, tv: Delta, plan: Sequence[PlannedTensor],
                  config_from: Literal["reasoner", "base"] = "reasoner") -> dict[str, bytes]:
    """The merged model's config/tokenizer/chat-template files, by name.

    config.json comes from `config_from` (a delta without one, e.g. a PEFT adapter: the base's);
    its vocab_size must match the output's vocabulary rows;
    its dtype is the output's; a tied-embedding config is untied when the output has its own lm_head.
    """
    files = tv.side_files(base=base) if config_from == "reasoner" else base.side_files()
    if "config.json" not in files:
        raise MismatchError(f"no config.json in the {config_from}'s files",
                            fix="use --config-from base" if config_from == "reasoner" else "add a config.json")
    cfg = json.loads(files["config.json"])
    vs = cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")
    for p in plan:
        if is_vocab_tensor(p.name) and vs and p.shape[0] != vs:
            raise MismatchError(f"output tensor {p.name!r} has {p.shape[0]} vocabulary rows but the {config_from}'s "
                                f"config.json says vocab_size {vs}", fix="use --config-from base")
    dtypes = {p.dtype for p in plan if p.dtype.is_floating_point}
    if len(dtypes) == 1:
        name = dtype_name(dtypes.pop())
        for key in ("torch_dtype", "dtype"):
            if key in cfg:
                cfg[key] = name
    if any(p.name == LM_HEAD for p in plan) and cfg.get("tie_word_embeddings"):
        cfg["tie_word_embeddings"] = False  # the output has its own lm_head
    files["config.json"] = (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()
    return files


def plan_entries(plan: Sequence[PlannedTensor]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) per tensor: the layout a `ShardedWriter` takes."""
    return [(p.name, p.dtype, p.shape) for p in plan]


def plan_nbytes(plan: Sequence[PlannedTensor]) -> int:
    return sum(math.prod(p.shape) * p.dtype.itemsize for p in plan)


__all__ = ["PlannedTensor", "merge_plan", "merged_config", "output_plan", "plan_entries", "plan_nbytes"]
