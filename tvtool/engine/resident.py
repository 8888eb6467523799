"""The resident α swap: θ1 and Δ (θ2 for a pair, M for an operator) kept in the engine's own layout,
so that every α after the first is set as θ1 + α·M from memory: no file read, no full-model merge.

A `Region` is one strided block of one engine parameter filled from one checkpoint tensor, as vLLM's
loaders place it after sharding and fusing (found once per engine by `tvtool.engine.vllm_layout.bake`;
a test can build its own). Per region a worker captures, from the inputs, once:
    θ1  the base rows as stored (what the merge path reads);
    E   θ2 as stored, for a plain base/reasoner pair: Δ = fl32(θ2) − fl32(θ1) is formed at each α as the
        merge path forms it, and α = 1 is θ2 bit for bit;
    M   otherwise (a delta file, factored delta, PEFT adapter, several vectors, any operator) the float32 M
        that the merge path multiplies by α, once per operator setting, through the one merge path:
        `merged_tensors` over a base of −0.0 at α = 1 in float32 is fl32(−0 + fl32(1·M)) = M bit for bit
        (x + (−0) = x for every float x, ±0 included), so no operator is implemented a second time.
        Kept as bfloat16 where every value round-trips exactly (a bf16 delta file), else float32.
Each α then writes into every region the bytes of the streaming path: the merge path's rule per tensor
(`tensor_rules`), computed by the merge path's own kernels on CPU (`tvtool.merge.kernels`), or on a GPU
by a multiply and an add as two separate ops (a fused multiply-add would round once, the CPU merge twice).
vLLM's cast into the parameter is the loaders' `copy_`, done by the caller.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Iterator, Literal, Sequence

import torch

from tvtool.engine.placement import Placement, held_bytes
from tvtool.io.checkpoint import Checkpoint, Source
from tvtool.io.layout import dtype_name
from tvtool.merge.config import MergeConfig
from tvtool.io.finite import check_finite
from tvtool.merge.kernels import fused_pair, merge_many
from tvtool.merge.plan import PlannedTensor, output_plan
from tvtool.merge.stream import merged_tensors
from tvtool.vectors.source import DeltaSource

# a region's source view: only slicing/view ops, as vLLM records them (sharded_rdt_common.SUPPORTED_OPS)
CHAIN_OPS = frozenset({"narrow", "view", "reshape", "__getitem__", "unsqueeze", "squeeze", "transpose", "t",
                       "permute", "flatten", "contiguous", "chunk", "unbind"})


@dataclass(frozen=True)
class Region:
    """Elements [offset, shape, stride] of parameter `param` of module `module` take `chain(tensor)`."""

    module: str
    param: str
    tensor: str  # the checkpoint (merge plan) tensor
    chain: tuple  # ((op, args, ((kw, value), ...)), ...) replayed on the whole tensor
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def source_view(self, tensor: torch.Tensor) -> torch.Tensor:
        """This region's values taken from the whole checkpoint tensor (the loader's slicing, replayed)."""
        t = tensor
        for op, args, kw in self.chain:
            if op not in CHAIN_OPS:
                raise ValueError(f"{self.tensor}: op {op!r} is not a slice or view")
            t = getattr(t, op)(*args, **dict(kw))
        return t

    def target(self, param: torch.Tensor) -> torch.Tensor:
        """This region's view of the (materialized) parameter."""
        return param.data.as_strided(self.shape, self.stride, self.offset)


@dataclass(frozen=True)
class Rule:
    """What the streaming path writes into one tensor for one configuration (`tensor_rules`)."""

    kind: Literal["base", "end", "merge"]  # θ1 as stored | θ2 as stored | round_once(θ1 + α·M)
    alpha: float = 0.0
    rows: int | None = None  # merge only the first `rows` rows (vocab intersect); the rest stay θ1


def tensor_rules(*, plan: Sequence[PlannedTensor], tvs: Sequence, config: MergeConfig) -> dict[str, Rule]:
    """The merge path's rule per output tensor (tvtool.merge.stream's table): not selected or no Δ → θ1;
    α_eff = 0 → θ1; a plain pair at α = 1 over rows of θ1's shape → θ2; otherwise θ1 + α_eff·M rounded once
    to the tensor's dtype, over the rows Δ has. α_eff follows `MergeConfig.alphas` over the plan's names."""
    n, tv = len(tvs), tvs[0]
    plain = config.is_plain(n)
    alphas = None if plain else config.alphas([p.name for p in plan])
    out = {}
    for p in plan:
        if p.name not in tv or not config.selects(p.name):
            out[p.name] = Rule("base")
            continue
        a = config.alpha if plain else alphas[p.name]
        shape = tuple(tv.shape(p.name))
        if a == 0.0:
            out[p.name] = Rule("base")
        elif plain and a == 1.0 and tv.pair() is not None and shape == tuple(p.shape):
            out[p.name] = Rule("end")
        else:
            rows = shape[0] if p.shape and shape and shape[0] < p.shape[0] else None
            out[p.name] = Rule("merge", a, rows)
    return out


