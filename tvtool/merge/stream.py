"""The one merge path: every configuration's output, as a stream of row chunks.

`merge_chunks` is the only place where merged weights are computed. `materialize`
writes its chunks to disk; the vLLM worker (`tvtool.engine.worker`) streams `merged_tensors`
(the same chunks, whole tensors) into the running engine. So both receive the same bytes
for the same settings:

    for every output tensor (the base's names, plus lm_head for a tied base/untied reasoner):
        the operators' per-tensor passes (a shared exact top-k, statistics)     # prepare
        read θ1 rows (and Δ rows, or θ2 rows and Δ = θ2 − θ1) once,             # _inputs
        for every MergeConfig:
            not selected (include/exclude) or no Δ  →  θ1 rows, as stored (cast to the output dtype)
            plain, α = 1 and θ2 rows at hand        →  θ2 rows, bit for bit
            otherwise                               →  the operator's rows at α: round_once(fp32(θ1) + fp32(α·M))
                                                       for the α-free ones, M once per distinct operator

The operators come from the registry (`tvtool.merge.registry`); the plan and config files of the
merged model from `tvtool.merge.plan`. How Δ's inputs are read together with θ1 (a plain pair over
this base: θ1 read once for both) is here too (`_inputs`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from tvtool.errors import CheckpointError, OptionsError
from tvtool.io.buffers import empty, reuse
from tvtool.io.checkpoint import Checkpoint
from tvtool.io.finite import check_finite
from tvtool.io.layout import dtype_name
from tvtool.io.safetensors_io import row_chunks
from tvtool.io.writer import prefetch
from tvtool.merge.config import MergeConfig
from tvtool.merge.kernels import count_nonfinite, fused_pair, merge_many, pair_rows
from tvtool.merge.plan import PlannedTensor, output_plan
from tvtool.merge.prepare import Prepared, prepare
from tvtool.merge.registry import Operator, Rows, TensorInfo
from tvtool.vectors.source import DeltaSource
from tvtool.vectors.taskvector import TaskVector
from tvtool.vectors.vocab import check_vectors


@dataclass
class MergedChunk:
    """Rows [start, stop) of output tensor `name` (`index` in the plan), one tensor per configuration."""

    index: int
    name: str
    start: int
    stop: int | None
    outputs: list[torch.Tensor] = field(default_factory=list)
    bytes_read: int = 0


def merge_chunks(*, base: Checkpoint, tv: TaskVector | Sequence[TaskVector], configs: Sequence[MergeConfig],
                 plan: Sequence[PlannedTensor] | None = None, whole: bool = False, read_ahead: int = 2,
                 allow_nonfinite: bool = False, nonfinite: dict[str, int] | None = None,
                 outputs: Sequence[str] | None = None) -> Iterator[MergedChunk]:
    """Stream every output tensor, in plan order and row chunks, merged for each of `configs`.

    `tv` is one task vector, or several of the same base (Δ_1..Δ_n, for the operators); the
    first gives the plan, config and provenance. Each input is read once per pass however many
    configurations are asked for: one pass, plus the passes an operator needs over a tensor that
    spans several chunks (trim, TIES, breadcrumbs: two selection passes shared by all of them; della:
    one; slerp: two). Reads run `read_ahead` chunks ahead in a thread. `whole=True` gives one chunk
    per tensor (what a model loader wants); chunks never change the values.

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
        check_config(tvs, c)
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


def check_config(tvs: TaskVector | Sequence[TaskVector], config: MergeConfig) -> None:
    """What can be checked before any tensor is read: the operator's settings for these task vectors,
    the tensor selection (`check_selection`) and the α rules (`MergeConfig.alphas` over Δ's names)."""
    tvs = list(tvs) if isinstance(tvs, (list, tuple)) else [tvs]
    config.operator.check(len(tvs))
    check_selection(tvs[0], config)
    if config.rules:
        config.alphas(tvs[0].names())


def check_configs(*, source: DeltaSource, configs: Sequence[MergeConfig]) -> None:
    """`check_config` of every configuration against the source's task vectors (headers only): what an
    in-engine sweep checks before its engine starts, so that a bad setting is one line, not a worker's error."""
    vectors = source.open().vectors
    for c in configs:
        check_config(vectors, c)


