"""The one merge path: θ1 + α·Δ for one or many configurations, as a stream of row chunks.

`merge_chunks` is the only place where merged weights are computed. `materialize`
writes its chunks to disk; the vLLM worker (`tvtool.engine.worker`) streams `merged_tensors`
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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Literal, Sequence

import torch

from tvtool.io.checkpoint import Checkpoint
from tvtool.errors import MismatchError, OptionsError
from tvtool.merge.finite import check_finite
from tvtool.merge.kernels import count_nonfinite, fused_pair, merge_many, merge_rows, pair_rows  # noqa: F401  (merge_rows: the torch reference, re-exported)
from tvtool.io.layout import DTYPES, LM_HEAD, dtype_name, embed_name, is_vocab_tensor
from tvtool.merge.config import MergeConfig  # noqa: F401  (re-exported: the one merge path's settings)
from tvtool.merge.operators import Merge, Prepared, check_vectors, merged_delta, prepare
from tvtool.io.writer import prefetch
from tvtool.io.safetensors_io import row_chunks

if TYPE_CHECKING:  # a type only: taskvector imports this module for TaskVector.apply_to
    from tvtool.vectors.taskvector import TaskVector


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


def merge_chunks(*, base: Checkpoint, tv: "TaskVector | Sequence[TaskVector]", configs: Sequence[MergeConfig],
                 plan: Sequence[PlannedTensor] | None = None, whole: bool = False, read_ahead: int = 2,
                 allow_nonfinite: bool = False, nonfinite: dict[str, int] | None = None,
                 outputs: Sequence[str] | None = None) -> Iterator[MergedChunk]:
    """Stream every output tensor, in plan order and row chunks, merged for each of `configs`.

    `tv` is one task vector, or several of the same base (Δ_1..Δ_n, for the operators); the
    first gives the plan, config and provenance. Each input is read once per pass however many
    configurations are asked for: one pass, plus two selection passes over a tensor when a
    configuration trims by magnitude (TIES, trim, breadcrumbs) and the tensor spans several
    chunks (`tvtool.merge.operators`). Reads run `read_ahead` chunks ahead in a thread. `whole=True`
    gives one chunk per tensor (what a model loader wants); chunks never change the values.

    Non-finite values: NaN/Inf in θ1 or Δ rows are an error naming the tensor and the first index
    (`allow_nonfinite` keeps them, counted per tensor in `nonfinite`); an output that is not finite
    although its inputs are is an overflow of the rounding (e.g. a huge α in bfloat16), always an error,
    naming `outputs[i]` (where configuration i goes) when given.
    """
    configs = list(configs)
    tvs = list(tv) if isinstance(tv, (list, tuple)) else [tv]
    if len(tvs) > 1:
        check_vectors([{n: t.shape(n) for n in t.names()} for t in tvs])
    for c in configs:
        c.merge.check(len(tvs))
        check_selection(tvs[0], c)
    plan = list(plan) if plan is not None else output_plan(base, tvs[0])
    names = [p.name for p in plan]
    alphas = [None if c.is_plain(len(tvs)) else c.alphas(names) for c in configs]
    counts = nonfinite if nonfinite is not None else {}
    where_b, where_d = str(base.source.ref), [" → ".join(str(p) for p in t.sources()) for t in tvs]
    reads = _reads(base, tvs, configs, plan, whole, lazy=len(tvs) == 1 and not allow_nonfinite)
    for i, name, start, stop, base_rows, base32, ds, end, prep, nbytes in (
            prefetch(reads, read_ahead) if read_ahead else reads):
        p = plan[i]
        chunk = MergedChunk(i, name, start, stop, bytes_read=nbytes)
        outs, bad = None, 0
        if ds is not None and ds[0] is None:  # a plain pair chunk, Δ not formed: fused passes that scan for NaN/Inf
            outs = _pair_chunk(configs, alphas, name, start, base_rows, end, prep, p.dtype)
            if outs is None:  # something is not finite: form Δ, the checked path names it
                base32 = base_rows.float()
                ds = [end.to(torch.float32, copy=True).sub_(base32)]
        if outs is None:
            bad = check_finite(name, base_rows, start, counts=counts, allow=allow_nonfinite, what="the base",
                               where=where_b)
            for d, where in zip(ds or (), where_d):
                bad += check_finite(name, d, start, counts=counts, allow=allow_nonfinite, where=where)
            outs = _merge_one(configs, alphas, name, start, base_rows, base32, ds, end, prep, p.dtype)
        chunk.outputs = outs
        if not bad:  # finite inputs: a non-finite output overflowed the output dtype
            for k, (c, out) in enumerate(zip(configs, chunk.outputs)):
                check_finite(name, out, start, where=outputs[k] if outputs else where_b,
                             overflow=f"θ1 + α·{'Δ' if alphas[k] is None else 'M'} in {dtype_name(p.dtype)} "
                                      f"at α={c.alpha:g}",
                             overflow_fix="use a smaller |α|, or --dtype float32")
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


def merged_tensors(*, base: Checkpoint, tv: "TaskVector | Sequence[TaskVector]", config: MergeConfig,
                   dtype: str | torch.dtype | None = "auto") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole merged tensor) for one configuration: what the in-engine load streams."""
    plan = output_plan(base, tv[0] if isinstance(tv, (list, tuple)) else tv, dtype=dtype)
    for chunk in merge_chunks(base=base, tv=tv, configs=[config], plan=plan, whole=True):
        yield chunk.name, chunk.outputs[0]


