"""della and della_linear (tvtool/merge/operators/della.py, della_linear.py) against mergekit 0.1.5.

- with mergekit's random mask replaced by ours (torch.bernoulli patched), mergekit's own della/della_linear
  merge (`merge_group`) equals ours bit for bit, and the keep probabilities mergekit draws from equal ours;
- our mask is the documented DARE hash, and its kept fraction follows the magnitude rank as mergekit's does
  (per rank decile, within binomial tolerance of density − ε + rank·2ε);
- mergekit-yaml run for real: the same kept fraction and the same L1 rescale (‖M‖₁ = ‖Δ‖₁) on the trio;
- the stream in 4096-element chunks (L1 blocks straddling them) gives the engine's whole-tensor bytes and the
  per-chunk reference (`operator_ref`); mixchain's engine receives them; CLI, recipes and bad settings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

import tvtool
import tvtool.merge.prepare
import tvtool.merge.stream
from engine_setup import RecordingEngine
from helpers import assert_bit_equal, assert_one_line_error, cli, engine_loaded
from operator_ref import ours
from tiny import state_dict
from tvtool import DeltaSource, MaterializeOptions, MergeConfig
from tvtool.io.safetensors_io import row_chunks
from tvtool.merge import kernels
from tvtool.merge.operators.della import keep_mask, keep_probabilities, vector_key
from tvtool.merge.options import MergeOptions
from tvtool.merge.prepare import prepare
from tvtool.merge.registry import Rows, TensorInfo
from tvtool.sweep.recipe import load_recipe
from tvtool.sweep.spec import merge_configs


def _ours_m(method, deltas, *, density, epsilon, weights, seed=3, name="w"):
    """M of `deltas` (float32 Δ_i of one tensor) by the operator's own per-chunk math."""
    one = len(deltas) == 1
    op = MergeConfig(1.0, method=method, weights=weights, seed=seed, density=density[0] if one else tuple(density),
                     epsilon=epsilon[0] if one else tuple(epsilon)).operator
    shape = tuple(deltas[0].shape)
    read = lambda s, e: Rows(None, [d[s:e] for d in deltas], start=s)  # noqa: E731
    prep = prepare([op], tensor=TensorInfo(name, shape, len(deltas)), ranges=[(0, shape[0])], read=read)
    return op.merged(prep.states[op], read(0, shape[0]), prep.tensor)


@pytest.mark.parametrize("method,n,shape", [("della_linear", 1, (64, 300)), ("della", 2, (64, 300)),
                                            ("della_linear", 2, (48, 77)), ("della", 1, (5000,))])
def test_mergekits_merge_with_our_masks_is_ours_bit_for_bit(method, n, shape, monkeypatch):
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.registry import get

    g = torch.Generator().manual_seed(n)
    numel = int(np.prod(shape))
    base = torch.zeros(shape)  # Δ_i = θ2 − 0 exactly, with distinct magnitudes: no tie for the ranks to order
    ends = [((torch.randperm(numel, generator=g) + 1).double() * 1e-6
             * (torch.randint(0, 2, (numel,), generator=g) * 2 - 1)).float().view(shape) for _ in range(n)]
    deltas = [e - base for e in ends]  # mergekit's Δ_i, float32
    weights, density, epsilon = (0.7, 0.5)[:n], [0.4, 0.6][:n], [0.1, 0.25][:n]
    got = _ours_m(method, deltas, density=density, epsilon=epsilon, weights=weights)
    rows = lambda d: d.view(1, -1) if d.dim() == 1 else d  # noqa: E731  (a 1-D tensor is one row)
    qs = [keep_probabilities(rows(d), density=density[v], epsilon=epsilon[v]) for v, d in enumerate(deltas)]
    masks = iter([keep_mask(q, key=vector_key(3, "w", v), flat_start=0) for v, q in enumerate(qs)])
    drawn = []

    def bernoulli(p, *a, **kw):  # mergekit's draw: our mask instead, and the probabilities it asked for
        drawn.append(p.clone())
        return next(masks).to(p.dtype)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    params = {"int8_mask": False, "normalize": method == "della", "rescale": True, "lambda": 1.0,
              "weight": {i + 1: weights[i] for i in range(n)}, "density": {i + 1: density[i] for i in range(n)},
              "epsilon": {i + 1: epsilon[i] for i in range(n)}}
    ref = get(method).merge_group(TensorGroup.from_tensors([base, *ends], base_index=0), **params)
    assert len(drawn) == n and all(torch.equal(p, q) for p, q in zip(drawn, qs))  # the same probabilities
    assert torch.equal((base + got).view(torch.int32), ref.view(torch.int32))


