"""The one merge path: θ1 + α·Δ for one or many configurations, as a stream of row chunks.

`merge_chunks` is the only place where merged weights are computed. `materialize`
writes its chunks to disk; the vLLM worker (`tvtool.worker`) streams `merged_tensors`
(the same chunks, whole tensors) into the running engine. So both receive the same bytes
for the same settings:

    for every output tensor (the base's names, plus lm_head for a tied base/untied reasoner):
        read θ1 rows (and Δ rows, or θ2 rows and Δ = θ2 − θ1) once,        # tv.merge_inputs
        for every MergeConfig:
            not selected (include/exclude) or no Δ  →  θ1 rows, as stored (cast to the output dtype)
            α = 1 and θ2 rows at hand               →  θ2 rows, bit for bit
            otherwise                               →  round_once(fp32(θ1) + fp32(α·Δ))

`merged_config` builds the config/tokenizer files of the merged model for both paths.

Where a merge operator plugs in (TIES, DARE, trim): as a field of `MergeConfig`, applied
to the Δ rows in `_merge_one` before `merge_rows` (an operator that needs whole tensors
asks for `whole=True` chunks), or as a lazy `TaskVector` term.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Iterator, Literal, Sequence

import torch

from .checkpoint import Checkpoint
from .errors import MismatchError, OptionsError
from .finite import check_finite
from .layout import DTYPES, LM_HEAD, dtype_name, embed_name, is_vocab_tensor
from .options import check_regex
from .output import prefetch
from .safetensors_io import row_chunks

if TYPE_CHECKING:  # a type only: taskvector imports this module for TaskVector.apply_to
    from .taskvector import TaskVector


@dataclass(frozen=True)
class MergeConfig:
    """One merged model: θ1 + α·Δ on the tensors that `include`/`exclude` select (others stay θ1).

    Frozen and plain data, so it crosses process boundaries (`to_dict`/`from_dict`) and can be
    recorded. Operator settings (TIES/DARE/trim) are added here as fields.
    """

    alpha: float
    include: str | None = None  # regex: apply α only to tensors whose name matches
    exclude: str | None = None  # regex: never apply α to tensors whose name matches

    def __post_init__(self):
        object.__setattr__(self, "alpha", float(self.alpha))
        check_regex("--include", self.include)
        check_regex("--exclude", self.exclude)

    @cached_property
    def _patterns(self) -> tuple[re.Pattern | None, re.Pattern | None]:
        return (re.compile(self.include) if self.include else None,
                re.compile(self.exclude) if self.exclude else None)

    def selects(self, name: str) -> bool:
        """Whether α·Δ is applied to tensor `name`."""
        inc, exc = self._patterns
        return (not inc or bool(inc.search(name))) and not (exc and exc.search(name))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MergeConfig":
        return cls(**d)


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its name, the base tensor it starts from, output dtype and shape."""

    name: str
    src: str  # the base tensor read (the embedding, for the lm_head of a tied base)
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class MergedChunk:
    """Rows [start, stop) of output tensor `name` (`index` in the plan), one tensor per configuration."""

    index: int
    name: str
    start: int
    stop: int | None
    outputs: list[torch.Tensor] = field(default_factory=list)
    bytes_read: int = 0


def merge_plan(base: Checkpoint, tv: "TaskVector") -> list[tuple[str, str]]:
    """(output name, base name to read) for every output tensor; checks Δ fits the base."""
    names = base.names()
    plan = [(n, n) for n in names]
    prov = tv.provenance()
    absent = {s["name"] for s in prov.get("skipped") or []} | set((prov.get("missing") or {}).get("base_only", []))
    for n in sorted(names):
        if n not in tv and n not in absent:
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


