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

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic

N_BINS = 1 << 16  # radix select: 16 high bits, then 16 low bits of |x| as uint32


@intrinsic
def _as_f32(typingctx, x):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _as_u32(typingctx, x):
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@njit(inline="always")
def _bf16_rne(s):  # float32 → bf16 bits, round to nearest even; NaN → 0xFFFF (branch-free, vectorises)
    u = _as_u32(s)
    r = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    return r if s == s else np.uint16(0xFFFF)


_BLOCK = 4096  # elements per parallel work item; the inner loops over it are contiguous (SIMD)


@njit(parallel=True, cache=True)
def _merge_bf16_bf16(base, delta, alphas, out):  # base u16[n], delta f32[n], alphas f32[m] → out u16[m, n]
    n = base.shape[0]
    for blk in prange((n + _BLOCK - 1) // _BLOCK):
        s, e = blk * _BLOCK, min(n, (blk + 1) * _BLOCK)
        b = np.empty(e - s, np.float32)
        for i in range(e - s):
            b[i] = _as_f32(np.uint32(base[s + i]) << np.uint32(16))
        for j in range(alphas.shape[0]):
            a = alphas[j]
            for i in range(e - s):
                out[j, s + i] = _bf16_rne(b[i] + a * delta[s + i])


@njit(parallel=True, cache=True)
def _merge_f32_bf16(base, delta, alphas, out):  # base f32[n]
    n = base.shape[0]
    for blk in prange((n + _BLOCK - 1) // _BLOCK):
        s, e = blk * _BLOCK, min(n, (blk + 1) * _BLOCK)
        for j in range(alphas.shape[0]):
            a = alphas[j]
            for i in range(s, e):
                out[j, i] = _bf16_rne(base[i] + a * delta[i])


@njit(parallel=True, cache=True)
def _merge_f32_f32(base, delta, alphas, out):  # out f32[m, n]
    n = base.shape[0]
    for blk in prange((n + _BLOCK - 1) // _BLOCK):
        s, e = blk * _BLOCK, min(n, (blk + 1) * _BLOCK)
        for j in range(alphas.shape[0]):
            a = alphas[j]
            for i in range(s, e):
                out[j, i] = base[i] + a * delta[i]


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
    out = torch.empty((len(todo), b.numel()), dtype=dtype)
    with np.errstate(over="ignore"):  # |α| past float32: inf, as torch gives; the output check names it
        al = np.asarray(todo, dtype=np.float32)  # torch casts a Python scalar α to float32 first
    if base.dtype == torch.bfloat16:
        _merge_bf16_bf16(b.view(torch.int16).numpy().view(np.uint16), d, al, out.view(torch.int16).numpy().view(np.uint16))
    elif dtype == torch.bfloat16:
        _merge_f32_bf16(b.numpy(), d, al, out.view(torch.int16).numpy().view(np.uint16))
    else:
        _merge_f32_f32(b.numpy(), d, al, out.numpy())
    return {a: out[j].view(base.shape) for j, a in enumerate(todo)}


# -- magnitude histograms for the streaming radix select ---------------------------------
@njit(cache=True)
def _hist_hi(x, hist):  # x f32[n] → hist[|x| bits >> 16] += 1
    for i in range(x.shape[0]):
        hist[(_as_u32(x[i]) & np.uint32(0x7FFFFFFF)) >> np.uint32(16)] += 1


@njit(cache=True)
def _hist_lo(x, slot_of, hists):  # hists[slot_of[hi], lo] += 1 for elements whose hi bin is a target
    for i in range(x.shape[0]):
        u = _as_u32(x[i]) & np.uint32(0x7FFFFFFF)
        s = slot_of[u >> np.uint32(16)]
        if s >= 0:
            hists[s, u & np.uint32(0xFFFF)] += 1


@njit(cache=True)
def _nth_equal(x, key, nth):  # flat position of the nth (0-based) element with |x| bits == key, or -1
    c = 0
    for i in range(x.shape[0]):
        if (_as_u32(x[i]) & np.uint32(0x7FFFFFFF)) == key:
            if c == nth:
                return i
            c += 1
    return -1


@njit(parallel=True, cache=True)
def _keep_by_cut(x, flat_start, key, last_tie, out):  # out[i] = |x| bits > key or (== key and index ≤ last_tie)
    for i in prange(x.shape[0]):
        u = np.int64(_as_u32(x[i]) & np.uint32(0x7FFFFFFF))
        out[i] = u > key or (u == key and flat_start + i <= last_tie)


def hist_hi(x: torch.Tensor, hist: np.ndarray) -> None:
    _hist_hi(x.contiguous().reshape(-1).numpy(), hist)


def hist_lo(x: torch.Tensor, slot_of: np.ndarray, hists: np.ndarray) -> None:
    _hist_lo(x.contiguous().reshape(-1).numpy(), slot_of, hists)


def nth_equal(x: torch.Tensor, key: int, nth: int) -> int:
    return int(_nth_equal(x.contiguous().reshape(-1).numpy(), np.uint32(key), nth))


def keep_by_cut(x: torch.Tensor, flat_start: int, key: int, last_tie: int) -> torch.Tensor:
    out = np.empty(x.numel(), dtype=np.bool_)
    _keep_by_cut(x.contiguous().reshape(-1).numpy(), flat_start, key, last_tie, out)
    return torch.from_numpy(out).view(x.shape)


# -- DARE: a counter-based hash of (seed, tensor name, flat element index) -----------------
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@njit(inline="always")
def _splitmix64(z):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(parallel=True, cache=True)
def _dare_keep(key, flat_start, drop_below, out):  # out[i] = splitmix64(key + (start+i+1)·φ) >> 11 ≥ drop_below
    for i in prange(out.shape[0]):
        z = _splitmix64(key + np.uint64(flat_start + i + 1) * _GOLDEN)
        out[i] = (z >> np.uint64(11)) >= drop_below


def tensor_key(seed: int, name: str) -> int:
    """The 64-bit stream key of one tensor: splitmix64(seed ⊕ blake2b-64(name)), stable across processes."""
    h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    z = (int(seed) ^ h) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def dare_keep(*, seed: int, name: str, p: float, flat_start: int, shape) -> torch.Tensor:
    """Bool keep-mask of the elements [flat_start, flat_start + numel(shape)) of tensor `name`.

    Element e (flat row-major index in the whole tensor) is dropped iff
    splitmix64(key + (e+1)·0x9E3779B97F4A7C15) >> 11 < ⌊p·2⁵³⌋: P(drop) = p to 2⁻⁵³, and the
    mask depends only on (seed, name, e), never on chunking, process or worker.
    """
    n = int(np.prod(shape)) if len(shape) else 1
    out = np.empty(n, dtype=np.bool_)
    _dare_keep(np.uint64(tensor_key(seed, name)), flat_start, np.uint64(int(p * 2.0**53)), out)
    return torch.from_numpy(out).view(tuple(shape))


numba_threads = numba.get_num_threads