def test_the_mask_is_the_dare_hash():
    q = torch.full((40, 50), 0.75)
    got = keep_mask(q, key=kernels.tensor_key(5, "x.weight"), flat_start=123)
    assert torch.equal(got, kernels.dare_keep(seed=5, name="x.weight", p=0.25, flat_start=123, shape=(40, 50)))
    chunked = torch.cat([keep_mask(q[s:s + 7], key=kernels.tensor_key(5, "x.weight"), flat_start=123 + 50 * s)
                         for s in range(0, 40, 7)])
    assert torch.equal(chunked, got)
    assert vector_key(5, "x.weight", 0) != vector_key(5, "x.weight", 1)  # an independent mask per task vector


def test_kept_fraction_follows_the_magnitude_rank_as_mergekits():
    from mergekit.sparsify import RescaleNorm, della_magprune

    g = torch.Generator().manual_seed(7)
    d = torch.randn(256, 1000, generator=g) * 1e-3
    density, epsilon = 0.3, 0.2
    rank = torch.argsort(torch.argsort(d.abs(), dim=1), dim=1)  # 0 … 999 in each row
    decile = (rank * 10) // 1000
    ours_m = _ours_m("della_linear", [d], density=[density], epsilon=[epsilon], weights=(1.0,))
    torch.manual_seed(0)
    theirs = della_magprune(d, density=density, epsilon=epsilon, rescale_norm=RescaleNorm.l1)
    for k in range(10):
        sel = decile == k
        q = density - epsilon + (rank[sel].double() / 999 * 2 * epsilon).mean().item()
        tol = 4.5 * (q * (1 - q) / int(sel.sum())) ** 0.5
        for m in (ours_m, theirs):
            assert abs((m[sel] != 0).double().mean().item() - q) < tol, (k, q)
    for m in (ours_m, theirs):  # rescaled to Δ's L1 norm
        assert abs(m.abs().double().sum() / d.abs().double().sum() - 1) < 1e-5


