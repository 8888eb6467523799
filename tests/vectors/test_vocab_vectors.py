"""Several task vectors whose vocabularies differ follow the vocab policy of one pair.

Base and reasoner 1 have 256 vocabulary rows, reasoner 2 (a second fine-tune of the base) 248.
- by default: one line naming the tensor, both sizes and `--vocab intersect` (reasoners or deltas);
- `--vocab intersect`: every Δ_i over the 248 shared rows; task arithmetic and TIES equal float64
  numpy references computed on those rows only (TIES: its magnitude cut over them), rows 248..255
  are θ1 bit for bit; the in-engine load gets materialize's bytes; the policy is recorded and
  reaches `eval` and recipes.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tvtool
import tvtool.evaluation.evaluate
import tvtool.merge.stream
import tvtool.sweep.run
import tvtool.sweep.stages.evaluate
import tvtool.valve.mixchain  # noqa: F401  (patched below)
from helpers import assert_bit_equal, assert_one_line_error, cli
from helpers import engine_loaded as _loaded
from tiny import edited_copy, finetune_like, state_dict
from tvtool import DeltaSource, MaterializeOptions, MergeConfig
from tvtool.vectors.delta import DeltaOptions
from tvtool.errors import MismatchError
from tvtool.merge.options import MergeOptions
from tvtool.merge.merged import merge
from tvtool.vectors.vocab import check_vectors
from tvtool.io.safetensors_io import row_chunks
from tvtool.vectors.source import SourceOptions
from tvtool.vectors.taskvector import TaskVector

SHARED = 248  # reasoner 2's vocabulary rows (base and reasoner 1: 256)
VOCAB_T = ("model.embed_tokens.weight", "lm_head.weight")
TA = MergeConfig(0.8, weights=(0.7, -0.4))
TIES = MergeConfig(0.9, method="ties", density=0.3, weights=(0.7, 0.5))


@pytest.fixture(scope="module")
def trio(pairs, tmp_path_factory):
    """(base, reasoner 1 with 256 rows, reasoner 2 with 248 rows and vocab_size 248)."""
    base, r1 = pairs["llama"]
    sd = finetune_like(state_dict(base), seed=11, scale=0.08)
    r2 = edited_copy(r1, tmp_path_factory.mktemp("vocab") / "r2",
                     lambda _: {k: (v[:SHARED] if k in VOCAB_T else v).contiguous() for k, v in sd.items()})
    cfg = json.loads((r2 / "config.json").read_text())
    (r2 / "config.json").write_text(json.dumps({**cfg, "vocab_size": SHARED}))
    return base, r1, r2


def _materialize(base, r1, r2, out, configs, dtype="float32"):
    """materialize over reasoners 1 and 2, --vocab intersect, streamed in 4096-element chunks
    (the 248 shared rows end inside a chunk of the 256: `_chunks` splits it there)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(tvtool.merge.stream, "row_chunks", lambda shape, max_elems=4096: row_chunks(shape, 4096))
    try:
        return tvtool.materialize(source=DeltaSource(base=base, reasoner=r1, more=(r2,), vocab="intersect"), output=out,
                                  configs=configs, options=MaterializeOptions(dtype=dtype, progress=False)).configs
    finally:
        mp.undo()


def _deltas64(base, vectors) -> tuple[dict, dict[str, list[np.ndarray]]]:
    """(θ1 in float64, {name: [Δ_i over the shared rows, float64]}): exact differences of the stored values."""
    B = {n: t.double().numpy() for n, t in state_dict(base).items()}
    Rs = [{n: t.double().numpy() for n, t in state_dict(r).items()} for r in vectors]
    rows = {n: SHARED if n in VOCAB_T else B[n].shape[0] for n in B}
    return B, {n: [R[n][:rows[n]] - B[n][:rows[n]] for R in Rs] for n in B}


def _ties64(ds: list[np.ndarray], weights, density: float, cut_over: dict[int, np.ndarray] | None = None
            ) -> np.ndarray:
    """TIES of `ds` on their rows only: top-k |Δ_i| (k = ⌊density·numel⌋, ties in index order),
    weights, sign election by summed mass, disjoint mean (mergekit's order). `cut_over[i]`: take
    vector i's cut over this larger tensor instead (whose first rows are Δ_i): the other definition."""
    kept = []
    for i, (d, w) in enumerate(zip(ds, weights)):
        over = (cut_over or {}).get(i, d)
        keep = np.zeros(over.size, bool)
        keep[np.argsort(-np.abs(over).ravel(), kind="stable")[:max(1, int(density * over.size))]] = True
        kept.append(np.where(keep[:d.size].reshape(d.shape), d, 0.0) * w)
    D, W = np.stack(kept), np.array(weights).reshape(-1, *([1] * ds[0].ndim))
    mask = np.sign(D) == np.where(D.sum(0) >= 0, 1.0, -1.0)
    div = (W * mask).sum(0)
    div[div == 0] = 1
    return (D * mask).sum(0) / div


