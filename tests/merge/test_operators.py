"""Operators against independent references: float64/numpy sorts, a numpy splitmix64, torch's rounding."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import bits
from tvtool.merge import kernels
from tvtool.errors import MismatchError, OptionsError
from tvtool.merge.config import MergeConfig
from tvtool.merge.kernels import merge_rows
from tvtool.merge.merged import dare, merge, trim
from tvtool.merge.prepare import prepare
from tvtool.merge.registry import Rows, TensorInfo, operators, users
from tvtool.merge.stream import _merge_one
from tvtool.merge.topk import top_cuts
from tvtool.vectors.taskvector import TaskVector


def _prepared(c: MergeConfig, ds: list[torch.Tensor], ranges, name: str = "w"):
    """The operator of `c` and its state over the tensor whose Δ_i are `ds` (read in `ranges`)."""
    op = c.operator
    prep = prepare([op], tensor=TensorInfo(name, tuple(ds[0].shape), len(ds)), ranges=ranges,
                   read=lambda s, e: Rows(None, [d[s:e] for d in ds], start=s))
    return op, prep


def _m(op, prep, ds: list[torch.Tensor], s: int, e: int) -> torch.Tensor:
    """M for rows [s, e) (the operator's per-chunk math)."""
    return op.merged(prep.states[op], Rows(None, [d[s:e] for d in ds], start=s), prep.tensor)


# -- the fused many-α kernel equals torch's merge_rows bit for bit --------------------------
def _specials(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 base and Δ with normal values, subnormals, ±0, ±inf, NaN, huge values, and bf16 half-way sums."""
    base = torch.randn(n, generator=g) * 0.02
    delta = torch.randn(n, generator=g) * 1e-3
    sp = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-41, 3.3e38, -3.3e38, 1.0])
    base[: len(sp)] = sp
    delta[len(sp): 2 * len(sp)] = sp
    # exact ties: 1 + 2^-8 is half-way between two bf16 neighbours of 1.0 (round to even: 1.0);
    # 1 + 3·2^-8 is half-way too (rounds up to 1 + 2^-6·...); subnormal halves as well
    base[20:24] = torch.tensor([1.0, 1.0, 2.0 ** -130, -1.0])
    delta[20:24] = torch.tensor([2.0 ** -8, 3 * 2.0 ** -8, 2.0 ** -138, -(2.0 ** -8)])
    # random half-way cases: sums whose low 16 bits are 0x8000
    tie = (torch.randint(0, 1 << 15, (1000,), generator=g, dtype=torch.int32) << 16 | 0x8000).view(torch.float32)
    base[30:1030], delta[30:1030] = tie, 0.0
    return base, delta


@pytest.mark.parametrize("base_dtype,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                                  (torch.float32, torch.float32), (torch.bfloat16, torch.float16)])
def test_merge_many_is_bit_identical_to_torch(base_dtype, out_dtype):
    g = torch.Generator().manual_seed(0)
    base32, delta = _specials(100_003, g)
    base = base32.to(base_dtype)
    delta[30:1030] = base32[30:1030] - base[30:1030].float()  # exact: at α = 1 the sum is the half-way value
    alphas = [0.0, 1.0, 0.6, -0.5, 1e-30, 2.5, 3.0e30, -0.0]
    got = kernels.merge_many(base=base.view(-1, 1), delta=delta.view(-1, 1), alphas=alphas, dtype=out_dtype)
    n_half = 0
    for a, x in zip(alphas, got):
        ref = merge_rows(base.view(-1, 1), delta.view(-1, 1), a, out_dtype)
        assert x.dtype == out_dtype and x.shape == ref.shape
        assert torch.equal(bits(x), bits(ref)), f"α={a}: {(bits(x) != bits(ref)).sum()} elements differ"
        s = (base.float() + torch.mul(delta, a)) if a else base.float()
        n_half += int(((s.view(torch.int32) & 0xFFFF) == 0x8000).sum())
    assert n_half > 1000 or out_dtype != torch.bfloat16  # the round-half-to-even path was exercised
    assert torch.isnan(got[1].float()).any() and torch.isinf(got[1].float()).any()


def test_fused_pair_is_bit_identical_to_torch_and_refuses_non_finite():
    """The pair kernel (θ1, θ2 bf16 → every α, Δ formed per element) equals merge_rows(θ1, θ2 − θ1, α)."""
    g = torch.Generator().manual_seed(1)
    base = (torch.randn(70_000, generator=g) * 0.02).to(torch.bfloat16)
    end = (base.float() + torch.randn(70_000, generator=g) * 1e-3).to(torch.bfloat16)
    base[:6] = torch.tensor([0.0, -0.0, 1e-40, -1e-39, 3.3e38, 1.0]).to(torch.bfloat16)
    end[:6] = torch.tensor([-0.0, 0.0, -1e-40, 2e-39, -3.3e38, 1.0 + 2 ** -7]).to(torch.bfloat16)
    alphas = [0.2, 0.6, -0.5, 1.2, 2.5, 1e-30]
    delta = end.float() - base.float()
    got = kernels.fused_pair(base=base.view(-1, 7), end=end.view(-1, 7), alphas=alphas[:5] + [0.7], dtype=torch.bfloat16)
    assert got is None  # 3.3e38 − (−3.3e38) overflows fp32 in Δ: the caller takes the checked path
    end[4] = 3.2e38  # Δ ≈ −1e37: finite, and every output too
    got = kernels.fused_pair(base=base.view(-1, 7), end=end.view(-1, 7), alphas=alphas, dtype=torch.bfloat16)
    delta = end.float() - base.float()
    n_half = 0
    for a, x in zip(alphas, got):
        ref = merge_rows(base.view(-1, 7), delta.view(-1, 7), a, torch.bfloat16)
        assert x.shape == (10_000, 7) and torch.equal(bits(x), bits(ref)), a
        n_half += int((((base.float() + delta * a).view(torch.int32) & 0xFFFF) == 0x8000).sum())
    assert n_half > 0
    for bad in (float("nan"), float("inf")):  # a non-finite θ1 or θ2, or an overflowing output: None
        b2 = base.clone()
        b2[12345] = bad
        assert kernels.fused_pair(base=b2, end=end, alphas=[0.5], dtype=torch.bfloat16) is None
        assert kernels.fused_pair(base=end, end=b2, alphas=[0.5], dtype=torch.bfloat16) is None
    assert kernels.fused_pair(base=base, end=end, alphas=[1e38], dtype=torch.bfloat16) is None
    assert kernels.fused_pair(base=base, end=end, alphas=[], dtype=torch.bfloat16) == []
    assert kernels.fused_pair(base=base.float(), end=end.float(), alphas=[0.5], dtype=torch.float32) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_count_nonfinite_equals_torch(dtype):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(300_001, generator=g) * 100).to(dtype)
    assert kernels.count_nonfinite(x) == 0
    big = torch.finfo(dtype).max
    x[[3, 99, 1000, 300_000]] = torch.tensor([float("nan"), float("inf"), -float("inf"), big]).to(dtype)
    x[17] = torch.finfo(dtype).tiny / 4  # subnormal: finite
    assert kernels.count_nonfinite(x) == int((~torch.isfinite(x)).sum()) == 3
    assert kernels.count_nonfinite(x.view(-1, 1)[::2]) is None  # not contiguous: the torch path decides


@pytest.mark.parametrize("method,weights,normalize", [
    ("ties", (1.0,), None), ("ties", (0.8, 0.5), None), ("ties", (0.5, 0.5), None), ("ties", (0.7, -0.4, 1.3), None), ("ties", (0.6, 0.9), False),
    ("trim", (1.0,), None), ("trim", (0.5, 0.25), True), ("task_arithmetic", (0.7, -0.35), None),
    ("task_arithmetic", (0.3, 0.3, 0.4), True), ("dare_linear", (1.0,), None), ("dare_linear", (0.7, 0.5), None),
    ("dare_ties", (0.5, 0.5), None), ("dare_ties", (0.8, -0.3, 0.6), True)])
def test_fused_combine_equals_the_torch_expression(monkeypatch, method, weights, normalize):
    """merged_delta through kernels.combine equals the torch expression (mergekit's order) bit for bit,
    chunk by chunk, with ±0, ties at the magnitude cut and sign conflicts."""
    n, shape = len(weights), (300, 67)
    g = torch.Generator().manual_seed(n)
    ds = [torch.randn(shape, generator=g) * 1e-3 for _ in range(n)]
    for v, d in enumerate(ds):
        d.view(-1)[:: 7 + v] = d.abs().quantile(0.7)  # many elements tied at the density-0.3 cut
        d.view(-1)[5:40] = 0.0
        d.view(-1)[40:60] = -0.0
    ds[-1].view(-1)[100:200] = torch.linspace(-1, 1, 100)  # kept (large), and
    ds[0].view(-1)[100:200] = -ds[-1].view(-1)[100:200]  # exact sign conflicts: Σ = 0 for equal weights
    dare = method.startswith("dare")
    kw = dict(p=(0.4, 0.0, 0.7)[:n] if n > 1 else 0.4, seed=5) if dare else \
        dict(density=0.3) if method in ("ties", "trim") else {}
    c = MergeConfig(1.0, method=method, weights=weights, normalize=normalize, **kw)
    ranges = [(0, 64), (64, 200), (200, 300)]
    m, prep = _prepared(c, ds, ranges)
    got = [_m(m, prep, ds, s, e) for s, e in ranges]
    calls = []
    monkeypatch.setattr(kernels, "combine", lambda **kw: calls.append(1))  # → None: the torch expression
    ref = [_m(m, prep, ds, s, e) for s, e in ranges]
    assert len(calls) == len(ranges)
    for a, b in zip(got, ref):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"{(a.view(torch.int32) != b.view(torch.int32)).sum()}"
    numel = shape[0] * shape[1]
    assert method in ("ties", "trim") or prep.states[m] is None  # no selection pass
    assert method not in ("ties", "trim") or all(0 <= a.last_tie < numel for a, _ in prep.states[m])  # cut inside ties


# -- exact streaming top-k ------------------------------------------------------------------
def _stream_keep(x: torch.Tensor, ks, rows_per: int) -> list[torch.Tensor]:
    rows = x.shape[0]
    ranges = [(s, min(s + rows_per, rows)) for s in range(0, rows, rows_per)]
    cuts = top_cuts(ks=[ks], numel=x.numel(), ranges=ranges, row_size=x[0].numel(),
                    read=lambda s, e: [x[s:e]])[0]
    return [torch.cat([c.keep(x[s:e], s * x[0].numel()) for s, e in ranges]).reshape(-1) for c in cuts]


@pytest.mark.parametrize("rows_per", [300, 41, 1])
def test_top_k_equals_a_stable_float64_sort_with_ties_in_index_order(rows_per):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-40, 41, (300, 50), generator=g).float() * 0.25  # ~80 distinct values: many ties
    x[0, 0], x[5, 7] = float("nan"), -float("inf")
    ks = [1, 2, 17, 3000, 7499, 14999, 15000, 20000]
    mag = np.abs(x.double().numpy().ravel())
    nan = np.isnan(mag)  # NaN ranks above +inf, as in torch's descending sort
    order = np.lexsort((np.arange(mag.size), -np.nan_to_num(mag, nan=0.0, posinf=np.inf), ~nan))
    for k, keep in zip(ks, _stream_keep(x, ks, rows_per)):
        ref = np.zeros(mag.size, bool)
        ref[order[: min(k, mag.size)]] = True
        assert int(keep.sum()) == min(k, mag.size)
        assert np.array_equal(keep.numpy(), ref), k


def test_top_k_reads_two_passes_plus_one_chunk():
    x = torch.randint(-5, 6, (100, 10)).float()
    reads = []

    def read(s, e):
        reads.append((s, e))
        return [x[s:e]]

    top_cuts(ks=[[333]], numel=1000, ranges=[(s, s + 10) for s in range(0, 100, 10)], row_size=10, read=read)
    assert len(reads) == 21  # two passes of 10 chunks and the chunk where the tie cut lies
    reads.clear()
    top_cuts(ks=[[333]], numel=1000, ranges=[(0, 100)], row_size=10, read=read)
    assert len(reads) == 1  # a tensor in one chunk is read once


def test_breadcrumbs_keeps_the_float64_reference_set():
    g = torch.Generator().manual_seed(2)
    sign = torch.randint(0, 2, (257 * 33,), generator=g) * 2 - 1
    d = ((torch.randperm(257 * 33, generator=g) + 1).double() * 1.37e-3 * sign).float().view(257, 33)
    assert torch.unique(d.abs()).numel() == d.numel()  # no ties
    beta, gamma = 0.013, 0.29
    ranges = [(s, min(s + 20, 257)) for s in range(0, 257, 20)]
    m, prep = _prepared(MergeConfig(1.0, method="breadcrumbs", beta=beta, gamma=gamma), [d], ranges)
    got = torch.cat([_m(m, prep, [d], s, e) for s, e in ranges])
    a = np.abs(d.double().numpy().ravel())
    order = np.argsort(-a)
    n = a.size
    ref = np.zeros(n, bool)
    ref[order[int(beta * n): n - int(gamma * n)]] = True
    assert np.array_equal((got != 0).numpy().ravel(), ref)
    assert torch.equal(got.reshape(-1)[torch.from_numpy(ref)], d.reshape(-1)[torch.from_numpy(ref)])


# -- DARE: the hash mask -------------------------------------------------------------------
def _numpy_mask(seed: int, name: str, p: float, n: int) -> np.ndarray:
    """The documented hash, written independently in numpy uint64 arithmetic."""
    with np.errstate(over="ignore"):
        h = np.uint64(int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little"))

        def mix(z):
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            return z ^ (z >> np.uint64(31))

        key = mix(np.uint64(seed) ^ h)
        z = mix(key + (np.arange(n, dtype=np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15))
        return (z >> np.uint64(11)) >= np.uint64(int(p * 2.0 ** 53))


def test_dare_mask_is_the_documented_hash_and_independent_of_chunking():
    shape, p = (300, 70), 0.9
    ref = _numpy_mask(5, "model.layers.0.mlp.up_proj.weight", p, 300 * 70).reshape(shape)
    for rows_per in (300, 7, 1):
        got = torch.cat([kernels.dare_keep(seed=5, name="model.layers.0.mlp.up_proj.weight", p=p,
                                           flat_start=s * 70, shape=(min(s + rows_per, 300) - s, 70))
                         for s in range(0, 300, rows_per)])
        assert np.array_equal(got.numpy(), ref)
    other = kernels.dare_keep(seed=6, name="model.layers.0.mlp.up_proj.weight", p=p, flat_start=0, shape=shape)
    assert (other.numpy() != ref).mean() > 0.1
    n = ref.size  # kept fraction within 4.5 binomial standard deviations of 1 − p
    assert abs(ref.mean() - (1 - p)) < 4.5 * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("fused", [True, False])
def test_each_task_vector_draws_its_own_dare_mask(monkeypatch, fused):
    """Vector 0 hashes the tensor name (one vector: the single-vector mask), vector v > 0 'v:name': the masks
    are independent (kept in both ≈ (1 − p)², as mergekit's draws), on the fused and the torch path."""
    if not fused:
        monkeypatch.setattr(kernels, "combine", lambda **kw: None)  # → the torch expression
    g = torch.Generator().manual_seed(4)
    d, zero = torch.randn(200, 64, generator=g), torch.zeros(200, 64)
    p, c = 0.5, MergeConfig(1.0, method="dare_linear", p=0.5, seed=7, weights=(1.0, 1.0))
    keeps = []
    for v, ds in enumerate([[d, zero], [zero, d]]):  # Δ in vector v only: M = Δ·keep_v / (1 − p)
        m, prep = _prepared(c, ds, [(0, 200)], name="t")
        got = _m(m, prep, ds, 0, 200)
        keep = torch.from_numpy(_numpy_mask(7, "t" if v == 0 else f"{v}:t", p, d.numel()).reshape(d.shape))
        assert torch.equal(got, torch.where(keep, (d.double() / (1 - p)).float(), 0.0)), v
        keeps.append(keep)
    both = (keeps[0] & keeps[1]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 4.5 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / d.numel()) ** 0.5


def test_dare_mask_is_the_same_in_another_process():
    code = ("from tvtool.merge import kernels; import hashlib; "
            "m = kernels.dare_keep(seed=5, name='x.weight', p=0.3, flat_start=123, shape=(40, 50)); "
            "print(hashlib.sha256(m.numpy().tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    m = kernels.dare_keep(seed=5, name="x.weight", p=0.3, flat_start=123, shape=(40, 50))
    assert out == hashlib.sha256(m.numpy().tobytes()).hexdigest()


def test_dare_rescales_kept_elements_by_one_over_one_minus_p():
    g = torch.Generator().manual_seed(3)
    d = torch.randn(400, 64, generator=g)
    p = 0.7
    m, prep = _prepared(MergeConfig(1.0, method="dare_linear", p=p, seed=11), [d], [(0, 400)], name="t")
    got = torch.cat([_m(m, prep, [d], s, s + 50) for s in range(0, 400, 50)])
    keep = kernels.dare_keep(seed=11, name="t", p=p, flat_start=0, shape=(400, 64))
    ref = (d.double() / (1 - p)).float()  # float64 reference, rounded once
    assert torch.equal(got[keep], ref[keep]) and (got[~keep] == 0).all()
    n = d.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 4.5 * (p * (1 - p) / n) ** 0.5


# -- α rules and layer schedules -----------------------------------------------------------
NAMES = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.o_proj.weight",
         "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight",
         "model.layers.2.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight"]


def test_rules_and_linear_schedule_give_alpha_per_tensor():
    c = MergeConfig(0.5, rules=((r"mlp|o_proj", 1.0), (r".", 0.2)), schedule=(0.0, 1.0))
    a = c.alphas(NAMES)
    assert a == {"model.embed_tokens.weight": 0.5 * 0.2, "model.layers.0.mlp.up_proj.weight": 0.0,
                 "model.layers.0.self_attn.o_proj.weight": 0.0, "model.layers.0.self_attn.q_proj.weight": 0.0,
                 "model.layers.1.mlp.up_proj.weight": 0.5 * 0.5, "model.layers.2.self_attn.q_proj.weight": 0.5 * 0.2,
                 "model.norm.weight": 0.5 * 0.2, "lm_head.weight": 0.5 * 0.2}
    assert MergeConfig(0.7).alphas(NAMES) == dict.fromkeys(NAMES, 0.7)


@pytest.mark.parametrize("rules,message", [
    ((("xyz", 2.0),), "the α rule xyz=2 applies to no tensor: no tensor name matches it (8 tensors, e.g. "
                       "'model.embed_tokens.weight', 'model.layers.0.mlp.up_proj.weight', "
                       "'model.layers.0.self_attn.o_proj.weight') (--alpha-rule). Fix the regex, or drop the rule"),
    ((("mlp", 1.0), ("up_proj", 2.0)), "the α rule up_proj=2 applies to no tensor: an earlier rule takes every tensor "
                                       "it matches (--alpha-rule). Fix the regex, or drop the rule"),
])
def test_an_alpha_rule_that_applies_to_no_tensor_is_an_error(rules, message):
    with pytest.raises(OptionsError) as e:
        MergeConfig(0.5, rules=rules).alphas(NAMES)
    assert str(e.value) == message


def test_per_tensor_alpha_output_equals_merge_rows():
    g = torch.Generator().manual_seed(4)
    base, d = torch.randn(64, 32, generator=g).to(torch.bfloat16), torch.randn(64, 32, generator=g) * 0.01
    cfgs = [MergeConfig(0.6), MergeConfig(0.6, schedule=(0.25, 1.0))]
    name = "model.layers.0.mlp.up_proj.weight"
    prep = prepare([c.operator for c in cfgs], tensor=TensorInfo(name, (64, 32), 1), ranges=[(0, 64)],
                   read=lambda s, e: Rows(base, [d]))
    outs = _merge_one(cfgs, [c.alphas(NAMES) for c in cfgs], name, 0, base, None, [d], None, prep, torch.bfloat16)
    for a, o in zip((0.6, 0.6 * 0.25), outs):
        assert torch.equal(bits(o), bits(merge_rows(base, d, a, torch.bfloat16)))


# -- bad settings: one clear error each ----------------------------------------------------
@pytest.mark.parametrize("settings,expected", [
    (dict(method="ties", density=0.0), "density must be in (0, 1], got 0.0 (merge.density). "
                                       "Density is the fraction of each Δ kept, e.g. 0.2"),
    (dict(method="ties", density=1.5), "density must be in (0, 1], got 1.5 (merge.density). "
                                       "Density is the fraction of each Δ kept, e.g. 0.2"),
    (dict(method="dare_ties", p=1.0), "DARE drop probability p must be in [0, 1), got 1.0 (merge.p). "
                                      "P is the fraction of Δ dropped, e.g. 0.9"),
    (dict(method="dare_linear", p=-0.1), "DARE drop probability p must be in [0, 1), got -0.1 (merge.p). "
                                         "P is the fraction of Δ dropped, e.g. 0.9"),
    (dict(method="ties", density=(0.5, 0.5), weights=(1.0, 1.0, 1.0)),
     "merge density has 2 values for 3 task vectors (merge.density). Give one value, or one per task vector"),
    (dict(method="task_arithmetic", density=0.3), "task_arithmetic takes no density (a setting of {users:density}) "
                                                  "(merge.density). Drop it, or choose an operator that takes it, "
                                                  "e.g. --method {first:density}"),
    (dict(method="ties", p=0.5), "ties takes no p (a setting of {users:p}) (merge.p). Drop it, or "
                                 "choose an operator that takes it, e.g. --method {first:p}"),
    (dict(method="tie"), "unknown merge method 'tie' (merge.method). Use one of {operators}"),
])
def test_bad_merge_settings(settings, expected):
    with pytest.raises(OptionsError) as e:
        MergeConfig(0.5, **settings)
    for k in ("density", "p"):  # the registry's lists: every operator that takes the setting
        expected = expected.replace(f"{{users:{k}}}", ", ".join(users(k))).replace(f"{{first:{k}}}", users(k)[0])
    assert str(e.value) == expected.replace("{operators}", ", ".join(operators()))


def test_schedule_that_names_no_layer():
    with pytest.raises(OptionsError) as e:
        MergeConfig(0.5, schedule=(0.1, 1.0)).alphas([n.replace("layers", "h") for n in NAMES])
    assert str(e.value) == ("the layer schedule names no layer: no tensor name matches '(?:^|\\\\.)layers\\\\.(\\\\d+)\\\\.' "
                            "(--layer-schedule). Drop --layer-schedule for a model whose layers are not named "
                            "layers.N")


def test_task_vectors_of_different_architectures(pairs):
    llama, qwen = TaskVector.between(*pairs["llama"]), TaskVector.between(*pairs["qwen2"])
    with pytest.raises(MismatchError) as e:
        merge(llama, qwen, method="ties", density=0.5)
    assert str(e.value).startswith("task vectors 1 and 2 have different tensors, e.g. ['model.layers.0.self_attn.")
    assert str(e.value).endswith(". Merge only task vectors of one architecture from one base")


def test_taskvector_trim_and_dare_are_lazy_and_chunking_free(pairs):
    tv = TaskVector.between(*pairs["llama"])
    trimmed, dropped = trim(tv, 0.3), dare(tv, 0.5, seed=1)
    for name in tv.names():
        whole = trimmed.get(name)
        n = whole.numel()
        assert int((whole != 0).sum()) <= max(1, int(0.3 * n)) and (whole != 0).sum() > 0
        kept = whole != 0
        assert torch.equal(whole[kept], tv.get(name)[kept])  # kept elements are Δ unchanged
        if whole.dim() == 2 and whole.shape[0] > 3:
            parts = [trimmed.rows(name, s, min(s + 3, whole.shape[0])) for s in range(0, whole.shape[0], 3)]
            assert torch.equal(bits(torch.cat(parts)), bits(whole))
            assert torch.equal(bits(dropped.rows(name, 3, 7)), bits(dropped.get(name)[3:7]))
    assert torch.equal(bits((trimmed * 0.5).get(name)), bits(trimmed.get(name) * 0.5))
