"""Fused per-chunk kernels (numba): many-α merge, magnitude histograms, the DARE hash mask.

Why numba and not torch: `(θ1.float() + α·Δ).to(bfloat16)` in torch makes three float32
temporaries per α (α·Δ, the sum, and the rounding input); on 2 AVX2 cores without bf16
instructions that arithmetic, not I/O, set the many-α pass at 1.7–1.9× the copy floor
(BENCHMARKS.md). The fused kernel reads θ1 and Δ once per element and writes every α's
rounded value, converting bf16 ↔ fp32 by bit shifts. It reproduces torch's float32 order
bit for bit: step = fl32(fl32(α)·Δ), s = fl32(θ1 + step), out = bf16_rne(s), NaN → 0xFFFF
(what torch's vectorised conversion writes). tests/test_kernels.py checks this on random
data, subnormals, ±0, ±inf, NaN and round-half-even cases.
"""

from __future__ import annotations

import hashlib
import os

import functools
import importlib

import numpy as np
import torch

from tvtool.io.finite import count_nonfinite as count_nonfinite_bits
from tvtool.io.buffers import empty

N_BINS = 1 << 16  # radix select: 16 high bits, then 16 low bits of |x| as uint32


@functools.cache
def _nk():
    """The compiled kernels (`tvtool.merge._numba_kernels`), imported on first use, not at import.

    Measured reason: a vLLM CPU worker that has llvmlite loaded when it starts fails in
    `register_triton_kernel_overrides` ("'_lib_fn_wrapper' object has no attribute 'get'": vLLM
    scans every loaded module's objects). `tvtool` run as a console script is re-imported by
    each spawned vLLM process, so numba must not be loaded by importing tvtool.
    """
    return importlib.import_module("tvtool.merge._numba_kernels")


_FUSED = os.environ.get("TVTOOL_FUSED", "1") != "0"  # 0: torch arithmetic (benchmark comparison only)