def merged_config(*, base: Checkpoint, tv: "TaskVector", plan: Sequence[PlannedTensor],
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


# --- internals ---------------------------------------------------------------------------------


def _merge_one(configs: list[MergeConfig], alphas: list[dict | None], name: str, start: int,
               base_rows: torch.Tensor, base32: torch.Tensor | None, ds: list[torch.Tensor] | None,
               end: torch.Tensor | None, prep: Prepared | None, dtype: torch.dtype) -> list[torch.Tensor]:
    """Every configuration's rows of one chunk: selection, the α = 1 rule, M once per distinct
    operator, then all α of that operator through one fused kernel (one rounding each)."""
    out: list[torch.Tensor | None] = [None] * len(configs)
    groups: dict[Merge, list[tuple[int, float]]] = {}
    for j, c in enumerate(configs):
        if ds is None or not c.selects(name):
            out[j] = base_rows.to(dtype)
            continue
        a = c.alpha if alphas[j] is None else alphas[j][name]
        if alphas[j] is None and a == 1.0 and end is not None and end.shape == base_rows.shape:
            out[j] = end.to(dtype)  # θ2 as stored: α=1 is the reasoner bit for bit
            continue
        groups.setdefault(c.merge, []).append((j, a))
    for m, items in groups.items():
        delta = merged_delta(m, prep, ds, start) if prep is not None else ds[0]  # [rows, ...] fp32
        res = merge_many(base=base_rows, delta=delta, alphas=[a for _, a in items], dtype=dtype, base32=base32)
        for (j, _), r in zip(items, res):
            out[j] = r
    return out


def _pair_chunk(configs: list[MergeConfig], alphas: list[dict | None], name: str, start: int,
                base_rows: torch.Tensor, end: torch.Tensor, prep: Prepared | None,
                dtype: torch.dtype) -> list[torch.Tensor] | None:
    """Every configuration's rows of a plain pair's chunk without the float32 θ1 and Δ arrays (Δ formed per
    element: `_pair_fused`, or M by `kernels.combine` of a `PairRows`); None if a value is not finite."""
    if prep is None:
        return _pair_fused(configs, name, base_rows, end, dtype)
    pr = pair_rows(base_rows, end)
    if pr is None or count_nonfinite(pr) != 0:
        return None
    return _merge_one(configs, alphas, name, start, base_rows, None, [pr], end, prep, dtype)


def _pair_fused(configs: list[MergeConfig], name: str, base_rows: torch.Tensor, end: torch.Tensor,
                dtype: torch.dtype) -> list[torch.Tensor] | None:
    """Plain configurations' rows from θ1 and θ2 rows by `kernels.fused_pair` (the same bytes as
    `_merge_one`: unselected or α=0 → θ1, α=1 → θ2); None if it does not apply or a value is not finite."""
    todo = sorted({c.alpha for c in configs if c.selects(name) and c.alpha not in (0.0, 1.0)})
    res = fused_pair(base=base_rows, end=end, alphas=todo, dtype=dtype)
    if res is None:
        return None
    by = dict(zip(todo, res))
    return [by[c.alpha] if c.alpha in by else end if c.selects(name) and c.alpha == 1.0 else base_rows
            for c in configs]


def _inputs(base: Checkpoint, tvs: list, name: str, src: str, start: int, stop: int | None, lazy: bool = False):
    """(θ1 rows, θ1 fp32 rows, [Δ_i rows], θ2 rows of the first vector | None); θ1 read once. `lazy`: a plain
    pair gives (θ1 rows, None, [None], θ2 rows), Δ left to `_pair_fused`."""
    base_rows, base32, d, end = tvs[0].merge_inputs(base, name, src, start, stop, lazy=lazy)
    ds = [d] + [t.merge_inputs(base, name, src, start, stop, base_rows=base_rows, base32=base32)[2] for t in tvs[1:]]
    return base_rows, base32, ds, end


def _reads(base: Checkpoint, tvs: list, configs: list[MergeConfig], plan: list[PlannedTensor], whole: bool,
           lazy: bool = False):
    """Per chunk: (index, name, start, stop, θ1 rows, θ1 fp32 | None, [Δ_i rows] | None, θ2 rows | None,
    the tensor's selection cuts | None, bytes read). A tensor that a magnitude operator trims gets its
    selection passes (`operators.prepare`) here, before its first chunk, in the read-ahead thread."""
    n = len(tvs)
    for i, p in enumerate(plan):
        sel = [c for c in configs if c.selects(p.name)]
        used = p.name in tvs[0] and bool(sel)
        n_delta = tvs[0].shape(p.name)[0] if used and p.shape else None
        chunks = [(0, None)] if whole else _chunks(p.shape, n_delta)
        ops = [c.merge for c in sel if not c.is_plain(n)]
        prep, extra, cached = None, 0, None
        if used and ops:
            shape = tuple(tvs[0].shape(p.name))
            ranges = row_chunks(shape)
            if len(ranges) == 1 or whole:  # one read serves the selection and the output
                cached = _inputs(base, tvs, p.name, p.src, 0, None if whole else chunks[0][1])
                ranges, read = [(0, shape[0] if shape else 1)], lambda s, e: cached[2]
            else:
                def read(s, e):  # a selection pass: a plain pair's Δ stays θ1/θ2 rows (kernels.PairRows)
                    nonlocal extra
                    b, _, ds, end = _inputs(base, tvs, p.name, p.src, s, e, lazy=lazy)
                    extra += b.numel() * b.element_size() * (1 + n)
                    return ds if ds[0] is not None else [pair_rows(b, end) or end.float() - b.float()]
            prep = prepare(ops, name=p.name, shape=shape, n_vectors=n, ranges=ranges, read=read)
        for k, (s, e) in enumerate(chunks):
            if used and (n_delta is None or s < n_delta):
                base_rows, base32, ds, end = cached if (cached is not None and k == 0) else \
                    _inputs(base, tvs, p.name, p.src, s, e, lazy=lazy)
                nbytes = base_rows.numel() * base_rows.element_size() * ((2 if end is not None else 1) + n - 1) \
                    + (extra if k == 0 else 0)
                yield i, p.name, s, e, base_rows, base32, ds, end, prep, nbytes
            else:
                b = base.read(p.src, s, e)
                yield i, p.name, s, e, b, None, None, None, None, b.numel() * b.element_size()


def _chunks(shape, n_delta):
    """Row chunks that never straddle the end of Δ's rows (vocab intersect)."""
    if n_delta is None or not shape or n_delta >= shape[0]:
        return row_chunks(shape)
    return row_chunks((n_delta, *shape[1:])) + [(s + n_delta, e + n_delta)
                                               for s, e in row_chunks((shape[0] - n_delta, *shape[1:]))]
