"""A PEFT LoRA adapter folder as a factored task vector (a trained valve is a task vector too).

For every adapted linear module X of the base:
    Δ[X.weight] = s · B @ A        B = X.lora_B [out, r], A = X.lora_A [r, in]
    s = lora_alpha / r             (rsLoRA, `use_rslora`: lora_alpha / sqrt(r))
with r the module's own rank (A's rows) and lora_alpha from `alpha_pattern` when a pattern
matches the module, as PEFT scales the branch. PEFT's keys `base_model.model.X.lora_{A,B}.weight`
map to the base tensor `X.weight`. Every other base tensor has Δ = 0 (the adapter does not touch
it), which the task vector says in its provenance (`zero_elsewhere`), so `merge_plan` keeps them.

A `DeltaTerm` kind (`tvtool.vectors.terms`), registered for `--delta` by `tvtool.vectors.taskvector`: so
`TaskVector.load(ADAPTER)` works wherever a delta does: `materialize --delta ADAPTER`, the
in-engine α sweep, `svd-rank`, `mixchain`. Only plain LoRA on linear layers is a task vector of
this form: DoRA, LoRA on embeddings, `fan_in_fan_out` (Conv1D), trained biases and
`modules_to_save` are refused with a clear error.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from pathlib import Path
from typing import ClassVar

import torch

from tvtool.io.checkpoint import SIDE_PATTERNS, Checkpoint
from tvtool.errors import CheckpointError
from tvtool.io.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS

PEFT_PREFIX = "base_model.model."
_A, _B = ".lora_A.weight", ".lora_B.weight"
_NOT_CONFIG = ("config.json", "generation_config.json")


def is_adapter(path: str | os.PathLike) -> bool:
    """A folder with a PEFT adapter_config.json."""
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file()


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank/alpha pattern lookup: the first key k with module matching `(.*\\.)?(k)$`."""
    for k, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({k})$", module):
            return v
    return default