def identity_merge(config: MergeConfig, n_vectors: int) -> bool:
    """M = Δ: one task vector, weight 1, no operator (α rules and schedules only scale α)."""
    return replace(config, rules=(), schedule=None).is_plain(n_vectors)


# --- what a worker holds ---------------------------------------------------------------------------------


@dataclass
class _Held:
    theta1: torch.Tensor  # the region's θ1, as stored
    end: torch.Tensor | None = None  # θ2 as stored (a single base/reasoner pair)
    m: torch.Tensor | None = None  # M in float32, or bfloat16 where every value round-trips
    rows: torch.Tensor | None = None  # bool: elements inside Δ's rows (vocab intersect only)
    top: dict = field(default_factory=dict)  # max |θ1|, |θ2|, |M| (bounds the output: see `Resident.values`)


def _amax(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


class Resident:
    """θ1 and θ2 or M for every region of one `DeltaSource`; `values(config)` gives each region's bytes.

    Captured on demand: θ1 on the first configuration; θ2 when a configuration merges a single pair as
    θ1 + α·Δ; M when a configuration needs it (an operator, or a Δ that θ2 cannot give), once per operator
    setting (the last one is kept)."""

    def __init__(self, *, source: DeltaSource, regions: Sequence[Region], device: torch.device,
                 placement: Placement = "cpu"):
        self.source, self.regions, self.placement, self.device = source, list(regions), placement, device
        self.base, self.tvs = source.open()
        self.plan = {p.name: p for p in output_plan(self.base, self.tvs[0])}
        self.by_tensor: dict[str, list[int]] = {}
        for i, r in enumerate(self.regions):
            self.by_tensor.setdefault(r.tensor, []).append(i)
        self.held: dict[int, _Held] = {}
        self.m_key: MergeConfig | None = None  # the operator setting the held M belong to
        self.m_names: set[str] = set()
        self.captures = 0  # capture passes so far (each reads inputs)
        self.paired = self._paired()  # tensors whose Δ is fl32(θ2) − fl32(θ1) with θ2 as stored

    def _paired(self) -> set[str]:
        tv = self.tvs[0]
        if tv.pair() is None or len(self.tvs) != 1:
            return set()
        reasoner = Checkpoint.open(self.source.reasoner, allow_pickle=self.source.allow_pickle)
        out = set()
        for name in self.by_tensor:
            p = self.plan[name]
            if (name in tv and name in reasoner and reasoner.info(name).dtype == p.dtype
                    and tuple(reasoner.info(name).shape) == tuple(p.shape) == tuple(tv.shape(name))):
                out.add(name)
        return out

    # -- capture ------------------------------------------------------------------------------------
    def capture(self, config: MergeConfig) -> None:
        """Read what `config` needs and is not held yet: θ1, θ2 (a single pair), M of its operator. A capture
        that fails (a NaN in an input, an error reading) leaves nothing held: the next one starts over."""
        before = self.captures
        try:
            self._capture(config)
        except BaseException:
            self.held.clear()
            self.m_key, self.m_names = None, set()
            raise
        if self.captures != before:
            self._warm()

    def _warm(self) -> None:
        """Run `finish` once on one element of each kind of region, so that its compiled kernels are loaded
        now: numba reads each kernel from its on-disk cache on its first call (~60 KB, seen in a Ray actor
        whose first α was an endpoint), which a later α's load would count as input read."""
        seen = set()
        for i, r in enumerate(self.regions):
            h, dtype = self.held[i], self.plan[r.tensor].dtype
            for pair, x in ((True, h.end), (False, h.m)):
                key = (pair, h.theta1.dtype, None if x is None else x.dtype, dtype)
                if x is None or key in seen or not h.theta1.numel():
                    continue
                seen.add(key)
                finish(theta1=h.theta1.reshape(-1)[:1], x=x.reshape(-1)[:1], pair=pair, alpha=0.5, dtype=dtype,
                       device=self.device)

    def _capture(self, config: MergeConfig) -> None:
        if not self.held:
            self.captures += 1
            for name, idx in self.by_tensor.items():
                t = self.base.read(self.plan[name].src)
                check_finite(name, t, what="the base", where=self.source.base)  # as the streaming path checks
                for i in idx:
                    v = self.regions[i].source_view(t)
                    self.held[i] = _Held(self._keep(v), top={"theta1": _amax(v)})
            self._row_masks()
        ident = identity_merge(config, len(self.tvs))
        if ident and self.paired and self.held[self.by_tensor[next(iter(self.paired))][0]].end is None:
            self.captures += 1
            reasoner = Checkpoint.open(self.source.reasoner, allow_pickle=self.source.allow_pickle)
            for name in self.paired:
                e = reasoner.read(name)
                check_finite(name, e, what="the reasoner", where=self.source.reasoner)
                for i in self.by_tensor[name]:
                    v = self.regions[i].source_view(e)
                    self.held[i].end = self._keep(v)
                    self.held[i].top["end"] = _amax(v)
        want = {n for n in self.by_tensor if n in self.tvs[0] and not (ident and n in self.paired)}
        key = m_key(config)
        if want and (key != self.m_key or not want <= self.m_names):
            self._capture_m(key, want)
        if config.is_plain(len(self.tvs)) and self.tvs[0].pair() is not None:
            self._capture_end(want)

    def _capture_m(self, key: MergeConfig, want: set[str]) -> None:
        """M of `want`, through the merge path over a base of −0.0 (see the module doc)."""
        self.captures += 1
        for i in self.held:
            self.held[i].m = None
        some = want != {n for n in self.plan if n in self.tvs[0]}  # then only these are merged (others: −0)
        config = replace(key, include=exact_names(sorted(want))) if some else key
        for name, m in merged_tensors(base=_NegZero(self.base), tv=self.tvs, config=config, dtype=torch.float32):
            if name in want:
                for i in self.by_tensor[name]:
                    v = self.regions[i].source_view(m)
                    if torch.equal(v.bfloat16().float().view(torch.int32), v.view(torch.int32)):
                        v = v.bfloat16()  # every value (−0 included) round-trips: half the memory
                    self.held[i].m = self._keep(v)
                    self.held[i].top["m"] = _amax(v)
        self.m_key, self.m_names = key, set(want)

    def _capture_end(self, unpaired: set[str]) -> None:
        """θ2 where the α = 1 rule applies to a tensor θ2 does not give Δ for (an lm_head tied in one model,
        another dtype): the merge path's own α = 1 output for exactly those tensors (rare: it reads the base
        once more)."""
        tv = self.tvs[0]
        names = [n for n in unpaired if tuple(tv.shape(n)) == tuple(self.plan[n].shape)
                 and self.held[self.by_tensor[n][0]].end is None]
        if not names:
            return
        self.captures += 1
        for name, e in merged_tensors(base=self.base, tv=tv, config=MergeConfig(1.0, include=exact_names(names))):
            if name in names:
                for i in self.by_tensor[name]:
                    v = self.regions[i].source_view(e)
                    self.held[i].end = self._keep(v)
                    self.held[i].top["end"] = _amax(v)

    def _row_masks(self) -> None:
        """Vocab intersect: which elements of a region come from Δ's rows (the others stay θ1)."""
        tv = self.tvs[0]
        for name, idx in self.by_tensor.items():
            p = self.plan[name]
            if name not in tv or not p.shape or tv.shape(name)[0] >= p.shape[0]:
                continue
            row = torch.arange(p.shape[0]).view(-1, *[1] * (len(p.shape) - 1)).expand(p.shape)
            for i in idx:
                self.held[i].rows = self._keep(self.regions[i].source_view(row) < tv.shape(name)[0])

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        """A contiguous copy where the region lives: the GPU, or pinned CPU memory next to a GPU engine."""
        if self.placement == "gpu":
            return t.to(self.device, copy=True).contiguous()
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.device.type == "cuda")
        return out.copy_(t)

    def need(self, config: MergeConfig) -> int:
        """Bytes this worker will keep for `config` (headers only, nothing read): θ1 as stored, θ2 as stored
        where Δ comes from a single pair, else a float32 M (an upper bound: M is kept in bf16 where exact)."""
        ident = identity_merge(config, len(self.tvs))
        return sum(held_bytes(numel=r.numel, itemsize=self.plan[r.tensor].dtype.itemsize,
                              in_delta=r.tensor in self.tvs[0], paired=ident and r.tensor in self.paired)
                   for r in self.regions)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for h in self.held.values()
                   for t in (h.theta1, h.end, h.m, h.rows) if t is not None)

    # -- each α ---------------------------------------------------------------------------------------
    def values(self, config: MergeConfig) -> Iterator[tuple[Region, torch.Tensor]]:
        """(region, its bytes in the tensor's stored dtype) for `config`: what the streaming path loads."""
        self.capture(config)
        ident = identity_merge(config, len(self.tvs))
        rules = tensor_rules(plan=list(self.plan.values()), tvs=self.tvs, config=config)
        for i, r in enumerate(self.regions):
            h, rule, dtype = self.held[i], rules[r.tensor], self.plan[r.tensor].dtype
            if rule.kind == "base":
                yield r, h.theta1
            elif rule.kind == "end":
                yield r, h.end
            else:
                pair = ident and r.tensor in self.paired
                out = finish(theta1=h.theta1, x=h.end if pair else h.m, pair=pair, alpha=rule.alpha, dtype=dtype,
                             device=self.device)
                if h.rows is not None:
                    out = torch.where(h.rows.to(out.device), out, h.theta1.to(out.device, dtype))
                delta = h.top["end"] + h.top["theta1"] if pair else h.top["m"]
                if h.top["theta1"] + abs(rule.alpha) * delta >= 0.5 * torch.finfo(dtype).max:  # it may overflow
                    what = f"θ1 + α·{'Δ' if config.is_plain(len(self.tvs)) else 'M'} in {dtype_name(dtype)}"
                    check_finite(r.tensor, out, where=f"{r.module}.{r.param}", overflow=f"{what} at α={rule.alpha:g}",
                                 overflow_fix="use a smaller |α|, or --dtype float32")
                yield r, out


