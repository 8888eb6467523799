"""A valve at any α as a plain LoRA adapter: what vLLM serves per request, built once per (valve, α), cached.

A valve is a PEFT LoRA adapter (`tvtool train`, or any tool) or a factored delta (`tvtool svd-rank`).
vLLM scales a LoRA by one fixed factor per adapter (lora_alpha / r, folded into B at load), and
per-module `rank_pattern`/`alpha_pattern` are not honoured by every version. So α is baked into
the factors, and each α is an ordinary adapter that one engine serves beside the others:

    B_α[m] = (α · s_m) · B[m]      float32, rounded once to the valve's dtype (s_m = the valve's own
                                    scale of module m: lora_alpha/r, rsLoRA, alpha_pattern)
    A[m], B_α[m] zero-padded to one rank R (the smallest vLLM accepts), lora_alpha = R, no patterns
    ⇒ vLLM's scale is exactly 1 and θ + B_α·A = θ + α·Δθ on every adapted module.

α = 0 is an adapter too, with B = 0: its outputs are the base model's, exactly (the LoRA branch adds
zeros), and a batch never mixes requests with and without an adapter, which vLLM's CPU build gets
wrong (its torch LoRA ops read a request without adapter, index -1, as the last adapter slot). Adapters go to
`<cache>/alpha-adapters/<valve key>/alpha-<α>/`, written atomically, each holding a finished-work
record (`tvtool.io.finished`) of the valve's content fingerprint and α: a folder is re-used only
when it was made from the same bytes. A full-rank Δ (a `tvtool delta` output) or a reasoner is not
a valve (`tvtool serve --rank` factors one with `svd_rank` first, cached).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tvtool.errors import CheckpointError, OptionsError
from tvtool.io.atomic import atomic_dir
from tvtool.io.checkpoint import Checkpoint, resolve
from tvtool.io.fingerprint import input_fingerprint
from tvtool.io.finished import is_finished, stage_record, write_record
from tvtool.io.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, alpha_name, format_alpha
from tvtool.io.paths import cache_dir
from tvtool.lowrank.peft_adapter import FactoredAdapter, LoraModule, open_factored, padded_rank, write_lora_weights
from tvtool.vectors.adapter import AdapterTerm, is_adapter

RECORD = "alpha_adapter.json"  # an α adapter's finished-work record, inside its folder
ENERGY_HINT = "tvtool svd-rank {valve} --energy 0.9 -o valve.safetensors"
_building = threading.Lock()  # a server's resolver may build two names of one α at once (valve@0.5, valve@0.50)


@dataclass(frozen=True)
class Valve:
    """An opened valve: its LoRA modules (each with its own scale), the rank every α adapter gets, and its
    content fingerprint (`key`: the cache folder name)."""

    path: Path
    kind: Literal["peft", "factored"]
    modules: tuple[LoraModule, ...]
    rank: int  # padded: a rank vLLM accepts
    dtype: torch.dtype
    config: dict  # adapter_config.json of every α adapter (lora_alpha = r = rank, no patterns)
    fingerprint: dict  # input_fingerprint of the valve
    not_carried: float = 0.0  # share of ‖Δ‖² a LoRA cannot carry (a factored delta's kept-full tensors)
    factored: FactoredAdapter | None = None  # a factored delta writes its adapters itself (with its own card)

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        what = "PEFT LoRA adapter" if self.kind == "peft" else "factored delta"
        return f"{what} {self.path} ({len(self.modules)} modules, rank {self.rank})"


def valve_kind(path: str | os.PathLike) -> Literal["peft", "factored", "delta", "model"]:
    """What `path` holds: a PEFT adapter, a factored delta, a full-rank delta, or a model (a reasoner).
    A CheckpointError when it is none of them."""
    p = resolve(path).path
    if is_adapter(p):
        return "peft"
    try:
        ckpt = Checkpoint.open(p)
    except CheckpointError:
        raise CheckpointError("not a LoRA adapter, a factored delta or a model", where=str(path),
                              fix="give a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) "
                                  "or a factored delta from `tvtool svd-rank`") from None
    kind = ckpt.metadata.get("tvtool.kind")
    if kind == "factored-delta":
        return "factored"
    if kind == "delta":
        return "delta"
    if ckpt.config() or (p.is_dir() and (p / "config.json").is_file()):
        return "model"
    raise CheckpointError("not a LoRA adapter, a factored delta or a model (no adapter_config.json, no tvtool "
                          "delta metadata, no config.json)", where=str(path),
                          fix="give a PEFT adapter folder or a factored delta from `tvtool svd-rank`")


def open_valve(path: str | os.PathLike) -> Valve:
    """A PEFT adapter or a factored delta as a `Valve`. A full-rank delta or a model is refused with the
    command that factors it."""
    kind = valve_kind(path)
    local = resolve(path).path
    if kind == "peft":
        return _peft_valve(local)
    if kind == "factored":
        f = open_factored(local)
        return Valve(local, "factored", tuple(f.modules), f.rank, f.dtype, f.config, input_fingerprint(local),
                     not_carried=float(f.shares["not_carried"]), factored=f)
    what = "a full-rank delta" if kind == "delta" else "a model (a reasoner: Δ = it − base)"
    raise OptionsError(f"the valve is {what}, not a LoRA adapter or a factored delta", where=str(path),
                       fix="factor it first: `" + ENERGY_HINT.format(valve=path if kind == "delta" else
                                                                    f"--base BASE --reasoner {path}")
                           + "` and serve that, or pass --rank R to factor it here (cached)")


def _peft_valve(path: Path) -> Valve:
    term = AdapterTerm(path)  # refuses DoRA, fan_in_fan_out, biases, modules_to_save with a clear error
    ckpt = term.ckpt
    modules = []
    for name, (a, b) in term.factored.items():
        module = name.removesuffix(".weight")
        modules.append(LoraModule(module, functools.partial(ckpt.read, a), functools.partial(ckpt.read, b),
                                  term.shape(name), scale=term.scale[name]))
    first = next(iter(term.factored.values()))[0]
    rank = padded_rank(max(ckpt.info(a).shape[0] for a, _ in term.factored.values()))
    c = term.config
    config = {**c, "r": rank, "lora_alpha": rank, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False,
              "target_modules": c.get("target_modules") or sorted({m.module.rsplit(".", 1)[-1] for m in modules})}
    return Valve(path, "peft", tuple(modules), rank, ckpt.info(first).dtype, config, input_fingerprint(path))


def check_alpha_range(alpha: float, alpha_range: tuple[float, float], *, where: str) -> float:
    lo, hi = alpha_range
    if not (lo <= alpha <= hi):
        raise OptionsError(f"α {format_alpha(alpha)} is outside the served range [{format_alpha(lo)}, "
                           f"{format_alpha(hi)}]", where=where, fix=f"ask for α in [{format_alpha(lo)}, "
                                                                    f"{format_alpha(hi)}]")
    return alpha


def adapter_record(valve: Valve, alpha: float) -> dict:
    """The finished-work record of one α adapter: the valve's content and α (and the layout it is written in)."""
    return stage_record(stage="alpha-adapter", options={"alpha": float(alpha), "rank": valve.rank},
                        inputs={"valve": valve.fingerprint})


