"""svd-rank of an operator's merged task vector M (e.g. "factor the trimmed Δ").

- at full rank (exact SVD) the factors reproduce the magnitude-trimmed Δ of an independent float64
  numpy reference (top-k of |Δ| per tensor, k = max(1, ⌊density·n⌋), ties in index order), and the
  tensors kept full equal it bit for bit;
- TIES over two task vectors: a factored M applied by materialize equals the operator applied by
  materialize on the tensors kept full (the same M), and is close on the factored ones;
- the operator is recorded (metadata, report, adapter card) and part of the finished-work record:
  the same settings are skipped, an edited density is named and redone;
- the CLI (`--merge-method`, `--density`, `--vector`) gives the API's bytes; α rules, schedules and bad
  settings are one line each.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

import tvtool
from tiny import state_dict
from tvtool.cli import main
from tvtool.errors import MismatchError, OutputError
from tvtool.lowrank.svd import LowRankOptions, svd_rank
from tvtool.merge.options import MergeOptions
from tvtool.vectors.source import DeltaSource

TRIM = MergeOptions(method="trim", density=0.3)
FULL_RANK = dict(rank=64, method="exact", include="k_proj|v_proj")  # [64, 128]: rank 64 is full rank


def _opts(**kw) -> LowRankOptions:
    return LowRankOptions(progress=False, **kw)


def _trimmed(base, reasoner, density: float) -> dict[str, np.ndarray]:
    """Independent float64 reference: Δ = θ2 − θ1, keeping the k = max(1, ⌊density·n⌋) largest |Δ| per
    tensor (ties: the lower flat index first)."""
    B, R = state_dict(base), state_dict(reasoner)
    out = {}
    for n in B:
        d = R[n].double().numpy() - B[n].double().numpy()
        flat = d.reshape(-1)
        k = max(1, int(density * flat.size))
        keep = np.argsort(-np.abs(flat), kind="stable")[:k]
        m = np.zeros_like(flat)
        m[keep] = flat[keep]
        out[n] = m.reshape(d.shape)
    return out


def _products(path) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """(B·A in float64 per factored tensor, the tensors kept full)."""
    t = load_file(path)
    prods = {n.removesuffix(".lora_A"): t[n.removesuffix(".lora_A") + ".lora_B"].double().numpy()
             @ t[n].double().numpy() for n in t if n.endswith(".lora_A")}
    return prods, {n: v for n, v in t.items() if not n.endswith((".lora_A", ".lora_B"))}


def test_full_rank_factors_reproduce_the_trimmed_delta(llama, tmp_path):
    base, reasoner = llama
    res = svd_rank(source=DeltaSource(base=base, reasoner=reasoner), output=tmp_path / "f.safetensors", merge=TRIM,
                   options=_opts(**FULL_RANK))
    ref = _trimmed(base, reasoner, 0.3)
    plain = {n: state_dict(reasoner)[n].double().numpy() - state_dict(base)[n].double().numpy() for n in ref}
    prods, full = _products(res.output)
    assert len(prods) == 4 and any(v.dim() == 2 for v in full.values())  # k/v factored, the rest kept full
    for n, m in full.items():  # kept full: M itself, bit for bit (float32 holds these Δ exactly)
        assert torch.equal(m, torch.from_numpy(ref[n]).float()), n
    for n, ba in prods.items():
        err = np.abs(ba - ref[n]).max()
        assert err <= 1e-5 * np.abs(ref[n]).max(), (n, err)
        assert np.abs(ba - plain[n]).max() > 1000 * err  # it is the trimmed Δ, not Δ
        assert np.count_nonzero(ref[n]) == max(1, int(0.3 * ref[n].size))


def test_ties_of_two_vectors_factored_applies_like_the_operator(trio, tmp_path):
    base, r1, r2 = trio
    merge = MergeOptions(method="ties", density=0.4, weights=(0.7, 0.5))
    source = DeltaSource(base=base, reasoner=r1, more=(r2,))
    res = svd_rank(source=source, output=tmp_path / "f.safetensors", merge=merge, options=_opts(**FULL_RANK))
    mopts = tvtool.MaterializeOptions(alphas=(0.55,), dtype="float32", progress=False)
    via_factors = state_dict(tvtool.materialize(source=DeltaSource(base=base, delta=res.output), output=tmp_path / "a",
                                                options=mopts).folders[0.55])
    via_operator = state_dict(tvtool.materialize(source=source, output=tmp_path / "b", options=mopts,
                                                 merge=merge).folders[0.55])
    _, full = _products(res.output)
    for n in full:  # the same M, applied by the same merge path: the same bytes
        assert torch.equal(via_factors[n], via_operator[n]), n
    B = state_dict(base)
    for n in via_factors:
        if n not in full:
            moved = (via_operator[n] - B[n].float()).abs().max()
            assert (via_factors[n] - via_operator[n]).abs().max() <= 1e-4 * moved, n
    meta = json.loads(safe_open(res.output, "pt").metadata()["tvtool.merge"])
    assert meta == {"method": "ties", "density": 0.4, "weights": [0.7, 0.5], "more": [str(r2)]}


def test_operator_is_recorded_and_an_edited_density_redoes_the_work(llama, tmp_path):
    base, reasoner = llama
    out, peft = tmp_path / "f.safetensors", tmp_path / "adapters"
    first = svd_rank(source=DeltaSource(base=base, reasoner=reasoner),
                     output=out, merge=TRIM, options=_opts(rank=2, peft=str(peft)))
    assert json.loads(safe_open(out, "pt").metadata()["tvtool.merge"]) == {"method": "trim", "density": 0.3}
    report = json.loads(first.report_path.read_text())
    assert report["merge"] == {"method": "trim", "density": 0.3}
    assert report["record"]["options"]["merge"] == {"method": "trim", "density": 0.3}
    card = (first.adapters[1.0] / "README.md").read_text()
    assert "merged by the `trim` operator (density 0.3) into M" in card and "density: 0.3" in card
    stamp = out.stat().st_mtime_ns
    again = svd_rank(source=DeltaSource(base=base, reasoner=reasoner),
                     output=out, merge=TRIM, options=_opts(rank=2, peft=str(peft)))
    assert out.stat().st_mtime_ns == stamp and again.totals == first.totals  # finished: skipped
    edited = MergeOptions(method="trim", density=0.5)
    with pytest.raises(OutputError, match=r"merge\.density 0\.3 → 0\.5"):
        svd_rank(source=DeltaSource(base=base, reasoner=reasoner),
                 output=out, merge=edited, options=_opts(rank=2, peft=str(peft)))
    redone = svd_rank(source=DeltaSource(base=base, reasoner=reasoner), output=out, merge=edited,
                      options=_opts(rank=2, peft=str(peft), overwrite=True))
    assert json.loads(safe_open(out, "pt").metadata()["tvtool.merge"])["density"] == 0.5
    assert redone.totals["energy_kept"] != first.totals["energy_kept"]
    with pytest.raises(OutputError, match="merge"):  # plain Δ on the same output: another record
        svd_rank(source=DeltaSource(base=base, reasoner=reasoner), output=out, options=_opts(rank=2, peft=str(peft)))


def test_cli_equals_the_api(llama, tmp_path):
    base, reasoner = llama
    api = svd_rank(source=DeltaSource(base=base, reasoner=reasoner), output=tmp_path / "api.safetensors", merge=TRIM,
                   options=_opts(rank=2, method="exact"))
    r = CliRunner().invoke(main, ["svd-rank", "--base", str(base), "--reasoner", str(reasoner), "--merge-method",
                                  "trim", "--density", "0.3", "--rank", "2", "--method", "exact", "--no-progress",
                                  "-o", str(tmp_path / "cli.safetensors")])
    assert r.exit_code == 0, r.output
    a, c = load_file(api.output), load_file(tmp_path / "cli.safetensors")
    assert a.keys() == c.keys() and all(torch.equal(a[n], c[n]) for n in a)


@pytest.mark.parametrize("flags,message", [
    (["--merge-method", "trim", "--alpha-rule", "mlp=1"],
     "svd-rank factors the merged task vector M; α rules and layer schedules scale α where M is applied "
     "(--alpha-rule). Drop --alpha-rule here and pass it to materialize/eval with the factored delta"),
    (["--layer-schedule", "0.5:1"],
     "svd-rank factors the merged task vector M; α rules and layer schedules scale α where M is applied "
     "(--layer-schedule). Drop --layer-schedule here and pass it to materialize/eval with the factored delta"),
    (["--merge-method", "trim", "--density", "0"],
     "density must be in (0, 1], got 0.0 (merge.density). Density is the fraction of each Δ kept, e.g. 0.2"),
    (["--merge-method", "dare_linear", "--drop-p", "1"],
     "DARE drop probability p must be in [0, 1), got 1.0 (merge.p). P is the fraction of Δ dropped, e.g. 0.9"),
])
def test_bad_operator_settings_are_one_line(llama, tmp_path, flags, message):
    base, reasoner = llama
    r = CliRunner().invoke(main, ["svd-rank", "--base", str(base), "--reasoner", str(reasoner), "--rank", "2",
                                  "--no-progress", "-o", str(tmp_path / "f.safetensors"), *flags])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [f"tvtool: error: {message}"], r.output
    assert not list(tmp_path.iterdir())


def test_vectors_of_different_architectures_are_refused(pairs, tmp_path):
    base, r1 = pairs["llama"]
    with pytest.raises(MismatchError, match="only one model"):
        svd_rank(source=DeltaSource(base=base, reasoner=r1, more=(str(pairs["qwen2"][1]),)),
                 output=tmp_path / "f.safetensors", options=_opts(rank=1), merge=MergeOptions(method="ties"))