def m_key(config: MergeConfig) -> MergeConfig:
    """What M depends on: the operator setting, not α, the selection or the α rules and schedule."""
    return replace(config, alpha=1.0, include=None, exclude=None, rules=(), schedule=None)


def finish(*, theta1: torch.Tensor, x: torch.Tensor, pair: bool, alpha: float, dtype: torch.dtype,
           device: torch.device) -> torch.Tensor:
    """round_once(fl32(θ1) + fl32(α·M)) in `dtype`; M = x (a float32/bf16 M) or fl32(x) − fl32(θ1) (`pair`:
    x = θ2).

    On CPU: the merge path's kernels (`fused_pair`, `merge_many`), bit for bit `merge_rows`. Elsewhere (a GPU):
    `finish_torch` on the device."""
    if device.type != "cpu":
        return finish_torch(theta1.to(device, non_blocking=True), x.to(device, non_blocking=True), pair, alpha, dtype)
    if pair:
        out = fused_pair(base=theta1, end=x, alphas=[alpha], dtype=dtype)
        if out is not None:
            return out[0]
        delta = x.float() - theta1.float()
    else:
        delta = x if x.dtype == torch.float32 else x.float()
    return merge_many(base=theta1, delta=delta, alphas=[alpha], dtype=dtype)[0]