def adapter_folder(valve: Valve, alpha: float, *, cache: str | os.PathLike | None = None) -> Path:
    """Where the α adapter of `valve` lives in the cache."""
    return cache_dir(cache) / "alpha-adapters" / valve.key / alpha_name(float(alpha))


def alpha_adapter(valve: Valve, alpha: float, *, cache: str | os.PathLike | None = None) -> Path:
    """The adapter folder of `valve` at α (built on first use, atomically; re-used when its record matches)."""
    alpha = float(alpha)
    folder = adapter_folder(valve, alpha, cache=cache)
    record = adapter_record(valve, alpha)
    with _building:
        if is_finished(folder, record, overwrite=True, what=f"the α = {format_alpha(alpha)} adapter", name=RECORD):
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(folder) as tmp:
            if valve.factored is not None:
                valve.factored.write(tmp, alpha)
            else:
                write_lora_weights(tmp / ADAPTER_WEIGHTS, list(valve.modules), rank=valve.rank, alpha=alpha,
                                   dtype=valve.dtype)
                (tmp / ADAPTER_CONFIG).write_text(json.dumps(valve.config, indent=2) + "\n")
                (tmp / "README.md").write_text(_card(valve, alpha))
            write_record(tmp, record, name=RECORD, extra={"valve": str(valve.path), "alpha": alpha})
    return folder


def alpha_adapters(valve: Valve, alphas, *, cache: str | os.PathLike | None = None) -> dict[float, Path]:
    """α → adapter folder, for every α (α = 0: B = 0, the base model's outputs)."""
    return {float(a): alpha_adapter(valve, a, cache=cache) for a in dict.fromkeys(alphas)}


def _card(valve: Valve, alpha: float) -> str:
    base = valve.config.get("base_model_name_or_path") or "BASE"
    return (f"# LoRA adapter: a valve at α = {format_alpha(alpha)} (tvtool)\n\n"
            f"The {valve.describe()} with α baked into its factors: B_α = (α·s)·B per module (float32, rounded "
            f"once), lora_alpha = r = {valve.rank}, so vLLM's scale is 1 and serving it on `{base}` gives "
            f"θ + α·Δθ.\nThe valve's record (content fingerprint and α) is in `{RECORD}`.\n")


__all__ = ["ENERGY_HINT", "RECORD", "Valve", "adapter_folder", "adapter_record", "alpha_adapter", "alpha_adapters",
           "check_alpha_range", "open_valve", "valve_kind"]