class AdapterTerm:
    """One PEFT adapter, read lazily: Δ rows = s · B[rows] @ A, in float32."""

    needs_checkpoint: ClassVar[bool] = False  # recognised by its adapter_config.json (a `file_kind`)

    @classmethod
    def open(cls, probe) -> "AdapterTerm | None":
        """This kind of Δ at `probe.local` (a `tvtool.vectors.terms.Probe`), or None."""
        return cls(probe.local) if probe.local is not None and is_adapter(probe.local) else None

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config = check_adapter(self.path)
        c = self.config
        where = str(self.path / ADAPTER_CONFIG)
        if c.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"a {c.get('peft_type')} adapter is not a LoRA task vector", where=where,
                                  fix="use a LoRA adapter")
        for key, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D) layers"),
                          ("lora_bias", "trained LoRA biases")):
            if c.get(key):
                raise CheckpointError(f"{what} adapters are not supported as task vectors", where=where,
                                      fix="train plain LoRA (tvtool train does), or merge with peft's merge_and_unload")
        if c.get("modules_to_save") or c.get("bias", "none") != "none":
            raise CheckpointError("the adapter carries full tensors (modules_to_save or bias), not only LoRA factors",
                                  where=where, fix="train without modules_to_save and with bias='none'")
        if not (self.path / ADAPTER_WEIGHTS).is_file():
            raise CheckpointError(f"no {ADAPTER_WEIGHTS}", where=str(self.path),
                                  fix="save the adapter with peft's save_pretrained (safetensors)")
        self.ckpt = Checkpoint.open(self.path / ADAPTER_WEIGHTS)
        self.factored: dict[str, tuple[str, str]] = {}
        self.scale: dict[str, float] = {}
        self.full: list[str] = []
        for n in self.ckpt.names():
            if n.endswith(_B):
                continue
            if not (n.startswith(PEFT_PREFIX) and n.endswith(_A)):
                raise CheckpointError(f"adapter tensor {n!r} is not a LoRA factor of a linear layer",
                                      where=str(self.path / ADAPTER_WEIGHTS),
                                      fix="only plain LoRA on linear layers is a task vector")
            module = n[len(PEFT_PREFIX):-len(_A)]
            b = PEFT_PREFIX + module + _B
            if b not in self.ckpt:
                raise CheckpointError(f"adapter has {n!r} but no {b!r}", where=str(self.path / ADAPTER_WEIGHTS),
                                      fix="re-save the adapter")
            r = self.ckpt.info(n).shape[0]
            alpha = _pattern_value(c.get("alpha_pattern"), module, c.get("lora_alpha", r))
            self.scale[module + ".weight"] = alpha / (math.sqrt(r) if c.get("use_rslora") else r)
            self.factored[module + ".weight"] = (n, b)
        if not self.factored:
            raise CheckpointError("the adapter has no LoRA factors", where=str(self.path / ADAPTER_WEIGHTS),
                                  fix="train or save the adapter again")

    def names(self) -> list[str]:
        return list(self.factored)

    def shape(self, name: str) -> tuple[int, int]:
        a, b = self.factored[name]
        return (self.ckpt.info(b).shape[0], self.ckpt.info(a).shape[1])

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        a, b = self.factored[name]
        d = self.ckpt.read(b, start, stop).float() @ self.ckpt.read(a).float()  # [rows, r] @ [r, in]
        return d.mul_(self.scale[name])

    def provenance(self) -> dict:
        c = self.config
        return {"kind": "peft-lora-adapter", "adapter": str(self.path), "zero_elsewhere": True,
                "base_model": c.get("base_model_name_or_path"), "r": c.get("r"), "lora_alpha": c.get("lora_alpha"),
                "use_rslora": bool(c.get("use_rslora")), "modules": len(self.factored)}

    def sources(self) -> list[Path]:
        return [self.ckpt.source.path]

    def describe(self) -> dict:
        return {"adapter": str(self.path)}

    def pair(self) -> None:
        return None

    def side_files(self) -> dict[str, bytes]:
        """The adapter folder's tokenizer/chat-template files (no config: `TaskVector` adds the base's)."""
        files = {}
        for f in sorted(self.path.iterdir()):
            if f.is_file() and f.name not in _NOT_CONFIG and any(fnmatch.fnmatch(f.name, p) for p in SIDE_PATTERNS):
                files[f.name] = f.read_bytes()
        return files


