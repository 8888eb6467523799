"""slerp (tvtool/merge/operators/slerp.py) against mergekit's `slerp`, run for real, and in every path.

- materialize at t = α equals mergekit-yaml's slerp (dtype float32, bf16 output) bit for bit;
- a float64 numpy slerp of each tensor is within one bf16 rounding of it, α = 0 is θ1 and α = 1 is θ2 bit
  for bit (θ2 as stored);
- several α in one run read each input once per pass (norms, dot product, output; once for a tensor of one
  chunk); row chunks and blocks that straddle them give the bytes of whole tensors, which is what the
  engine's worker loads (`engine_loaded`); mixchain's engine receives the same bytes;
- one line for several task vectors, weights, or svd-rank; recipes take it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

import tvtool
import tvtool.io.checkpoint as ckpt_mod
import tvtool.merge.prepare
import tvtool.merge.stream
from engine_setup import RecordingEngine
from helpers import assert_bit_equal, assert_one_line_error, bits, cli, engine_loaded
from tiny import state_dict
from tvtool import DeltaSource, MaterializeOptions, MergeConfig
from tvtool.io.safetensors_io import row_chunks
from tvtool.merge.options import MergeOptions, config_name
from tvtool.sweep.recipe import load_recipe
from tvtool.sweep.spec import merge_configs


def _slerp(base, reasoner, out, alphas, **kw):
    res = tvtool.materialize(source=DeltaSource(base=base, reasoner=reasoner), output=out, merge=MergeOptions(
        method="slerp"), options=MaterializeOptions(alphas=tuple(alphas), progress=False, **kw))
    return {a: state_dict(f) for a, f in res.folders.items()}


def _mergekit_slerp(tmp: Path, base: Path, reasoner: Path, t: float) -> dict:
    """mergekit-yaml's slerp of base and reasoner at t (float32 math, bf16 output), as a state dict."""
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tmp / "slerp.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "slerp", "base_model": str(base), "parameters": {"t": t},
                                   "models": [{"model": str(base)}, {"model": str(reasoner)}],
                                   "dtype": "float32", "out_dtype": "bfloat16"}))
    exe = Path(sys.executable).with_name("mergekit-yaml")
    p = subprocess.run([str(exe), str(cfg), str(tmp / "out"), "--quiet", "--no-copy-tokenizer"], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return state_dict(tmp / "out")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_equals_mergekit_slerp_bit_for_bit(pairs, tmp_path, arch):
    base, reasoner = pairs[arch]
    ours = _slerp(base, reasoner, tmp_path / "ours", (0.3, 0.7))
    for t in (0.3, 0.7):
        ref = _mergekit_slerp(tmp_path / f"t{t}", base, reasoner, t)
        assert set(ours[t]) == set(ref)
        assert_bit_equal(ours[t], ref)


def _ref64(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Slerp in float64 (the formula, written independently)."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cos = np.clip(np.dot(a.ravel() / (na if na > 1e-8 else 1), b.ravel() / (nb if nb > 1e-8 else 1)), -1, 1)
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    w = np.arccos(cos)
    return np.sin((1 - t) * w) / np.sin(w) * a + np.sin(t * w) / np.sin(w) * b


def test_float64_reference_and_endpoints(llama, tmp_path):
    base, reasoner = llama
    got = _slerp(base, reasoner, tmp_path, (0.0, 0.45, 1.0))
    B, R = state_dict(base), state_dict(reasoner)
    assert_bit_equal(got[0.0], B)
    assert_bit_equal(got[1.0], R)
    spherical = 0
    for n in B:
        a, b = B[n].double().numpy(), R[n].double().numpy()
        ref = torch.from_numpy(_ref64(a, b, 0.45)).to(torch.bfloat16)
        step = (bits(got[0.45][n]).int() - bits(ref).int()).abs()
        assert int(step.max()) <= 1, n  # within one bf16 rounding of the float64 value
        spherical += abs(np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b)) <= 0.9995
    assert spherical > 0  # tensors took the spherical branch, not only the linear one


def test_chunks_and_blocks_give_the_engines_bytes_and_one_read_per_pass(llama, tmp_path, monkeypatch):
    base, reasoner = llama
    monkeypatch.setattr(tvtool.merge.prepare, "BLOCK", 3000)  # blocks straddle the 4096-element chunks
    monkeypatch.setattr(tvtool.merge.stream, "row_chunks", lambda shape, max_elems=4096: row_chunks(shape, 4096))
    reads: Counter = Counter()
    real = ckpt_mod.Checkpoint.read

    def counted(self, name, start=0, stop=None):
        reads[(self.source.path.name, name)] += 1
        return real(self, name, start, stop)

    monkeypatch.setattr(ckpt_mod.Checkpoint, "read", counted)
    got = _slerp(base, reasoner, tmp_path, (0.2, 0.45, 0.8))
    for name in state_dict(base):
        n = len(row_chunks(tuple(ckpt_mod.Checkpoint.open(base).info(name).shape), 4096))
        assert reads[("base", name)] == reads[("reasoner", name)] == (1 if n == 1 else 3 * n), name
    monkeypatch.setattr(ckpt_mod.Checkpoint, "read", real)
    source = DeltaSource(base=str(base), reasoner=str(reasoner))
    for a in (0.2, 0.45, 0.8):
        assert_bit_equal(engine_loaded(source, MergeConfig(a, method="slerp")), got[a])  # whole tensors, one block


def test_a_delta_file_gives_the_pairs_bytes(llama, f32_deltas, tmp_path):
    base, reasoner = llama
    pair = _slerp(base, reasoner, tmp_path / "p", (0.6,))[0.6]
    res = tvtool.materialize(source=DeltaSource(base=base, delta=f32_deltas["llama"]), output=tmp_path / "d",
                             merge=MergeOptions(method="slerp"), options=MaterializeOptions(alphas=(0.6,), progress=False))
    assert_bit_equal(state_dict(res.folders[0.6]), pair)  # θ2 = θ1 + Δ exactly for a float32 Δ of bf16 models


def test_mixchain_engine_receives_the_materialized_bytes(llama, tmp_path, monkeypatch):
    from tvtool.engine.engine import Engine

    base, reasoner = llama
    loads = []

    class Loading(RecordingEngine):
        def load_alpha(self, *, source, config, **kw):
            loads.append((config, engine_loaded(source, config)))
            return super().load_alpha(source=source, config=config, **kw)

    monkeypatch.setattr(Engine, "for_source", Loading.for_source)
    r = CliRunner().invoke(tvtool.cli.main, ["mixchain", str(base), "--reasoner", str(reasoner), "--method", "slerp",
                                             "--alpha", "0.3,0.6", "--dataset", "toy", "--limit", "2", "--min-correct",
                                             "0", "--max-tokens", "8", "--instruction", "", "--no-progress",
                                             "-o", str(tmp_path / "mix")])
    assert r.exit_code == 0, r.output
    assert [c for c, _ in loads] == [MergeConfig(a, method="slerp") for a in (0.3, 0.6)]
    want = _slerp(base, reasoner, tmp_path / "m", (0.3, 0.6))
    for c, got in loads:
        assert_bit_equal(got, want[c.alpha])
    assert json.loads((tmp_path / "mix" / "mixchain.json").read_text())["merge"] == {"method": "slerp"}


def test_refusals_are_one_line(trio, tmp_path):
    base, r1, r2 = trio
    r = cli("materialize", base, "--reasoner", r1, "--vector", r2, "--method", "slerp", "--alpha", "0.5",
            "-o", tmp_path / "o")
    assert_one_line_error(r, "slerp interpolates θ1 and one θ2, got 2 task vectors (merge.method). Give one --reasoner "
                             "(or --delta) and no --vector")
    r = cli("materialize", base, "--vector", f"{r1}:0.5", "--method", "slerp", "--alpha", "0.5", "-o", tmp_path / "o")
    assert r.exit_code == 2 and r.stderr.startswith("tvtool: error: slerp takes no weights")
    r = cli("svd-rank", "--base", base, "--reasoner", r1, "--merge-method", "slerp", "--rank", "2", "-o",
            tmp_path / "f.safetensors")
    assert r.exit_code == 2 and r.stderr.startswith("tvtool: error: slerp has no merged task vector M to factor")
    helps = {c: cli(c, "--help") for c in ("materialize", "svd-rank")}
    assert all(h.exit_code == 0 for h in helps.values())
    assert "slerp" in helps["materialize"].output and "slerp" not in helps["svd-rank"].output
    assert "della" in helps["svd-rank"].output


def test_recipes_take_slerp(llama, tmp_path):
    base, reasoner = llama
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"name": "s", "base": str(base), "reasoner": str(reasoner), "datasets": [{"name": "toy"}],
                                 "merge": [{"method": "slerp", "alphas": [0.25, 0.5]}]}))
    configs = merge_configs(load_recipe(p))
    assert configs == [MergeConfig(a, method="slerp") for a in (0.25, 0.5)]
    assert [config_name(c) for c in configs] == ["slerp-alpha-0.25", "slerp-alpha-0.5"]