def merge_rows(base: torch.Tensor, delta: torch.Tensor | None, alpha: float, dtype: torch.dtype, *,
               base32: torch.Tensor | None = None) -> torch.Tensor:
    """θ1 + α·Δ in float32 (α·Δ rounded, then added), rounded once to `dtype`; rows past Δ's stay θ1.

    The torch reference of the fused kernel. `base32` is `base.float()` when the caller already
    has it (shared across many α).
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


def merge_many(*, base: torch.Tensor, delta: torch.Tensor | None, alphas, dtype: torch.dtype,
               base32: torch.Tensor | None = None) -> list[torch.Tensor]:
    """[θ1 + α·Δ rounded once to `dtype` for α in `alphas`]: the fused kernel where it applies,
    `merge_rows` elsewhere; bit-identical to `merge_rows` per α either way."""
    alphas = [float(a) for a in alphas]
    res = fused_merge(base=base, delta=delta, alphas=alphas, dtype=dtype)
    return [res[a] if a in res else merge_rows(base, delta, a, dtype, base32=base32) for a in alphas]


def fused_merge(*, base: torch.Tensor, delta: torch.Tensor | None, alphas, dtype: torch.dtype
                ) -> dict[float, torch.Tensor]:
    """{α: θ1 + α·Δ rounded once to `dtype`} for the α this kernel fuses (bit-identical to
    `merge_rows`); α it does not fuse (0, other dtypes or shapes) are left out, and
    `merge_many` computes those with torch.

    base: θ1 rows as stored [rows, ...]; delta: float32 Δ rows (same shape) or None.
    """
    fused = (_FUSED and delta is not None and delta.shape == base.shape and delta.dtype == torch.float32
             and base.dtype in (torch.bfloat16, torch.float32) and dtype in (torch.bfloat16, torch.float32)
             and not (base.dtype == torch.bfloat16 and dtype == torch.float32))
    todo = list(dict.fromkeys(float(a) for a in alphas if a != 0.0)) if fused else []
    if not todo:
        return {}
    b = base.contiguous().reshape(-1)
    d = delta.contiguous().reshape(-1).numpy()
    out = empty((len(todo), b.numel()), dtype)
    with np.errstate(over="ignore"):  # |α| past float32: inf, as torch gives; the output check names it
        al = np.asarray(todo, dtype=np.float32)  # torch casts a Python scalar α to float32 first
    if base.dtype == torch.bfloat16:
        _nk()._merge_bf16_bf16(b.view(torch.int16).numpy().view(np.uint16), d, al, out.view(torch.int16).numpy().view(np.uint16))
    elif dtype == torch.bfloat16:
        _nk()._merge_f32_bf16(b.numpy(), d, al, out.view(torch.int16).numpy().view(np.uint16))
    else:
        _nk()._merge_f32_f32(b.numpy(), d, al, out.numpy())
    return {a: out[j].view(base.shape) for j, a in enumerate(todo)}


def fused_pair(*, base: torch.Tensor, end: torch.Tensor, alphas, dtype: torch.dtype) -> list[torch.Tensor] | None:
    """[bf16(θ1 + α·(θ2 − θ1)) for α in `alphas`] from bf16 θ1 and θ2 rows, with no float32 array
    at all (Δ is formed per element); bit-identical to `merge_rows(θ1, θ2.float() − θ1.float(), α)`.

    Why: the float32 θ1 and Δ rows (6 bytes per element per input byte pair) and the separate
    non-finite scans cost more than the arithmetic on 2 cores (page faults of fresh buffers and
    four torch passes; BENCHMARKS.md). None where it does not apply (other dtypes, no numba
    fusion) or where any θ1, θ2, Δ or output value is not finite: the caller then forms Δ and
    takes the checked path, which names the first bad element.
    """
    if not (_FUSED and base.dtype == end.dtype == dtype == torch.bfloat16 and base.shape == end.shape):
        return None
    alphas = [float(a) for a in alphas]
    b = base.contiguous().reshape(-1).view(torch.int16).numpy().view(np.uint16)
    e = end.contiguous().reshape(-1).view(torch.int16).numpy().view(np.uint16)
    out = empty((len(alphas), b.size), dtype)
    with np.errstate(over="ignore"):
        al = np.asarray(alphas, dtype=np.float32)
    if _nk()._merge_pair_bf16(b, e, al, out.view(torch.int16).numpy().view(np.uint16)):
        return None
    return [out[j].view(base.shape) for j in range(len(alphas))]


def count_nonfinite(x: "torch.Tensor | PairRows") -> int | None:
    """#NaN/±Inf elements by one pass over the bits (`tvtool.io.finite.count_nonfinite`); for a `PairRows`,
    of θ1, θ2 and Δ = θ2 − θ1 together."""
    if isinstance(x, PairRows):  # θ1, θ2 and Δ = θ2 − θ1
        return int(_nk()._pair_bad(*x.bits()))
    return count_nonfinite_bits(x)


def combine(*, deltas: list, weights, cuts=None, dare=None, flat_start: int, consensus: bool,
            normalized: bool) -> torch.Tensor | None:
    """`operators.merged_delta` for task arithmetic, trim, TIES, DARE and DARE-TIES in one pass per
    element, bit for bit (tests/test_operators.py): no mask, sign or product temporaries. Measured
    reason: the torch expression makes ~12 full-size temporaries per chunk (float64 ones for DARE); on
    the 2.5 GB pair it was the largest compute cost of TIES after the non-finite scans. `cuts`: one
    `select.Cut` per vector (trim); `dare`: (tensor_key, ⌊p·2⁵³⌋, 1 − p) per vector; neither: no
    selection. `deltas`: float32 Δ_i rows, or one `PairRows`. None where it does not apply."""
    n = len(deltas)
    mode = 1 if cuts is not None else 2 if dare is not None else 0
    keys = np.asarray([c.key for c in cuts] if cuts else [-1] * n, dtype=np.int64)
    lasts = np.asarray([c.last_tie for c in cuts] if cuts else [-1] * n, dtype=np.int64)
    hkeys = np.asarray([d[0] for d in dare] if dare else [0] * n, dtype=np.uint64)
    drops = np.asarray([d[1] for d in dare] if dare else [0] * n, dtype=np.uint64)
    omps = np.asarray([d[2] for d in dare] if dare else [1.0] * n, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float32)
    sum_w = np.float32(0)
    for x in w:  # torch: weights.sum(dim=0) from +0, then |Σw| < 1e-8 → 1
        sum_w = np.float32(sum_w + x)
    sum_w = np.float32(1) if abs(sum_w) < 1e-8 else sum_w
    if n == 1 and isinstance(deltas[0], PairRows):  # Δ formed per element from θ1/θ2 rows
        pr = deltas[0]
        out = empty(tuple(pr.base.shape), torch.float32)
        _nk()._combine_pair(*pr.bits(), w[0], keys[0], lasts[0], hkeys[0], drops[0], omps[0], np.int64(flat_start),
                            mode, consensus, normalized, sum_w, out.view(-1).numpy())
        return out
    if not _FUSED or any(isinstance(d, PairRows) or d.dtype != torch.float32 or d.shape != deltas[0].shape
                         for d in deltas):
        return None
    shape = deltas[0].shape
    ds = deltas[0].contiguous().reshape(1, -1) if n == 1 else \
        torch.stack([d.reshape(-1) for d in deltas], out=empty((n, deltas[0].numel()), torch.float32))
    out = empty((ds.shape[1],), torch.float32)
    _nk()._combine(ds.numpy(), w, keys, lasts, hkeys, drops, omps, np.int64(flat_start), mode, consensus, normalized,
                   sum_w, out.numpy())
    return out.view(shape)


# -- magnitude histograms for the streaming radix select ---------------------------------


class PairRows:
    """Δ rows as the bf16 θ1 and θ2 rows they come from (Δ = θ2.float() − θ1.float(), formed per element by
    the histogram kernels). Measured reason: a trim's two selection passes spent more time converting θ1
    and Δ to float32 arrays than histogramming them (2.5 GB pair, TIES at 5 α)."""

    def __init__(self, base: torch.Tensor, end: torch.Tensor):
        self.base, self.end = base, end

    def bits(self) -> tuple[np.ndarray, np.ndarray]:
        u16 = lambda t: t.contiguous().reshape(-1).view(torch.int16).numpy().view(np.uint16)  # noqa: E731
        return u16(self.base), u16(self.end)

    def delta(self) -> torch.Tensor:
        return self.end.float() - self.base.float()


def pair_rows(base: torch.Tensor, end: torch.Tensor) -> PairRows | None:
    """PairRows for bf16 θ1/θ2 rows of one shape (the fused selection passes), else None."""
    ok = _FUSED and base.dtype == end.dtype == torch.bfloat16 and base.shape == end.shape
    return PairRows(base, end) if ok else None


def hist_hi(x: torch.Tensor | PairRows, hist: np.ndarray) -> None:
    if isinstance(x, PairRows):
        return _nk()._hist_hi_pair(*x.bits(), hist)
    _nk()._hist_hi(x.contiguous().reshape(-1).numpy(), hist)


def hist_lo(x: torch.Tensor | PairRows, slot_of: np.ndarray, hists: np.ndarray) -> None:
    if isinstance(x, PairRows):
        return _nk()._hist_lo_pair(*x.bits(), slot_of, hists)
    _nk()._hist_lo(x.contiguous().reshape(-1).numpy(), slot_of, hists)


def nth_equal(x: torch.Tensor | PairRows, key: int, nth: int) -> int:
    x = x.delta() if isinstance(x, PairRows) else x  # one chunk, once per cut at most
    return int(_nk()._nth_equal(x.contiguous().reshape(-1).numpy(), np.uint32(key), nth))


def keep_by_cut(x: torch.Tensor, flat_start: int, key: int, last_tie: int) -> torch.Tensor:
    out = np.empty(x.numel(), dtype=np.bool_)
    _nk()._keep_by_cut(x.contiguous().reshape(-1).numpy(), flat_start, key, last_tie, out)
    return torch.from_numpy(out).view(x.shape)


# -- DARE: a counter-based hash of (seed, tensor name, flat element index) -----------------


def tensor_key(seed: int, name: str, *, vector: int = 0) -> int:
    """The 64-bit stream key of one tensor: splitmix64(seed ⊕ blake2b-64(name)), stable across processes.
    Task vector `vector` > 0 hashes 'vector:name': each vector draws its own mask (as mergekit's do), and
    one vector's mask is the same as with a single vector."""
    text = name if vector == 0 else f"{vector}:{name}"
    h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    z = (int(seed) ^ h) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def dare_keep(*, seed: int, name: str, p: float, flat_start: int, shape, vector: int = 0) -> torch.Tensor:
    """Bool keep-mask of the elements [flat_start, flat_start + numel(shape)) of tensor `name` (task vector
    `vector`, see `tensor_key`).

    Element e (flat row-major index in the whole tensor) is dropped iff
    splitmix64(key + (e+1)·0x9E3779B97F4A7C15) >> 11 < ⌊p·2⁵³⌋: P(drop) = p to 2⁻⁵³, and the
    mask depends only on (seed, name, vector, e), never on chunking, process or worker.
    """
    n = int(np.prod(shape)) if len(shape) else 1
    out = np.empty(n, dtype=np.bool_)
    _nk()._dare_keep(np.uint64(tensor_key(seed, name, vector=vector)), flat_start, np.uint64(int(p * 2.0**53)), out)
    return torch.from_numpy(out).view(tuple(shape))


def numba_threads() -> int:
    return _nk().numba.get_num_threads()