def check_adapter(path: str | os.PathLike) -> dict:
    """The adapter_config.json of a PEFT LoRA folder, checked against its tensors; one CheckpointError if they
    disagree. Every path that loads an adapter calls it first (the task vector here, `eval --lora` before vLLM
    starts), because each path trusts a different half: vLLM scales a module by lora_alpha / r of the config
    (rank_pattern, alpha_pattern, rsLoRA applied), the task vector used the tensors' rank, and PEFT builds the
    config's target_modules and drops tensors of other modules. So a config whose r differs from the tensors'
    rank, or whose target_modules leave out a tensor's module, would load as two different models.

    Checks: r a positive integer and lora_alpha a positive number (and the patterns' values); every module
    has lora_A [r_m, in] and lora_B [out, r_m] with r_m the rank the config gives that module (rank_pattern,
    else r); target_modules (and exclude_modules, layers_to_transform) select every module, by PEFT's rule
    (`peft.tuners.tuners_utils.check_target_module_exists`, written out here: PEFT is an optional dependency and
    an adapter is a task vector without it)."""
    folder = Path(path)
    cfg_path, fix = folder / ADAPTER_CONFIG, "save the adapter with peft's save_pretrained"
    try:
        c = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {ADAPTER_CONFIG}: {type(e).__name__}", where=str(folder), fix=fix) from None
    where = str(cfg_path)
    if not isinstance(c, dict):
        raise CheckpointError(f"{ADAPTER_CONFIG} is not a JSON object", where=where, fix=fix)
    number = lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
                        and math.isfinite(v) and v > 0)
    ranks, alphas = c.get("rank_pattern") or {}, c.get("alpha_pattern") or {}
    bad = [f"r is {c.get('r')!r}"] if type(c.get("r")) is not int or c["r"] < 1 else []
    bad += [f"lora_alpha is {c.get('lora_alpha')!r}"] if not number(c.get("lora_alpha")) else []
    bad += [f"rank_pattern {k!r} is {v!r}" for k, v in ranks.items() if type(v) is not int or v < 1] \
        if isinstance(ranks, dict) else [f"rank_pattern is {ranks!r}"]
    bad += [f"alpha_pattern {k!r} is {v!r}" for k, v in alphas.items() if not number(v)] \
        if isinstance(alphas, dict) else [f"alpha_pattern is {alphas!r}"]
    if bad:
        raise CheckpointError(f"{bad[0]}, not a positive number: the scale lora_alpha / r is undefined", where=where,
                              fix="set r (a positive integer) and lora_alpha in adapter_config.json as the adapter "
                                  "was trained, or re-save it with peft's save_pretrained")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"no {ADAPTER_WEIGHTS}", where=str(folder),
                              fix="save the adapter with peft's save_pretrained (safetensors)")
    ckpt = Checkpoint.open(weights)
    targets, excluded = c.get("target_modules"), c.get("exclude_modules")
    layers, layers_pattern = c.get("layers_to_transform"), c.get("layers_pattern")
    for n in ckpt.names():
        if not (n.startswith(PEFT_PREFIX) and n.endswith(_A)):
            continue  # lora_B is checked with its lora_A; other tensors are each path's own business
        module = n[len(PEFT_PREFIX):-len(_A)]
        b = PEFT_PREFIX + module + _B
        if b not in ckpt:
            raise CheckpointError(f"adapter has {n!r} but no {b!r}", where=str(weights), fix="re-save the adapter")
        a_shape, b_shape = ckpt.info(n).shape, ckpt.info(b).shape
        want = _pattern_value(ranks, module, c["r"])
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1] or a_shape[0] != want:
            got = f"lora_A {list(a_shape)}, lora_B {list(b_shape)}"
            raise CheckpointError(f"{ADAPTER_CONFIG} gives {module} rank {want}"
                                  f"{' (rank_pattern)' if want != c['r'] else ''} but its tensors have {got}",
                                  where=where, fix="set r (and rank_pattern) as the adapter was trained, or re-save "
                                                   "it with peft's save_pretrained")
        if isinstance(excluded, str):
            out = re.fullmatch(excluded, module) is not None
        else:
            out = any(module == e or module.endswith("." + e) for e in excluded or ())
        if targets in ("all-linear", "ALL-LINEAR") or (targets is None and c.get("target_parameters")):
            chosen = True
        elif isinstance(targets, str):
            chosen = re.fullmatch(targets, module) is not None
        else:
            chosen = module in (targets or ()) or any(module.endswith("." + t) for t in targets or ())
            if chosen and layers not in (None, []):
                pats = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern or [None]
                idx = next((m["idx"] for p in pats if (m := re.match(
                    r".*?\.[^.]*\.(?P<idx>\d+)\." if not p else rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module))), None)
                chosen = idx is not None and (int(idx) == layers if isinstance(layers, int) else int(idx) in layers)
        if out or not chosen:
            raise CheckpointError(f"the adapter has tensors for {module}, which {ADAPTER_CONFIG} does not adapt "
                                  f"(target_modules {targets!r}"
                                  f"{f', exclude_modules {excluded!r}' if excluded else ''}"
                                  f"{f', layers_to_transform {layers!r}' if layers not in (None, []) else ''})",
                                  where=where, fix="set target_modules as the adapter was trained (PEFT would drop "
                                                   "these tensors, vLLM would apply them), or re-save the adapter")
    return c


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterTerm", "PEFT_PREFIX", "check_adapter", "is_adapter"]