def check_selection(tv: TaskVector, config: MergeConfig) -> None:
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


def merged_tensors(*, base: Checkpoint, tv: TaskVector | Sequence[TaskVector], config: MergeConfig,
                   dtype: str | torch.dtype | None = "auto") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole merged tensor) for one configuration: what the in-engine load streams."""
    plan = output_plan(base, tv[0] if isinstance(tv, (list, tuple)) else tv, dtype=dtype)
    for chunk in merge_chunks(base=base, tv=tv, configs=[config], plan=plan, whole=True):
        yield chunk.name, chunk.outputs[0]


def apply_to(tv: TaskVector, base: str | os.PathLike | Checkpoint, *, alpha: float = 1.0,
             dtype: torch.dtype | None = None, include: str | None = None,
             exclude: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (name, θ1 + α·Δ) over the base's tensors, rounded once to `dtype` (default: stored): the
    shared merge path (`merged_tensors`), so the same bytes as `materialize`."""
    b = base if isinstance(base, Checkpoint) else Checkpoint.open(base)
    return merged_tensors(base=b, tv=tv, config=MergeConfig(alpha, include, exclude), dtype=dtype)


# --- internals ---------------------------------------------------------------------------------


def _merge_one(configs: list[MergeConfig], alphas: list[dict | None], name: str, start: int,
               base_rows: torch.Tensor, base32: torch.Tensor | None, ds: list[torch.Tensor] | None,
               end: torch.Tensor | None, prep: Prepared | None, dtype: torch.dtype) -> list[torch.Tensor]:
    """Every configuration's rows of one chunk: selection, the α = 1 rule, then each distinct operator
    once with all its α (`Operator.outputs`: M once, every α through one fused kernel, one rounding each)."""
    out: list[torch.Tensor | None] = [None] * len(configs)
    groups: dict[Operator, list[tuple[int, float]]] = {}
    for j, c in enumerate(configs):
        if ds is None or not c.selects(name):
            out[j] = base_rows.to(dtype)
            continue
        a = c.alpha if alphas[j] is None else alphas[j][name]
        if alphas[j] is None and a == 1.0 and end is not None and end.shape == base_rows.shape:
            out[j] = end.to(dtype)  # θ2 as stored: α=1 is the reasoner bit for bit
            continue
        groups.setdefault(c.operator, []).append((j, a))
    rows = Rows(base_rows, ds, end, base32, start)
    for op, items in groups.items():
        al = [a for _, a in items]
        if prep is None:  # only plain configurations: θ1 + α·Δ
            res = merge_many(base=base_rows, delta=ds[0], alphas=al, dtype=dtype, base32=base32)
        else:
            res = op.outputs(prep.states.get(op), rows, prep.tensor, al, dtype)
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


def _tv_inputs(tv: TaskVector, base: Checkpoint, name: str, src: str, start: int = 0, stop: int | None = None, *,
               base_rows: torch.Tensor | None = None, base32: torch.Tensor | None = None, lazy: bool = False):
    """(θ1 rows as stored, θ1 rows in fp32, Δ rows, θ2 rows or None) of one task vector for output tensor `name`.

    Reads every input once: for a plain base/reasoner pair over this base (`TaskVector.pair`), Δ is
    computed from the same θ1 rows (and θ2 rows are returned, so α=1 can be θ2 bit for bit). `base_rows`
    (and `base32`) are θ1's rows when the caller already read them (several task vectors). `src` is the
    base tensor to read (the embedding for a tied lm_head). `lazy`: for that plain pair, return
    (θ1 rows, None, None, θ2 rows) and let the caller form Δ (`kernels.fused_pair`).
    """
    p, shape = tv.pair(), tv.shape(name)
    whole = p is not None and shape == tuple(base.info(src).shape)
    within = p is not None and stop is not None and bool(shape) and stop <= shape[0]
    if (whole or within) and p.base.source.path.resolve() == base.source.path.resolve():
        bn, rn, _ = p.tensors[name]
        base_rows = p.base.read(bn, start, stop) if base_rows is None else base_rows
        r = p.reasoner.read(rn, start, stop)
        if lazy and base32 is None:
            return base_rows, None, None, r
        if base32 is None:  # [rows, ...] shared by Δ and every α; pooled buffers within a pass (tvtool.io.buffers)
            base32 = empty(tuple(base_rows.shape), torch.float32).copy_(base_rows)
        return base_rows, base32, empty(tuple(r.shape), torch.float32).copy_(r).sub_(base32), r
    base_rows = base.read(src, start, stop) if base_rows is None else base_rows
    # (vocab intersect over whole tensors: Δ re-reads θ1's shared rows)
    return base_rows, base_rows.float() if base32 is None else base32, tv.rows(name, start, stop), None