def _mergekit(tmp: Path, method: str, base: Path, models: list[tuple[Path, dict]], params: dict) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = {"merge_method": method, "base_model": str(base), "parameters": params,
           "models": [{"model": str(m), "parameters": p} for m, p in models], "dtype": "float32",
           "out_dtype": "float32"}
    (tmp / "c.yml").write_text(yaml.safe_dump(cfg))
    exe = Path(sys.executable).with_name("mergekit-yaml")
    p = subprocess.run([str(exe), str(tmp / "c.yml"), str(tmp / "out"), "--quiet", "--no-copy-tokenizer"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return state_dict(tmp / "out")


def test_mergekit_yaml_keeps_and_rescales_alike(trio, tmp_path):
    base, r1, r2 = trio
    B, R = state_dict(base), state_dict(r1)
    density, epsilon = 0.4, 0.15
    theirs = _mergekit(tmp_path / "mk", "della_linear", base, [(r1, {"weight": 1.0, "density": density,
                                                                      "epsilon": epsilon})], {})
    res = tvtool.materialize(source=DeltaSource(base=base, reasoner=r1), output=tmp_path / "ours",
                             options=MaterializeOptions(alphas=(1.0,), dtype="float32", progress=False),
                             merge=MergeOptions(method="della_linear", density=density, epsilon=epsilon))
    mine = state_dict(res.folders[1.0])
    big = [n for n in B if B[n].numel() >= 4096]
    for out in (mine, theirs):
        kept = expected = var = 0.0
        for n in big:
            delta = R[n].float() - B[n].float()
            m = out[n].double() - B[n].double()
            assert abs(m.abs().sum() / delta.double().abs().sum() - 1) < 1e-4, n  # ‖M‖₁ = ‖Δ‖₁
            nz = delta != 0  # a kept zero is not seen; the sum of q over a tie group does not depend on its order
            q = keep_probabilities(delta.view(delta.shape[0], -1), density=density, epsilon=epsilon).view(delta.shape)
            kept += int((m[nz] != 0).sum())
            expected, var = expected + float(q[nz].double().sum()), var + float((q[nz] * (1 - q[nz])).double().sum())
        assert abs(kept - expected) < 4.5 * var ** 0.5, (kept, expected)
    # della over two vectors: sign election after each mask; the share of moved elements is a property of the
    # masks' distribution, the same for both (independent draws: within the binomial tolerance of two samples)
    settings = {"weight": 0.7, "density": 0.5, "epsilon": 0.1}
    theirs = _mergekit(tmp_path / "mk2", "della", base, [(r1, settings), (r2, {**settings, "weight": 0.5})], {})
    res = tvtool.materialize(source=DeltaSource(base=base, reasoner=r1, more=(r2,)), output=tmp_path / "ours2",
                             options=MaterializeOptions(alphas=(1.0,), dtype="float32", progress=False),
                             merge=MergeOptions(method="della", density=0.5, epsilon=0.1, weights=(0.7, 0.5)))
    mine = state_dict(res.folders[1.0])
    moved = [sum(int((out[n].double() != B[n].double()).sum()) for n in big) for out in (mine, theirs)]
    total = sum(B[n].numel() for n in big)
    p = moved[1] / total
    assert 0.3 < p < 0.95 and abs(moved[0] - moved[1]) / total < 4.5 * (2 * p * (1 - p) / total) ** 0.5


def test_stream_chunks_engine_and_reference_agree(trio, tmp_path, monkeypatch):
    base, r1, r2 = trio
    configs = [MergeConfig(0.8, method="della", density=0.5, epsilon=0.2, seed=1, weights=(0.7, 0.5)),
               MergeConfig(1.0, method="della_linear", density=(0.3, 0.6), epsilon=0.1, weights=(1.0, -0.3)),
               MergeConfig(0.5, method="della", density=0.4, epsilon=0.3)]
    monkeypatch.setattr(tvtool.merge.prepare, "BLOCK", 3000)  # L1 blocks straddle the chunks
    monkeypatch.setattr(tvtool.merge.stream, "row_chunks", lambda shape, max_elems=4096: row_chunks(shape, 4096))
    source = DeltaSource(base=base, reasoner=r1, more=(r2,))
    res = tvtool.materialize(source=source, output=tmp_path, configs=configs,
                             options=MaterializeOptions(progress=False))
    refs, _ = ours(base, [r1, r2], configs)
    for c, ref in zip(configs, refs):
        got = state_dict(res.configs[c])
        assert_bit_equal(got, ref)
        assert_bit_equal(engine_loaded(source, c), got)  # whole tensors
    assert [f.name for f in res.configs.values()][0].startswith("della-d0.5-e0.2-s1-")


def test_mixchain_engine_receives_the_materialized_bytes(trio, tmp_path, monkeypatch):
    from tvtool.engine.engine import Engine

    base, r1, r2 = trio
    loads = []

    class Loading(RecordingEngine):
        def load_alpha(self, *, source, config, **kw):
            loads.append((config, engine_loaded(source, config)))
            return super().load_alpha(source=source, config=config, **kw)

    monkeypatch.setattr(Engine, "for_source", Loading.for_source)
    r = CliRunner().invoke(tvtool.cli.main, [
        "mixchain", str(base), "--vector", f"{r1}:0.7", "--vector", f"{r2}:0.5", "--method", "della_linear",
        "--density", "0.5", "--epsilon", "0.1", "--drop-seed", "2", "--alpha", "0.6", "--dataset", "toy", "--limit",
        "2", "--min-correct", "0", "--max-tokens", "8", "--instruction", "", "--no-progress", "-o", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    c = MergeConfig(0.6, method="della_linear", density=0.5, epsilon=0.1, seed=2, weights=(0.7, 0.5))
    ((got_c, got),) = loads
    assert got_c == c
    want = tvtool.materialize(source=DeltaSource(base=base, reasoner=r1, more=(r2,)), output=tmp_path / "mat",
                              configs=[c], options=MaterializeOptions(progress=False)).configs[c]
    assert_bit_equal(got, state_dict(want))
    rec = json.loads((tmp_path / "m" / "mixchain.json").read_text())["merge"]
    assert rec == {"method": "della_linear", "weights": [0.7, 0.5], "density": 0.5, "epsilon": 0.1, "seed": 2,
                   "more": [str(r2)]}


def test_bad_settings_and_recipes(llama, tmp_path):
    base, reasoner = llama
    r = cli("materialize", base, "--reasoner", reasoner, "--method", "della", "--density", "0.2", "--epsilon", "0.3",
            "--alpha", "0.5", "-o", tmp_path / "o")
    assert_one_line_error(r, "della needs density ± epsilon in (0, 1), got density 0.2, epsilon 0.3 (merge.epsilon). "
                             "Choose a smaller epsilon, e.g. 0.1")
    r = cli("materialize", base, "--reasoner", reasoner, "--method", "ties", "--epsilon", "0.1", "--alpha", "0.5",
            "-o", tmp_path / "o")
    assert r.exit_code == 2 and r.stderr.startswith("tvtool: error: ties takes no epsilon (a setting of della, "
                                                    "della_linear)")
    assert "della, della_linear: keep probabilities" in " ".join(cli("eval", "--help").output.split())
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"name": "d", "base": str(base), "reasoner": str(reasoner),
                                 "datasets": [{"name": "toy"}], "merge": {"method": "della", "density": 0.4,
                                                                          "epsilon": 0.1, "alphas": [0.5]}}))
    assert merge_configs(load_recipe(p)) == [MergeConfig(0.5, method="della", density=0.4, epsilon=0.1)]