def output_plan(base: Checkpoint, tv: "TaskVector", *,
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


def merge_rows(base: torch.Tensor, delta: torch.Tensor | None, alpha: float, dtype: torch.dtype, *,
               base32: torch.Tensor | None = None) -> torch.Tensor:
    """θ1 + α·Δ in float32 (α·Δ rounded, then added), rounded once to `dtype`; rows past Δ's stay θ1.

    `base32` is `base.float()` when the caller already has it (shared across many α).
    """
    if delta is None or alpha == 0.0 or not base.dtype.is_floating_point:
        return base.to(dtype)
    b32 = base.float() if base32 is None else base32
    step = torch.mul(delta, alpha)  # [n, ...] fp32
    n = delta.shape[0] if delta.dim() else None
    if n is None or n == b32.shape[0]:
        return step.add_(b32).to(dtype)
    out = b32.clone()
    out[:n] += step
    return out.to(dtype)


def merge_chunks(*, base: Checkpoint, tv: "TaskVector", configs: Sequence[MergeConfig],
                 plan: Sequence[PlannedTensor] | None = None, whole: bool = False, read_ahead: int = 2,
                 allow_nonfinite: bool = False, nonfinite: dict[str, int] | None = None,
                 outputs: Sequence[str] | None = None) -> Iterator[MergedChunk]:
    """Stream every output tensor, in plan order and row chunks, merged for each of `configs`.

    Each input is read once however many configurations are asked for (reads run `read_ahead`
    chunks ahead in a thread, so they overlap the arithmetic). `whole=True` gives one chunk per
    tensor (what a model loader wants); chunks never change the values, only the peak memory.

    Non-finite values: NaN/Inf in θ1 or Δ rows are an error naming the tensor and the first index
    (`allow_nonfinite` keeps them, counted per tensor in `nonfinite`); an output that is not finite
    although its inputs are is an overflow of the rounding (e.g. a huge α in bfloat16), always an error,
    naming `outputs[i]` (where configuration i goes) when given.
    """
    configs = list(configs)
    for c in configs:
        check_selection(tv, c)
    plan = list(plan) if plan is not None else output_plan(base, tv)
    counts = nonfinite if nonfinite is not None else {}
    where_b, where_d = str(base.source.ref), " → ".join(str(p) for p in tv.sources())
    reads = _reads(base, tv, configs, plan, whole)
    for i, name, start, stop, base_rows, base32, d, end in (prefetch(reads, read_ahead) if read_ahead else reads):
        p = plan[i]
        chunk = MergedChunk(i, name, start, stop,
                            bytes_read=base_rows.numel() * base_rows.element_size() * (2 if end is not None else 1))
        bad = check_finite(name, base_rows, start, counts=counts, allow=allow_nonfinite, what="the base",
                           where=where_b)
        if d is not None:
            bad += check_finite(name, d, start, counts=counts, allow=allow_nonfinite, where=where_d)
        for k, c in enumerate(configs):
            out = _merge_one(c, name, base_rows, base32, d, end, p.dtype)
            if not bad:  # finite inputs: a non-finite output overflowed the output dtype
                check_finite(name, out, start, where=outputs[k] if outputs else where_b,
                             overflow=f"θ1 + α·Δ in {dtype_name(p.dtype)} at α={c.alpha:g}",
                             overflow_fix="use a smaller |α|, or --dtype float32")
            chunk.outputs.append(out)
        yield chunk


def check_selection(tv: "TaskVector", config: MergeConfig) -> None:
    """--include must match some Δ tensor and --exclude must leave some: else every "merge" is a base copy."""
    if config.include is None and config.exclude is None:
        return
    names = tv.names()
    if any(config.selects(n) for n in names):
        return
    hint = ", ".join(repr(n) for n in names[:4])
    inc, _ = config._patterns
    if inc is not None and not any(inc.search(n) for n in names):
        raise OptionsError(f"--include matches no tensor of the delta ({len(names)} tensors, e.g. {hint})",
                           where=f"--include {config.include}", fix="use a regex that matches some of these names")
    raise OptionsError(f"--exclude leaves no tensor to merge ({len(names)} tensors, e.g. {hint})",
                       where=f"--exclude {config.exclude}",
                       fix="loosen --exclude (or --include) so that some tensors get α·Δ")


def merged_tensors(*, base: Checkpoint, tv: "TaskVector", config: MergeConfig,
                   dtype: str | torch.dtype | None = "auto") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole merged tensor) for one configuration: what the in-engine load streams."""
    plan = output_plan(base, tv, dtype=dtype)
    for chunk in merge_chunks(base=base, tv=tv, configs=[config], plan=plan, whole=True):
        yield chunk.name, chunk.outputs[0]


def merged_config(*, base: Checkpoint, tv: "TaskVector", plan: Sequence[PlannedTensor],
                  config_from: Literal["reasoner", "base"] = "reasoner") -> dict[str, bytes]:
    """The merged model's config/tokenizer/chat-template files, by name.

    config.json comes from `config_from`; its vocab_size must match the output's vocabulary rows;
    its dtype is the output's; a tied-embedding config is untied when the output has its own lm_head.
    """
    files = tv.side_files() if config_from == "reasoner" else base.side_files()
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


# --- internals ---------------------------------------------------------------------------------


def _merge_one(c: MergeConfig, name: str, base_rows: torch.Tensor, base32: torch.Tensor | None,
               d: torch.Tensor | None, end: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """One configuration's rows of one chunk (the α = 1 rule, selection, one rounding)."""
    if d is None or not c.selects(name):
        return base_rows.to(dtype)
    if c.alpha == 1.0 and end is not None and end.shape == base_rows.shape:
        return end.to(dtype)  # θ2 as stored: α=1 is the reasoner bit for bit
    return merge_rows(base_rows, d, c.alpha, dtype, base32=base32)


def _reads(base: Checkpoint, tv: "TaskVector", configs: list[MergeConfig], plan: list[PlannedTensor], whole: bool):
    """(index, name, start, stop, θ1 rows, θ1 fp32 rows | None, Δ rows | None, θ2 rows | None) per chunk."""
    for i, p in enumerate(plan):
        used = p.name in tv and any(c.selects(p.name) for c in configs)
        n_delta = tv.shape(p.name)[0] if used and p.shape else None
        for s, e in ([(0, None)] if whole else _chunks(p.shape, n_delta)):
            if used and (n_delta is None or s < n_delta):
                yield (i, p.name, s, e, *tv.merge_inputs(base, p.name, p.src, s, e))
            else:
                yield i, p.name, s, e, base.read(p.src, s, e), None, None, None


def _chunks(shape, n_delta):
    """Row chunks that never straddle the end of Δ's rows (vocab intersect)."""
    if n_delta is None or not shape or n_delta >= shape[0]:
        return row_chunks(shape)
    return row_chunks((n_delta, *shape[1:])) + [(s + n_delta, e + n_delta)
                                               for s, e in row_chunks((shape[0] - n_delta, *shape[1:]))]