def _check_against(got: dict, B: dict, M: dict, alpha: float) -> None:
    """θ1 + α·M (float64) on the shared rows, θ1 as stored past them (float32 output of a bf16 base)."""
    for n, m in M.items():
        out = got[n].double().numpy()
        k = m.shape[0] if m.ndim else None
        np.testing.assert_allclose(out[:k], B[n][:k] + alpha * m, rtol=1e-6, atol=1e-9, err_msg=n)
        if n in VOCAB_T:
            assert got[n].shape[0] == 256 and k == SHARED
            assert_bit_equal({n: got[n][SHARED:]}, {n: torch.from_numpy(B[n][SHARED:]).float()})


# --- the default: an error --------------------------------------------------------------------


def test_default_refuses_reasoners_of_another_vocabulary_in_one_line(trio, tmp_path):
    base, r1, r2 = trio
    r = cli("materialize", base, "--reasoner", r1, "--vector", r2, "--method", "ties", "--density", "0.3",
            "--alpha", "0.5", "-o", tmp_path / "out", "--no-progress")
    assert_one_line_error(r, f"vocabulary size differs for tensor 'model.embed_tokens.weight': base has 256 rows, "
                             f"reasoner 248 ({r2}). Pass --vocab intersect to take Δ over the shared rows "
                             f"(the other rows keep the base's values)")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_default_refuses_deltas_of_different_vocabularies_in_one_line(trio, tmp_path):
    base, r1, r2 = trio
    d1 = tvtool.delta(base=base, reasoner=r1, output=tmp_path / "d1.safetensors",
                      options=DeltaOptions(dtype="float32", progress=False)).output
    d2 = tvtool.delta(base=base, reasoner=r2, output=tmp_path / "d2.safetensors",
                      options=DeltaOptions(dtype="float32", vocab="intersect", progress=False)).output
    r = cli("materialize", base, "--delta", d1, "--vector", d2, "--alpha", "0.5", "-o", tmp_path / "out",
            "--no-progress")
    assert_one_line_error(r, f"vocabulary size differs for tensor 'model.embed_tokens.weight': task vector 1 has "
                             f"256 rows, task vector 2 248 ({d2}). Pass --vocab intersect to merge over the rows "
                             f"all task vectors share (the other rows keep the base's values)")
    # with --vocab intersect the deltas (float32: the same Δ_i) give the reasoners' bytes
    args = ["--alpha", "0.8", "--dtype", "float32", "--vocab", "intersect", "--no-progress"]
    r = cli("materialize", base, "--delta", d1, "--vector", f"{d2}:-0.4", *args, "-o", tmp_path / "deltas")
    assert r.exit_code == 0, r.output
    r = cli("materialize", base, "--vector", f"{r1}:1", "--vector", f"{r2}:-0.4", *args, "-o", tmp_path / "pairs")
    assert r.exit_code == 0, r.output
    (a,), (b,) = (list((tmp_path / k).iterdir()) for k in ("deltas", "pairs"))
    assert_bit_equal(state_dict(a), state_dict(b))


def test_non_vocab_shape_differences_stay_an_architecture_error():
    a = {"model.embed_tokens.weight": (256, 8), "model.layers.0.mlp.up_proj.weight": (16, 8)}
    b = {"model.embed_tokens.weight": (256, 8), "model.layers.0.mlp.up_proj.weight": (12, 8)}
    for vocab in ("error", "intersect"):
        with pytest.raises(MismatchError) as e:
            check_vectors([a, b], vocab=vocab)
        assert str(e.value) == ("task vectors 1 and 2 differ in the shape of 'model.layers.0.mlp.up_proj.weight': "
                                "(16, 8) vs (12, 8). Merge only task vectors of one architecture from one base")
    c = {**a, "model.embed_tokens.weight": (248, 8)}
    assert check_vectors([a, c], vocab="intersect") == {"model.embed_tokens.weight": 248}
    assert check_vectors([a, a], vocab="intersect", base_rows={"model.embed_tokens.weight": 250}) == \
        {"model.embed_tokens.weight": 250}  # the base's rows bound the shared rows too
    with pytest.raises(MismatchError):  # a vocab tensor whose columns differ is no vocabulary difference
        check_vectors([a, {**a, "model.embed_tokens.weight": (248, 4)}], vocab="intersect")


