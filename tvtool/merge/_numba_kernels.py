"""The numba-compiled kernels behind `tvtool.merge.kernels` (loaded on first use, see there)."""

from __future__ import annotations

import numba  # noqa: F401
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic


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

@njit(parallel=True, nogil=True, cache=True)
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



@njit(inline="always")
def _bf16_bad(u):  # bf16 bits → 1 if NaN or ±Inf (exponent all ones)
    return np.int64((u & np.uint16(0x7F80)) == np.uint16(0x7F80))



@njit(parallel=True, nogil=True, cache=True)
def _merge_pair_bf16(base, end, alphas, out):
    """base, end u16[n] (θ1, θ2 as bf16 bits), alphas f32[m] → out u16[m, n]: bf16_rne(b + α·(e − b)),
    with Δ = fl32(e − b) formed per element, never as an array. Returns the number of non-finite
    θ1, θ2, Δ and output values (the caller re-checks with `check_finite` if any)."""
    n = base.shape[0]
    m = alphas.shape[0]
    bad = 0
    for blk in prange((n + _BLOCK - 1) // _BLOCK):
        s, e = blk * _BLOCK, min(n, (blk + 1) * _BLOCK)
        b = np.empty(e - s, np.float32)
        d = np.empty(e - s, np.float32)
        nb = 0
        for i in range(e - s):
            ub = base[s + i]
            ue = end[s + i]
            di = _pair_delta(ub, ue)
            nb += _bf16_bad(ub) + _bf16_bad(ue) + np.int64(not (di - di == 0))  # NaN or ±Inf
            b[i] = _as_f32(np.uint32(ub) << np.uint32(16))
            d[i] = di
        for j in range(m):
            a = alphas[j]
            for i in range(e - s):
                r = _bf16_rne(b[i] + a * d[i])
                out[j, s + i] = r
                nb += _bf16_bad(r)
        bad += nb
    return bad



@njit(parallel=True, nogil=True, cache=True)
def _merge_f32_bf16(base, delta, alphas, out):  # base f32[n]
    n = base.shape[0]
    for blk in prange((n + _BLOCK - 1) // _BLOCK):
        s, e = blk * _BLOCK, min(n, (blk + 1) * _BLOCK)
        for j in range(alphas.shape[0]):
            a = alphas[j]
            for i in range(s, e):
                out[j, i] = _bf16_rne(base[i] + a * delta[i])



@njit(parallel=True, nogil=True, cache=True)
def _merge_f32_f32(base, delta, alphas, out):  # out f32[m, n]
    n = base.shape[0]
    for blk in prange((n + _BLOCK - 1) // _BLOCK):
        s, e = blk * _BLOCK, min(n, (blk + 1) * _BLOCK)
        for j in range(alphas.shape[0]):
            a = alphas[j]
            for i in range(s, e):
                out[j, i] = base[i] + a * delta[i]



@njit(nogil=True, cache=True)
def _hist_hi(x, hist):  # x f32[n] → hist[|x| bits >> 16] += 1
    for i in range(x.shape[0]):
        hist[(_as_u32(x[i]) & np.uint32(0x7FFFFFFF)) >> np.uint32(16)] += 1



@njit(nogil=True, cache=True)
def _hist_lo(x, slot_of, hists):  # hists[slot_of[hi], lo] += 1 for elements whose hi bin is a target
    for i in range(x.shape[0]):
        u = _as_u32(x[i]) & np.uint32(0x7FFFFFFF)
        s = slot_of[u >> np.uint32(16)]
        if s >= 0:
            hists[s, u & np.uint32(0xFFFF)] += 1



@njit(nogil=True, cache=True)
def _nth_equal(x, key, nth):  # flat position of the nth (0-based) element with |x| bits == key, or -1
    c = 0
    for i in range(x.shape[0]):
        if (_as_u32(x[i]) & np.uint32(0x7FFFFFFF)) == key:
            if c == nth:
                return i
            c += 1
    return -1



@njit(parallel=True, nogil=True, cache=True)
def _keep_by_cut(x, flat_start, key, last_tie, out):  # out[i] = |x| bits > key or (== key and index ≤ last_tie)
    for i in prange(x.shape[0]):
        u = np.int64(_as_u32(x[i]) & np.uint32(0x7FFFFFFF))
        out[i] = u > key or (u == key and flat_start + i <= last_tie)



_GOLDEN = np.uint64(0x9E3779B97F4A7C15)

@njit(inline="always")
def _splitmix64(z):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))



@njit(parallel=True, nogil=True, cache=True)
def _dare_keep(key, flat_start, drop_below, out):  # out[i] = splitmix64(key + (start+i+1)·φ) >> 11 ≥ drop_below
    for i in prange(out.shape[0]):
        z = _splitmix64(key + np.uint64(flat_start + i + 1) * _GOLDEN)
        out[i] = (z >> np.uint64(11)) >= drop_below


@njit(parallel=True, nogil=True, cache=True)
def _count_exp_all_ones(x, mask):  # x uint16[n] or uint32[n] bits → #elements whose exponent bits are all set
    c = 0
    for i in prange(x.shape[0]):
        c += (x[i] & mask) == mask
    return c


@njit(inline="always")
def _kept(d, key, last, flat):  # Δ·keep: keep iff |Δ| bits > key, or == key and flat index ≤ last (branch-free)
    u = np.int64(_as_u32(d) & np.uint32(0x7FFFFFFF))
    return d * np.float32((u > key) | ((u == key) & (flat <= last)))



@njit(inline="always")
def _select(d, mode, key, last, hkey, drop, omp, flat):  # mode 1: magnitude cut (_kept); 2: DARE drop and rescale
    if mode == 1:
        return _kept(d, key, last, flat)
    if mode == 2:  # = kernels.dare_keep's mask, then (Δ·keep).double() / (1 − p), rounded once
        k = (_splitmix64(hkey + np.uint64(flat + 1) * _GOLDEN) >> np.uint64(11)) >= drop
        return np.float32(np.float64(d * np.float32(k)) / omp)
    return d



@njit(parallel=True, nogil=True, cache=True)
def _combine(ds, w, keys, lasts, hkeys, drops, omps, flat_start, mode, consensus, normalized, sum_w, out):
    """M from Δ_v rows ds f32[n, N] in torch's order (tvtool.merge.operators.merged_delta): x_v = (Δ_v·keep_v)·w_v
    (keep_v: |Δ_v| bits > keys[v], or == and flat index ≤ lasts[v]); sums start at +0 and run v = 0..n−1;
    consensus: majority = ±1 by the sign of Σx, mask_v = sign(x_v) == majority, M = Σ x_v·mask_v over
    Σ w_v·mask_v (0 → 1); else M = Σ x_v over sum_w. normalized: divide, else M is the numerator."""
    n, N = ds.shape
    one, zero = np.float32(1.0), np.float32(0.0)
    for blk in prange((N + _BLOCK - 1) // _BLOCK):
        s, e = blk * _BLOCK, min(N, (blk + 1) * _BLOCK)
        acc = np.zeros(e - s, np.float32)
        for v in range(n):
            for i in range(s, e):
                d = _select(ds[v, i], mode, keys[v], lasts[v], hkeys[v], drops[v], omps[v], flat_start + i)
                acc[i - s] += d * w[v]
        if not consensus:
            for i in range(s, e):
                out[i] = acc[i - s] / sum_w if normalized else acc[i - s]
            continue
        mixed = np.zeros(e - s, np.float32)
        div = np.zeros(e - s, np.float32)
        for v in range(n):
            for i in range(s, e):
                d = _select(ds[v, i], mode, keys[v], lasts[v], hkeys[v], drops[v], omps[v], flat_start + i)
                x = d * w[v]
                maj = np.float32(acc[i - s] >= zero) * np.float32(2.0) - one
                m = np.float32((np.float32(x > zero) - np.float32(x < zero)) == maj)
                mixed[i - s] += x * m
                div[i - s] += w[v] * m
        for i in range(s, e):
            dv = div[i - s] + np.float32(div[i - s] == zero)  # 0 → 1 (exact: 0 + 1)
            out[i] = mixed[i - s] / dv if normalized else mixed[i - s]


@njit(inline="always")
def _pair_delta(b, e):  # bf16 bits θ1, θ2 → fl32(θ2 − θ1), as torch's `θ2.float() − θ1.float()`
    return _as_f32(np.uint32(e) << np.uint32(16)) - _as_f32(np.uint32(b) << np.uint32(16))



@njit(nogil=True, cache=True)
def _hist_hi_pair(b, e, hist):  # _hist_hi of Δ = θ2 − θ1 formed per element from bf16 bits
    for i in range(b.shape[0]):
        hist[(_as_u32(_pair_delta(b[i], e[i])) & np.uint32(0x7FFFFFFF)) >> np.uint32(16)] += 1



@njit(nogil=True, cache=True)
def _hist_lo_pair(b, e, slot_of, hists):
    for i in range(b.shape[0]):
        u = _as_u32(_pair_delta(b[i], e[i])) & np.uint32(0x7FFFFFFF)
        s = slot_of[u >> np.uint32(16)]
        if s >= 0:
            hists[s, u & np.uint32(0xFFFF)] += 1


@njit(parallel=True, nogil=True, cache=True)
def _pair_bad(b, e):  # #elements where θ1, θ2 (bf16 bits) or Δ = θ2 − θ1 is NaN/±Inf
    c = 0
    for i in prange(b.shape[0]):
        d = _pair_delta(b[i], e[i])
        c += _bf16_bad(b[i]) | _bf16_bad(e[i]) | np.int64(not (d - d == 0))
    return c



@njit(parallel=True, nogil=True, cache=True)
def _combine_pair(b, e, w, key, last, hkey, drop, omp, flat_start, mode, consensus, normalized, sum_w, out):
    """_combine for one task vector whose Δ is formed per element from bf16 θ1/θ2 bits (same order)."""
    one, zero = np.float32(1.0), np.float32(0.0)
    for i in prange(b.shape[0]):
        d = _select(_pair_delta(b[i], e[i]), mode, key, last, hkey, drop, omp, flat_start + i)
        x = d * w
        acc = zero + x
        if consensus:
            maj = np.float32(acc >= zero) * np.float32(2.0) - one
            m = np.float32((np.float32(x > zero) - np.float32(x < zero)) == maj)
            mixed = zero + x * m
            div = zero + w * m
            div = div + np.float32(div == zero)
            out[i] = mixed / div if normalized else mixed
        else:
            out[i] = acc / sum_w if normalized else acc