def finish_torch(theta1: torch.Tensor, x: torch.Tensor, pair: bool, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """`merge_rows`' expression on any device, torch only: Δ = fl32(θ2) − fl32(θ1) (a pair), step = fl32(α·M),
    out = round_once(step + fl32(θ1)). The multiply and the add are separate kernels: a compiler contracting
    `θ1 + α·M` into one fused multiply-add (nvcc does) would round once where the CPU merge rounds twice.
    scripts/check_gpu_alpha.py checks it on a GPU against the CPU merge, bit for bit."""
    b32 = theta1.float()
    delta = x.to(torch.float32, copy=True).sub_(b32) if pair else x.float()
    step = torch.mul(delta, alpha)
    return step.add_(b32).to(dtype)


# --- M through the merge path: a base of −0.0 ----------------------------------------------------------


class _NegZero(Checkpoint):
    """`base`'s tensor names and shapes, every value −0.0 in float32: `merged_tensors` over it at α = 1
    in float32 yields M itself (see the module doc). Never on disk; its path is no real checkpoint's."""

    def __init__(self, base: Checkpoint):
        infos = {n: replace(base.info(n), dtype=torch.float32) if base.info(n).dtype.is_floating_point
                 else base.info(n) for n in base.names()}
        super().__init__(Source(base.source.path / "<-0>", f"−0 × {base.source.ref}"), infos, {})

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        info = self.info(name)
        shape = tuple(info.shape)
        if shape:
            stop = shape[0] if stop is None else min(stop, shape[0])
            shape = (max(0, stop - start), *shape[1:])
        return torch.full(shape, -0.0, dtype=info.dtype)

    def side_files(self) -> dict[str, bytes]:
        return {}


def exact_names(names: Sequence[str]) -> str:
    """A regex that selects exactly `names` (for a MergeConfig include)."""
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"