# --- --vocab intersect ---------------------------------------------------------------------------


def test_task_arithmetic_over_the_shared_rows_equals_a_float64_reference(trio, tmp_path):
    base, r1, r2 = trio
    got = state_dict(_materialize(base, r1, r2, tmp_path, [TA])[TA])
    B, ds = _deltas64(base, [r1, r2])
    _check_against(got, B, {n: 0.7 * d[0] + -0.4 * d[1] for n, d in ds.items()}, TA.alpha)


def test_ties_over_the_shared_rows_equals_a_numpy_reference_on_those_rows(trio, tmp_path):
    base, r1, r2 = trio
    folder = _materialize(base, r1, r2, tmp_path, [TIES])[TIES]
    B, ds = _deltas64(base, [r1, r2])
    M = {n: _ties64(d, TIES.weights, TIES.density) for n, d in ds.items()}
    _check_against(state_dict(folder), B, M, TIES.alpha)
    # a magnitude cut over all 256 rows of Δ_1 would give other bytes: the reference tells them apart
    n = "lm_head.weight"
    other = _ties64(ds[n], TIES.weights, TIES.density,
                    cut_over={0: state_dict(r1)[n].double().numpy() - B[n]})
    assert np.abs(B[n][:SHARED] + TIES.alpha * other - state_dict(folder)[n][:SHARED].double().numpy()).max() > 1e-4
    info = json.loads((folder / "tvtool.json").read_text())
    assert info["settings"]["vocab"] == "intersect" and info["record"]["options"]["vocab"] == "intersect"
    assert info["delta_provenance"]["shared_rows"] == {n: SHARED for n in VOCAB_T}


def test_dare_masks_of_the_shared_rows_are_those_of_the_same_rows_without_the_policy(trio, tmp_path):
    """Reasoner 2 padded back to 256 rows with the base's (Δ_2 = 0 there) needs no policy; its DARE
    merge (masks: a hash of seed, name and flat index) equals the intersect merge on the shared rows."""
    base, r1, r2 = trio
    B = state_dict(base)
    padded = edited_copy(r2, tmp_path / "r2-256", lambda sd: {
        k: torch.cat([v, B[k][SHARED:]]) if k in VOCAB_T else v for k, v in sd.items()})
    c = MergeConfig(0.8, method="dare_linear", p=0.5, seed=3, weights=(0.7, 0.5))
    got = state_dict(_materialize(base, r1, r2, tmp_path / "a", [c])[c])
    ref = state_dict(_materialize(base, r1, padded, tmp_path / "b", [c])[c])
    assert_bit_equal({n: t[:SHARED] if n in VOCAB_T else t for n, t in got.items()},
                     {n: t[:SHARED] if n in VOCAB_T else t for n, t in ref.items()})
    assert not torch.equal(got["lm_head.weight"], ref["lm_head.weight"])  # Δ_1's rows past 248: merged in ref only


def test_engine_receives_the_materialized_bytes(trio, tmp_path):
    base, r1, r2 = trio
    folders = _materialize(base, r1, r2, tmp_path, [TA, TIES], dtype="auto")
    source = DeltaSource(base=str(base), reasoner=str(r1), more=(str(r2),), vocab="intersect")
    B = state_dict(base)
    for c in (TA, TIES):
        got = state_dict(folders[c])
        assert_bit_equal(_loaded(source, c), got)  # whole tensors vs 4096-element chunks
        assert_bit_equal({n: got[n][SHARED:] for n in VOCAB_T}, {n: B[n][SHARED:] for n in VOCAB_T})
    with pytest.raises(MismatchError, match="vocabulary size differs"):  # the worker follows the source's policy
        _loaded(DeltaSource(base=str(base), reasoner=str(r1), more=(str(r2),)), TA)


def test_config_from_the_reasoner_is_checked_as_for_one_pair(trio, tmp_path):
    base, r1, r2 = trio
    r = cli("materialize", base, "--vector", r2, "--vector", r1, "--vocab", "intersect", "--alpha", "0.5",
            "-o", tmp_path / "out", "--no-progress")
    assert_one_line_error(r, "output tensor 'model.embed_tokens.weight' has 256 vocabulary rows but the reasoner's "
                             "config.json says vocab_size 248. Use --config-from base")
    r = cli("materialize", base, "--vector", r2, "--vector", r1, "--vocab", "intersect", "--alpha", "0.5",
            "--config-from", "base", "-o", tmp_path / "out", "--no-progress")
    assert r.exit_code == 0, r.output


