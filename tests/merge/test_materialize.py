"""`tvtool materialize`: bit-exact endpoints, float64 references, one read per input, atomic outputs."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

import tvtool
import tvtool.io.checkpoint as ckpt_mod
from helpers import assert_bit_equal, assert_one_line_error, bits, cli
from tiny import index_files, state_dict
from tvtool import DeltaOptions, MaterializeOptions
from tvtool.io.writer import ShardedWriter
from tvtool.vectors.source import DeltaSource
from tvtool.merge.stream import apply_to


def _opts(*alphas, **kw):
    return MaterializeOptions(alphas=alphas, progress=False, **kw)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "tied"])
@pytest.mark.parametrize("via", ["reasoner", "f32-delta"])
def test_endpoints_are_bit_exact(pairs, f32_deltas, tmp_path, arch, via):
    base, reasoner = pairs[arch]
    src = {"reasoner": reasoner} if via == "reasoner" else {"delta": f32_deltas[arch]}
    res = tvtool.materialize(source=DeltaSource(base=base, **src), output=tmp_path,
                             options=_opts(0.0, 1.0, max_shard_size="150KB"))
    m0, m1 = state_dict(res.folders[0.0]), state_dict(res.folders[1.0])
    assert_bit_equal(m0, state_dict(base))
    assert_bit_equal(m1, state_dict(reasoner))
    assert set(m1) == set(state_dict(reasoner))
    assert len(index_files(res.folders[1.0])) > 1  # sharded, with an index


def _ref64(B, R, alpha):
    """float64 θ1 + α(θ2 − θ1), exact for bf16 inputs; returns (value as float64 array) per tensor."""
    return {n: B[n].double().numpy() + alpha * (R[n].double().numpy() - B[n].double().numpy()) for n in B}


@pytest.mark.parametrize("alpha", [0.5, 1.5, -0.5])
def test_alpha_agrees_with_float64_reference_rounded_once(llama, tmp_path, alpha):
    """Equal to round_bf16(float64 value), except where that value sits on a rounding tie within fp32 error."""
    base, reasoner = llama
    res = tvtool.materialize(source=DeltaSource(base=base, reasoner=reasoner), output=tmp_path, options=_opts(alpha))
    got, B, R = state_dict(res.folders[alpha]), state_dict(base), state_dict(reasoner)
    total = diff = 0
    for n, exact in _ref64(B, R, alpha).items():
        ref = torch.from_numpy(exact).to(torch.bfloat16)
        mism = bits(got[n]) != bits(ref)
        total += mism.numel()
        if mism.any():
            # Only near-ties may differ: |exact − midpoint(got, ref)| within float32 rounding of the inputs.
            g, r = got[n][mism].double().numpy(), ref[mism].double().numpy()
            e = exact[mism.numpy()]
            assert np.all(np.abs(g - r) <= np.abs(r) * 2 ** -7 + 1e-30), n  # one bf16 ulp apart
            assert np.all(np.abs(e - (g + r) / 2) <= np.abs(e) * 2 ** -22), n
            diff += int(mism.sum())
    assert diff <= total * 1e-4


def test_matches_handwritten_float32_formula_on_all_archs(pairs, tmp_path):
    for arch, (base, reasoner) in pairs.items():
        res = tvtool.materialize(source=DeltaSource(base=base, reasoner=reasoner),
                                 output=tmp_path / arch, options=_opts(0.3, 2.0))
        B, R = state_dict(base), state_dict(reasoner)
        for a in (0.3, 2.0):
            ref = {n: (B[n].float() + a * (R[n].float() - B[n].float())).to(torch.bfloat16) for n in B}
            assert_bit_equal(state_dict(res.folders[a]), ref)


def test_each_input_tensor_is_read_once_for_five_alphas(llama, f32_deltas, monkeypatch, tmp_path):
    base, reasoner = llama
    seen = Counter()
    real = ckpt_mod.read_rows

    def counting(info, start=0, stop=None):
        t = real(info, start, stop)
        seen[(str(info.file), info.begin)] += t.numel() * t.element_size()
        return t

    monkeypatch.setattr(ckpt_mod, "read_rows", counting)
    for tag, kw in (("r", {"reasoner": reasoner}), ("d", {"delta": f32_deltas["llama"]})):
        seen.clear()
        tvtool.materialize(source=DeltaSource(base=base, **kw),
                           output=tmp_path / tag, options=_opts(0, 0.2, 0.5, 1, 1.5))
        inputs = [ckpt_mod.Checkpoint.open(p) for p in (base, *kw.values())]
        expected = {(str(c.info(n).file), c.info(n).begin): c.info(n).nbytes for c in inputs for n in c.names()}
        assert seen == Counter(expected)


def test_include_exclude_apply_alpha_to_selected_tensors(llama, tmp_path):
    base, reasoner = llama
    res = tvtool.materialize(source=DeltaSource(base=base, reasoner=reasoner), output=tmp_path,
                             options=_opts(0.7, include=r"\.mlp\.", exclude=r"layers\.1\."))
    got, B, R = state_dict(res.folders[0.7]), state_dict(base), state_dict(reasoner)
    picked = [n for n in B if ".mlp." in n and "layers.1." not in n]
    assert len(picked) == 3
    assert_bit_equal(got, {n: (B[n].float() + 0.7 * (R[n].float() - B[n].float())).to(torch.bfloat16)
                           for n in picked}, picked)
    assert_bit_equal(got, B, [n for n in B if n not in picked])


def test_output_folder_is_a_complete_model(llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, reasoner = llama
    res = tvtool.materialize(source=DeltaSource(base=base, reasoner=reasoner), output=tmp_path,
                             options=_opts(0.6, max_shard_size="200KB"))
    folder = res.folders[0.6]
    for f in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (folder / f).read_bytes() == (reasoner / f).read_bytes() or f == "config.json", f
    assert json.loads((folder / "config.json").read_text()) == json.loads((reasoner / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    B, R = state_dict(base), state_dict(reasoner)
    ref = {n: (B[n].float() + 0.6 * (R[n].float() - B[n].float())).to(torch.bfloat16) for n in B}
    refmodel = AutoModelForCausalLM.from_config(model.config).to(torch.float32)
    refmodel.load_state_dict({k: v.float() for k, v in ref.items()}, strict=True)
    ids = torch.tensor([[1, 5, 9, 13, 40, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, refmodel(ids).logits)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.apply_chat_template([{"role": "user", "content": "1 + 2"}], tokenize=False).startswith("think")


def test_config_from_base(llama, tmp_path):
    base, reasoner = llama
    res = tvtool.materialize(source=DeltaSource(base=base, reasoner=reasoner),
                             output=tmp_path, options=_opts(0.6, config_from="base"))
    assert (res.folders[0.6] / "chat_template.jinja").read_bytes() == (base / "chat_template.jinja").read_bytes()


def test_materialize_from_delta_needs_no_reasoner(llama, tmp_path):
    base, reasoner = llama
    d = tvtool.delta(base=base, reasoner=reasoner, output=tmp_path / "d", options=DeltaOptions(progress=False))
    res = tvtool.materialize(source=DeltaSource(base=base, delta=d.output), output=tmp_path / "m", options=_opts(0.6))
    for f in ("generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (res.folders[0.6] / f).read_bytes() == (reasoner / f).read_bytes()


def test_model_card_metadata_and_reproduction(llama, tmp_path):
    base, reasoner = llama
    res = tvtool.materialize(source=DeltaSource(base=base, reasoner=reasoner), output=tmp_path, options=_opts(0.6))
    card = ModelCard.load(res.folders[0.6] / "README.md")
    assert card.data.tvtool["alpha"] == 0.6
    assert card.data.tvtool["version"] == tvtool.__version__
    assert card.data.tvtool["base"]["source"] == str(base)
    assert card.data.tags == ["tvtool", "merge", "task-arithmetic", "cot-valve"]
    assert f"tvtool materialize {base} --reasoner {reasoner} --alpha 0.6" in card.text
    assert "merge_method: task_arithmetic" in card.text


def test_rerun_skips_finished_and_replaces_stale_partial(llama, tmp_path):
    base, reasoner = llama
    first = tvtool.materialize(source=DeltaSource(base=base, reasoner=reasoner), output=tmp_path, options=_opts(0.2))
    stamp = (first.folders[0.2] / "model.safetensors").stat().st_mtime_ns
    stale = tmp_path / "alpha-0.4.partial"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    res = tvtool.materialize(source=DeltaSource(base=base, reasoner=reasoner), output=tmp_path, options=_opts(0.2, 0.4))
    assert res.skipped == [0.2] and res.written == [0.4]
    assert (first.folders[0.2] / "model.safetensors").stat().st_mtime_ns == stamp
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpha-0.2", "alpha-0.4"]


def test_failure_midway_leaves_nothing_that_looks_complete(llama, tmp_path, monkeypatch):
    base, reasoner = llama
    calls = {"n": 0}
    real = ShardedWriter.write

    def failing(self, name, chunk):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError("disk full")
        return real(self, name, chunk)

    monkeypatch.setattr(ShardedWriter, "write", failing)
    with pytest.raises(OSError):
        tvtool.materialize(source=DeltaSource(base=base, reasoner=reasoner), output=tmp_path, options=_opts(0.2, 0.4))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(ShardedWriter, "write", real)
    res = tvtool.materialize(source=DeltaSource(base=base, reasoner=reasoner), output=tmp_path, options=_opts(0.2, 0.4))
    assert res.written == [0.2, 0.4]


def test_existing_folder_with_other_settings_is_an_error(llama, tmp_path):
    base, reasoner = llama
    tvtool.materialize(source=DeltaSource(base=base, reasoner=reasoner), output=tmp_path, options=_opts(0.2))
    r = cli("materialize", base, "--reasoner", reasoner, "-a", "0.2", "--dtype", "float32", "-o", tmp_path)
    assert_one_line_error(r, f"the output holds a result made from other inputs or options (dtype auto → float32) "
                             f"({tmp_path / 'alpha-0.2'}). Pass --overwrite to redo it, or choose "
                             "another output")
    r = cli("materialize", base, "--reasoner", reasoner, "-a", "0.2", "--dtype", "float32", "-o", tmp_path,
            "--overwrite", "--no-progress")
    assert r.exit_code == 0, r.stderr
    assert {t.dtype for t in state_dict(tmp_path / "alpha-0.2").values()} == {torch.float32}


@pytest.mark.parametrize("args,message", [
    (["-a", "0.5"], "give exactly one of --delta and --reasoner. Δ comes from a delta file or a reasoner"),
    (["--reasoner", "R"], "no α given (--alpha). Pass e.g. --alpha 0.6 (repeat for more)"),
    (["--reasoner", "R", "-a", "nan"], "α must be a finite number, got nan (--alpha). Pass real numbers such as 0.2,0.6,1"),
    (["--reasoner", "R", "-a", "1", "--include", "("],
     "bad regular expression '(': missing ), unterminated subpattern at position 0 (--include)"),
])
def test_bad_options(llama, tmp_path, args, message):
    base, reasoner = llama
    args = [str(reasoner) if a == "R" else a for a in args]
    r = cli("materialize", base, *args, "-o", tmp_path / "out")
    assert_one_line_error(r, message)
    assert not (tmp_path / "out").exists()


def test_delta_for_another_base_is_refused(pairs, f32_deltas, tmp_path):
    base, _ = pairs["qwen2"]
    r = cli("materialize", base, "--delta", f32_deltas["llama"], "-a", "0.5", "-o", tmp_path / "out")
    assert_one_line_error(r, "base tensor 'model.layers.0.self_attn.k_proj.bias' has no delta, and the delta does "
                             "not record it as skipped. Use the base model the delta was computed from")
    assert not (tmp_path / "out").exists()


def test_float32_checkpoints(llama, tmp_path):
    """With float32 inputs nothing is rounded: α=1 is θ2 and α=0.5 is the float32 formula, bit for bit."""
    from safetensors.torch import save_file

    folders = []
    for src, name in zip(llama, ("b32", "r32")):
        dst = tmp_path / name
        dst.mkdir()
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            (dst / f).write_bytes((src / f).read_bytes())
        save_file({k: v.float() for k, v in state_dict(src).items()}, dst / "model.safetensors")
        folders.append(dst)
    res = tvtool.materialize(source=DeltaSource(base=folders[0], reasoner=folders[1]),
                             output=tmp_path / "out", options=_opts(1.0, 0.5))
    B, R = state_dict(folders[0]), state_dict(folders[1])
    assert_bit_equal(state_dict(res.folders[1.0]), R)
    assert_bit_equal(state_dict(res.folders[0.5]), {n: B[n] + 0.5 * (R[n] - B[n]) for n in B})


@pytest.mark.parametrize("via", ["reasoner", "f32-delta"])
def test_apply_to_reads_each_input_once_and_matches_materialize(llama, f32_deltas, monkeypatch, tmp_path, via):
    """The in-engine α stream (`apply_to`) reads every input tensor once and equals the written folder."""
    base, reasoner = llama
    tv = tvtool.TaskVector.between(base, reasoner) if via == "reasoner" else tvtool.TaskVector.load(f32_deltas["llama"])
    src = {"reasoner": reasoner} if via == "reasoner" else {"delta": f32_deltas["llama"]}
    res = tvtool.materialize(source=DeltaSource(base=base, **src), output=tmp_path, options=_opts(0.6, 1.0))
    seen = Counter()
    real = ckpt_mod.read_rows

    def counting(info, start=0, stop=None):
        t = real(info, start, stop)
        seen[(str(info.file), info.begin)] += t.numel() * t.element_size()
        return t

    monkeypatch.setattr(ckpt_mod, "read_rows", counting)
    for a in (0.6, 1.0):
        seen.clear()
        streamed = dict(apply_to(tv, base, alpha=a))
        inputs = [ckpt_mod.Checkpoint.open(p) for p in (base, *src.values())]
        assert seen == Counter({(str(c.info(n).file), c.info(n).begin): c.info(n).nbytes
                                for c in inputs for n in c.names()})
        assert_bit_equal(streamed, state_dict(res.folders[a]))


def test_sharded_writer_groups_like_huggingface_hub_and_streams(tmp_path):
    """Shards and index are huggingface_hub's split of the same tensors, written chunk by chunk in plan
    order even when an oversized tensor gets a shard of its own in the middle of another shard."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    sd = {"a": torch.randn(40, 64, generator=g), "big": torch.randn(300, 64, generator=g).bfloat16(),
          "b": torch.randn(64, generator=g), "empty": torch.zeros(0, 64), "c": torch.randn(100, 64, generator=g)}
    limit = 30_000
    ref = split_torch_state_dict_into_shards(sd, max_shard_size=limit)
    plan = [(n, t.dtype, tuple(t.shape)) for n, t in sd.items()]
    w = ShardedWriter(folder=tmp_path, plan=plan, metadata={"format": "pt"}, max_shard_size=limit)
    for n, t in sd.items():
        for s in range(0, max(1, t.shape[0]), 16) if t.dim() > 1 else [0]:
            w.write(n, t[s:s + 16] if t.dim() > 1 else t)
    files = w.close()
    assert [f.name for f in files] == list(ref.filename_to_tensors) and len(files) == 3
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index == {"metadata": {"total_size": ref.metadata["total_size"], "format": "pt"},
                     "weight_map": ref.tensor_to_filename}
    for fname, names in ref.filename_to_tensors.items():
        got = load_file(tmp_path / fname)
        assert set(got) == set(names)
        assert_bit_equal(got, {n: sd[n] for n in names})
