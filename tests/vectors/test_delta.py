"""`tvtool delta`: Δ = θ2 − θ1 against float64 references, provenance, and every mismatch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import tvtool
from helpers import assert_bit_equal, assert_one_line_error, cli
from tiny import edited_copy as _edit, index_files, state_dict
from tvtool import DeltaOptions, TaskVector
from tvtool.merge.stream import apply_to


def _ref_delta(base, reasoner, dtype):
    """Independent reference: numpy float64 difference, rounded to float32, then to `dtype`."""
    B, R = state_dict(base), state_dict(reasoner)
    out = {}
    for n in B:
        d = R[n].float().numpy().astype(np.float64) - B[n].float().numpy().astype(np.float64)
        out[n] = torch.from_numpy(d.astype(np.float32)).to(dtype)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "tied"])
def test_float32_delta_matches_float64_reference(pairs, tmp_path, arch):
    base, reasoner = pairs[arch]
    assert index_files(base) != index_files(reasoner)  # sharded differently: matched by name, not file
    res = tvtool.delta(base=base, reasoner=reasoner, output=tmp_path / "d.safetensors",
                       options=DeltaOptions(dtype="float32", progress=False))
    got = load_file(res.output)
    ref = _ref_delta(base, reasoner, torch.float32)
    assert set(got) == set(ref)
    assert_bit_equal(got, ref)
    if arch == "qwen2":
        assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.k_proj.bias",
                "model.layers.0.self_attn.v_proj.bias"} <= set(got)
    if arch == "tied":
        assert "lm_head.weight" not in got


def test_default_dtype_is_the_checkpoints(llama, tmp_path):
    base, reasoner = llama
    res = tvtool.delta(base=base, reasoner=reasoner, output=tmp_path / "d.safetensors",
                       options=DeltaOptions(progress=False))
    got = load_file(res.output)
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    assert_bit_equal(got, _ref_delta(base, reasoner, torch.bfloat16))


def test_provenance_and_reasoner_files_in_metadata(llama, tmp_path):
    base, reasoner = llama
    out = tmp_path / "d.safetensors"
    tvtool.delta(base=base, reasoner=reasoner, output=out, options=DeltaOptions(progress=False))
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["tvtool.kind"] == "delta"
    assert meta["tvtool.version"] == tvtool.__version__
    assert json.loads(meta["tvtool.base"])["source"] == str(base)
    assert json.loads(meta["tvtool.reasoner"])["source"] == str(reasoner)
    assert meta["tvtool.dtype"] == "bfloat16"
    assert json.loads(meta["tvtool.skipped"]) == []
    files = TaskVector.load(out).side_files()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"):
        assert files[name] == (reasoner / name).read_bytes(), name


def test_folder_output_is_sharded_with_index_and_files(llama, tmp_path):
    base, reasoner = llama
    single = tmp_path / "d.safetensors"
    folder = tmp_path / "dfolder"
    tvtool.delta(base=base, reasoner=reasoner, output=single, options=DeltaOptions(progress=False))
    res = tvtool.delta(base=base, reasoner=reasoner, output=folder,
                       options=DeltaOptions(max_shard_size="200KB", progress=False))
    assert len(res.files) > 1 and (folder / "model.safetensors.index.json").is_file()
    assert (folder / "config.json").read_bytes() == (reasoner / "config.json").read_bytes()
    a, b = TaskVector.load(single), TaskVector.load(folder)
    assert a.names() == b.names()
    assert_bit_equal({n: a.get(n) for n in a.names()}, {n: b.get(n) for n in b.names()})


def test_single_file_over_shard_size_is_refused(llama, tmp_path):
    base, reasoner = llama
    out = tmp_path / "d.safetensors"
    r = cli("delta", base, reasoner, "-o", out, "--max-shard-size", "100KB", "--no-progress")
    assert_one_line_error(r, f"Δ is 722.2 KB, over --max-shard-size 100KB ({out}). "
                             "Give a folder path for -o (it will be sharded) or raise --max-shard-size")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_missing_tensor_is_an_error_listing_names(llama, tmp_path):
    base, reasoner = llama
    r2 = _edit(reasoner, tmp_path / "r2", lambda sd: {k: v for k, v in sd.items() if "layers.1.mlp" not in k})
    out = tmp_path / "d.safetensors"
    r = cli("delta", base, r2, "-o", out)
    assert_one_line_error(
        r, "3 tensors are in only one model (base only: ['model.layers.1.mlp.down_proj.weight', "
           "'model.layers.1.mlp.gate_proj.weight', 'model.layers.1.mlp.up_proj.weight']). Check that the reasoner "
           "was fine-tuned from this base, or pass --allow-missing to skip them (they are recorded)")
    assert not out.exists()
    r = cli("delta", base, r2, "-o", out, "--allow-missing", "--no-progress")
    assert r.exit_code == 0, r.stderr
    with safe_open(out, "pt") as f:
        missing = json.loads(f.metadata()["tvtool.missing"])
        assert "model.layers.1.mlp.up_proj.weight" not in f.keys()
    assert missing["base_only"] == ["model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.gate_proj.weight",
                                    "model.layers.1.mlp.up_proj.weight"]


def test_shape_mismatch_names_tensor_and_shapes(llama, tmp_path):
    base, reasoner = llama
    r2 = _edit(reasoner, tmp_path / "r2", lambda sd: {**sd, "model.layers.0.mlp.up_proj.weight":
                                                       sd["model.layers.0.mlp.up_proj.weight"][:200]})
    r = cli("delta", base, r2, "-o", tmp_path / "d.safetensors")
    assert_one_line_error(r, "shape mismatch for tensor 'model.layers.0.mlp.up_proj.weight': base (256, 128) vs "
                             "reasoner (200, 128). Base and reasoner must have the same architecture")


def test_vocab_mismatch_errors_or_intersects(llama, tmp_path):
    base, reasoner = llama
    grow = {"model.embed_tokens.weight", "lm_head.weight"}
    r2 = _edit(reasoner, tmp_path / "r2", lambda sd: {
        k: torch.cat([v, torch.ones(8, v.shape[1], dtype=v.dtype)]) if k in grow else v for k, v in sd.items()})
    out = tmp_path / "d.safetensors"
    r = cli("delta", base, r2, "-o", out)
    assert_one_line_error(r, "vocabulary size differs for tensor 'model.embed_tokens.weight': base has 256 rows, "
                             f"reasoner 264 ({r2}). Pass --vocab intersect to take Δ over the shared rows "
                             "(the other rows keep the base's values)")
    r = cli("delta", base, r2, "-o", out, "--vocab", "intersect", "--dtype", "float32", "--no-progress")
    assert r.exit_code == 0, r.stderr
    got, B, R = load_file(out), state_dict(base), state_dict(r2)
    for k in grow:
        assert got[k].shape == (256, 128)
        assert torch.equal(got[k], R[k][:256].float() - B[k].float())


def test_mixed_tied_and_untied(pairs, tmp_path):
    """Base ties lm_head to the embedding, reasoner has its own lm_head: Δ[lm_head] = R.lm_head − B.embed."""
    base, _ = pairs["tied"]
    _, untied = pairs["llama"]
    B, R = state_dict(base), state_dict(untied)
    out = tmp_path / "d.safetensors"
    tvtool.delta(base=base, reasoner=untied, output=out, options=DeltaOptions(dtype="float32", progress=False))
    got = load_file(out)
    assert torch.equal(got["lm_head.weight"], R["lm_head.weight"].float() - B["model.embed_tokens.weight"].float())


def test_non_float_tensors_are_skipped_with_a_note(llama, tmp_path):
    base, reasoner = llama
    add = lambda sd: {**sd, "model.position_ids": torch.arange(16)}  # noqa: E731
    b2, r2 = _edit(base, tmp_path / "b2", add), _edit(reasoner, tmp_path / "r2", add)
    res = tvtool.delta(base=b2, reasoner=r2, output=tmp_path / "d.safetensors", options=DeltaOptions(progress=False))
    assert res.skipped == [{"name": "model.position_ids", "reason": "non-float dtype (int64)"}]
    with safe_open(res.output, "pt") as f:
        assert "model.position_ids" not in f.keys()
        assert json.loads(f.metadata()["tvtool.skipped"]) == res.skipped


def test_existing_output_needs_overwrite(llama, tmp_path):
    base, reasoner = llama
    out = tmp_path / "d.safetensors"
    out.write_text("keep me")
    r = cli("delta", base, reasoner, "-o", out)
    assert_one_line_error(r, f"the output already exists, with no tvtool record of how it was made ({out}). "
                             "Pass --overwrite to redo it, or choose another output")
    assert out.read_text() == "keep me"
    assert cli("delta", base, reasoner, "-o", out, "--overwrite", "--no-progress").exit_code == 0


def test_taskvector_arithmetic(llama, tmp_path):
    base, reasoner = llama
    tv = TaskVector.between(base, reasoner)
    n = "model.layers.0.mlp.up_proj.weight"
    d = tv.get(n)
    assert torch.equal((tv * 0.5).get(n), d * 0.5)
    assert torch.equal((tv + tv).get(n), d + d)
    assert torch.equal((tv - tv).get(n), torch.zeros_like(d))
    out = tmp_path / "d.safetensors"
    tvtool.delta(base=base, reasoner=reasoner, output=out, options=DeltaOptions(dtype="float32", progress=False))
    assert torch.equal((TaskVector.load(out) - tv).get(n), torch.zeros_like(d))
    merged = dict(apply_to(tv, base, alpha=1.0))
    assert_bit_equal(merged, state_dict(reasoner))