def test_python_api_merges_over_the_shared_rows(trio):
    base, r1, r2 = trio
    tv1, tv2 = TaskVector.between(base, r1), TaskVector.between(base, r2, vocab="intersect")
    with pytest.raises(MismatchError, match="Pass --vocab intersect"):
        merge(tv1, tv2, method="ties", density=0.3)
    m = merge(tv1, tv2, method="ties", density=0.3, weights=(0.7, 0.5), vocab="intersect")
    assert m.shape("lm_head.weight") == (SHARED, 128)
    _, ds = _deltas64(base, [r1, r2])
    np.testing.assert_allclose(m.get("lm_head.weight").double().numpy(),
                               _ties64(ds["lm_head.weight"], (0.7, 0.5), 0.3), rtol=1e-6, atol=1e-12)


def test_svd_rank_takes_the_policy(trio, tmp_path):
    """svd-rank of TIES over the two vectors: an error naming --vocab intersect by default; with it, M over the
    shared rows (at full rank, the factors of lm_head reproduce the float64 reference on those rows)."""
    base, r1, r2 = trio
    args = ["svd-rank", "--base", base, "--vector", f"{r1}:0.7", "--vector", f"{r2}:0.5", "--merge-method", "ties",
            "--density", "0.3", "--rank", "128", "--method", "exact", "--include", "lm_head", "--no-progress"]
    r = cli(*args, "-o", tmp_path / "f.safetensors")
    assert r.exit_code == 2 and "vocabulary size differs" in r.stderr and "--vocab intersect" in r.stderr
    r = cli(*args, "--vocab", "intersect", "-o", tmp_path / "f.safetensors")
    assert r.exit_code == 0, r.output
    f = load_file(tmp_path / "f.safetensors")
    ba = f["lm_head.weight.lora_B"].double() @ f["lm_head.weight.lora_A"].double()
    _, ds = _deltas64(base, [r1, r2])
    ref = _ties64(ds["lm_head.weight"], (0.7, 0.5), 0.3)
    assert ba.shape == (SHARED, 128) and np.abs(ba.numpy() - ref).max() <= 1e-5 * np.abs(ref).max()


def test_eval_and_recipes_pass_the_policy_to_the_source(trio, tmp_path, monkeypatch):
    base, r1, r2 = trio
    seen = []

    class Stop(Exception):
        pass

    def capture(out, mode, source, **kw):
        seen.append(source)
        raise Stop

    monkeypatch.setattr(tvtool.evaluation.evaluate, "_evaluate", capture)
    with pytest.raises(Stop):
        tvtool.evaluation.evaluate.evaluate(source=DeltaSource(base=base, reasoner=r1, more=(r2,), vocab="intersect"),
                                            alphas=(0.5,), output=tmp_path / "ev",
                                            merge=MergeOptions(method="ties", density=0.3))
    r = cli("eval", "--base", base, "--reasoner", r1, "--vocab", "intersect", "--alpha", "0.5",
            "-o", tmp_path / "e2")
    assert r.exit_code != 0  # Stop, raised by the stand-in
    assert [s.vocab for s in seen] == ["intersect", "intersect"] and seen[0].more == (str(r2),)
    monkeypatch.setattr(sys.modules["tvtool.valve.mixchain"], "_build", lambda *, source, **kw: capture(None, None, source))
    r = cli("mixchain", base, "--vector", r1, "--vector", r2, "--method", "ties", "--density", "0.3", "--vocab",
            "intersect", "--alpha", "0.5", "--dataset", "toy", "-o", tmp_path / "mc")
    assert r.exit_code != 0 and seen[-1] == DeltaSource(base=str(base), reasoner=str(r1), more=(str(r2),),
                                                        vocab="intersect")

    monkeypatch.setattr(tvtool.sweep.stages.evaluate, "_eval_one_engine", lambda r, source, *a: capture(None, None, source))
    from tvtool.sweep.recipe import Recipe
    from tvtool.sweep.spec import DatasetSpec

    recipe = Recipe(name="v", base=str(base), vectors=({"model": str(r1)}, {"model": str(r2)}),
                    alphas=(0.5,), datasets=(DatasetSpec(name="toy", limit=1),),
                    source=SourceOptions(vocab="intersect"), output=str(tmp_path / "sweep"))
    with pytest.raises(Stop):
        tvtool.sweep.run.sweep(recipe=recipe)
    assert seen[-1] == DeltaSource(base=str(base), reasoner=str(r1), more=(str(r2),), vocab="intersect")