def _inputs(base: Checkpoint, tvs: list, name: str, src: str, start: int, stop: int | None, lazy: bool = False):
    """(θ1 rows, θ1 fp32 rows, [Δ_i rows], θ2 rows of the first vector | None); θ1 read once. `lazy`: a plain
    pair gives (θ1 rows, None, [None], θ2 rows), Δ left to `_pair_fused`."""
    base_rows, base32, d, end = _tv_inputs(tvs[0], base, name, src, start, stop, lazy=lazy)
    ds = [d] + [_tv_inputs(t, base, name, src, start, stop, base_rows=base_rows, base32=base32)[2] for t in tvs[1:]]
    return base_rows, base32, ds, end


def _reads(base: Checkpoint, tvs: list, configs: list[MergeConfig], plan: list[PlannedTensor], whole: bool,
           lazy: bool = False):
    """Per chunk: (index, name, start, stop, θ1 rows, θ1 fp32 | None, [Δ_i rows] | None, θ2 rows | None,
    the tensor's `Prepared` | None, bytes read). A tensor that an operator prepares (selection passes,
    statistics: `prepare`) gets its passes here, before its first chunk, in the read-ahead thread."""
    n = len(tvs)
    for i, p in enumerate(plan):
        sel = [c for c in configs if c.selects(p.name)]
        used = p.name in tvs[0] and bool(sel)
        n_delta = tvs[0].shape(p.name)[0] if used and p.shape else None
        chunks = [(0, None)] if whole else _chunks(p.shape, n_delta)
        ops = [c.operator for c in sel if not c.is_plain(n)]
        prep, extra, cached = None, 0, None
        if used and ops:
            shape = tuple(tvs[0].shape(p.name))
            ranges = row_chunks(shape)
            if len(ranges) == 1 or whole:  # one read serves the selection and the output
                cached = _inputs(base, tvs, p.name, p.src, 0, None if whole else chunks[0][1])
                ranges = [(0, shape[0] if shape else 1)]

                def read(s, e):
                    return Rows(cached[0], cached[2], cached[3], cached[1], 0)
            else:
                def read(s, e):  # a pass before the output: a plain pair's Δ stays θ1/θ2 rows (kernels.PairRows)
                    nonlocal extra
                    b, b32, ds, end = _inputs(base, tvs, p.name, p.src, s, e, lazy=lazy)
                    extra += b.numel() * b.element_size() * (1 + n)
                    ds = ds if ds[0] is not None else [pair_rows(b, end) or end.float() - b.float()]
                    return Rows(b, ds, end, b32, s)
            prep = prepare(ops, tensor=TensorInfo(p.name, shape, n), ranges=ranges, read=read)
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


__all__ = ["MergedChunk", "apply_to", "check_config", "check_configs", "check_selection", "merge_chunks",
           "merged_tensors"]


def check_finite_inputs(*, source: DeltaSource, config: MergeConfig) -> None:
    """NaN/Inf in θ1 or Δ, found the way materialize finds them (`merge_chunks`: one streaming pass in row
    chunks, `tvtool.io.finite`), before an engine loads them: the evaluation calls it before the engine starts,
    so the error names the tensor and index instead of failing inside the workers' weight load after it."""
    base, tvs = source.open()
    try:
        with reuse():  # chunk buffers recycled within the pass (tvtool.io.buffers)
            for _ in merge_chunks(base=base, tv=tvs, configs=[config]):
                pass
    except CheckpointError as e:
        if not e.what.startswith("non-finite value"):
            raise
        raise CheckpointError(e.what, where=e.where, fix="fix or re-download the checkpoint (an engine cannot "
                                                         "generate from NaN or Inf weights)") from None
