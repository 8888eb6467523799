"""`svd_rank`: Eckart–Young optimality, energy ranks, materialize from factors, PEFT and vLLM adapters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tvtool
from helpers import assert_bit_equal
from tiny import state_dict
from tvtool.errors import CheckpointError, OptionsError
from tvtool.lowrank.svd import LowRankOptions, factorize, svd_rank
from tvtool.lowrank.peft_adapter import VLLM_RANKS, adapter_card
from tvtool.vectors.source import DeltaSource


def _deltas(base, reasoner) -> dict[str, np.ndarray]:
    """Independent Δ: float64 numpy difference of the stored tensors."""
    B, R = state_dict(base), state_dict(reasoner)
    return {n: R[n].double().numpy() - B[n].double().numpy() for n in B}


def _optimum(d: np.ndarray, k: int) -> float:
    """Eckart–Young: the best rank-k relative Frobenius error, from a float64 SVD."""
    s = np.linalg.svd(d, compute_uv=False)
    return float(np.sqrt((s[k:] ** 2).sum() / (s ** 2).sum()))


def _factors(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    t = load_file(path)
    return {n[: -len(".lora_A")]: (t[n[: -len(".lora_A")] + ".lora_B"].double().numpy(), t[n].double().numpy())
            for n in t if n.endswith(".lora_A")}


def _opts(**kw) -> LowRankOptions:
    return LowRankOptions(progress=False, **kw)


def _decaying(m: int, n: int, seed: int, decay: float | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """A dense [m, n] matrix with a known spectrum: σ_i = (i+1)^-0.7, or decay^i (float32, plus its σ)."""
    g = np.random.default_rng(seed)
    k = min(m, n)
    u, _ = np.linalg.qr(g.standard_normal((m, k)))
    v, _ = np.linalg.qr(g.standard_normal((n, k)))
    s = decay ** np.arange(k) if decay else (np.arange(k) + 1.0) ** -0.7
    return torch.from_numpy(((u * s) @ v.T).astype(np.float32)), s


# -- optimality -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["randomized", "exact"])
def test_rank_r_error_is_the_eckart_young_optimum_on_the_fixture(llama, tmp_path, method):
    base, reasoner = llama
    res = svd_rank(source=DeltaSource(base=base, reasoner=reasoner), output=tmp_path / "f.safetensors",
                   options=_opts(rank=4, method=method))
    deltas, factors = _deltas(base, reasoner), _factors(res.output)
    factored = [t for t in res.tensors if t.kind == "factored"]
    assert len(factored) == 14 and {t.method for t in factored} == {method}
    for t in factored:
        d = deltas[t.name]
        B, A = factors[t.name]
        assert B.shape == (d.shape[0], 4) and A.shape == (4, d.shape[1])
        err = np.linalg.norm(d - B @ A) / np.linalg.norm(d)  # from the stored factors, in float64
        opt = _optimum(d, 4)
        assert opt > 0.3  # a real truncation, not a trivially exact one
        assert err == pytest.approx(t.rel_error, rel=1e-4)  # the report tells the truth
        if method == "exact":
            assert err == pytest.approx(opt, rel=1e-5)
        else:
            assert opt * (1 - 1e-6) <= err <= 1.01 * opt


@pytest.mark.parametrize("rank", [2, 8, 32])
def test_randomized_is_within_one_percent_on_a_power_law_spectrum(rank):
    d, s = _decaying(600, 400, seed=rank)
    opt = float(np.sqrt((s[rank:] ** 2).sum() / (s ** 2).sum()))
    for method, tol in (("randomized", 0.01), ("exact", 1e-5)):
        torch.manual_seed(0)
        B, A, S, norm_sq, used = factorize(d, rank=rank, energy=None, method=method)
        assert used == method and B.shape == (600, rank) and A.shape == (rank, 400)
        err = float(np.linalg.norm(d.double().numpy() - B.double().numpy() @ A.double().numpy())
                    / np.linalg.norm(d.double().numpy()))
        assert opt * (1 - 1e-5) <= err <= opt * (1 + tol), (method, err, opt)


# -- energy --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_energy_picks_the_smallest_rank_meeting_the_threshold(llama, tmp_path, method):
    base, reasoner = llama
    deltas = _deltas(base, reasoner)
    for i, energy in enumerate((0.3, 0.6, 0.9)):
        res = svd_rank(source=DeltaSource(base=base, reasoner=reasoner), output=tmp_path / f"f{i}.safetensors",
                       options=_opts(energy=energy, method=method))
        factors = _factors(res.output)
        ranks = set()
        for t in res.tensors:
            if t.kind != "factored":
                continue
            d = deltas[t.name]
            s = np.linalg.svd(d, compute_uv=False)
            cum = np.cumsum(s ** 2) / (s ** 2).sum()
            best = int(np.argmax(cum >= energy)) + 1
            B, A = factors[t.name]
            kept = 1 - (np.linalg.norm(d - B @ A) / np.linalg.norm(d)) ** 2  # what the stored factors retain
            assert kept >= energy - 1e-5 and kept == pytest.approx(t.energy, abs=1e-4)
            if method == "exact":
                assert t.rank == best, (t.name, t.rank, best)
            else:  # randomized σ are lower bounds: never fewer; in the flat noise tail at most 2 more
                assert best <= t.rank <= best + 2, (t.name, t.rank, best)
            ranks.add(t.rank)
        assert len(ranks) > 1  # ranks do vary per tensor


@pytest.mark.parametrize("energy", [0.5, 0.8, 0.95])
def test_randomized_energy_rank_is_exact_on_a_decaying_spectrum(energy):
    d, s = _decaying(500, 300, seed=1, decay=0.97)
    cum = np.cumsum(s ** 2) / (s ** 2).sum()
    best = int(np.argmax(cum >= energy)) + 1
    torch.manual_seed(0)
    B, A, S, norm_sq, used = factorize(d, rank=None, energy=energy, method="randomized")
    assert used == "randomized" and A.shape[0] == best


def test_energy_is_capped_by_max_rank(llama, tmp_path):
    base, reasoner = llama
    deltas = _deltas(base, reasoner)
    res = svd_rank(source=DeltaSource(base=base, reasoner=reasoner), output=tmp_path / "f.safetensors",
                   options=_opts(energy=0.99, max_rank=3))
    for t in res.tensors:
        if t.kind == "factored":
            assert t.rank == 3 and t.energy < 0.99
            assert t.rel_error == pytest.approx(_optimum(deltas[t.name], 3), rel=0.01)


# -- materialize from factors ------------------------------------------------------------------------
def test_materialize_from_factored_delta_is_base_plus_alpha_BA(pairs, tmp_path):
    base, reasoner = pairs["qwen2"]
    res = svd_rank(source=DeltaSource(base=base, reasoner=reasoner),
                   output=tmp_path / "f.safetensors", options=_opts(rank=4))
    m = tvtool.materialize(source=DeltaSource(base=base, delta=res.output), output=tmp_path / "m",
                           options=tvtool.MaterializeOptions(alphas=(0.6,), dtype="float32", progress=False))
    got, B0 = state_dict(m.folders[0.6]), state_dict(base)
    factors, full = _factors(res.output), load_file(res.output)
    assert set(got) == set(B0)
    eps = np.finfo(np.float32).eps
    for n, b in B0.items():
        if n in factors:
            Bf, Af = factors[n]
            d, scale = Bf @ Af, (np.abs(Bf) @ np.abs(Af)) * Af.shape[0]  # fp32 matmul error ≤ k·eps·|B||A|
        else:
            d = full[n].double().numpy()
            scale = np.abs(d)
        ref = b.double().numpy() + 0.6 * d  # independent, in float64
        diff = np.abs(got[n].double().numpy() - ref)
        # one rounding of the result plus the float32 rounding of α·Δ (and of B·A): a few ulps, no more
        tol = np.spacing(np.abs(ref).astype(np.float32)) + 2 * eps * 0.6 * scale
        assert (diff <= tol).all(), (n, float((diff / tol).max()))
        if n in factors:
            assert np.abs(0.6 * d).max() > 100 * tol.max()  # the update is far above the tolerance
    assert "model.layers.0.self_attn.q_proj.bias" in full  # 1-D deltas are kept full by default
    bias = "model.layers.0.self_attn.q_proj.bias"
    assert not torch.equal(got[bias], B0[bias].float())


def test_drop_unfactored_records_and_materialize_keeps_the_base(pairs, tmp_path):
    base, reasoner = pairs["qwen2"]
    res = svd_rank(source=DeltaSource(base=base, reasoner=reasoner), output=tmp_path / "f.safetensors",
                   options=_opts(rank=2, drop_unfactored=True, plot=True))
    assert res.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"14 factored, 0 kept full, {len(res.tensors) - 14} dropped" in res.table()
    with safe_open(res.output, "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["tvtool.kind"] == "factored-delta"
    assert json.loads(meta["tvtool.base"])["source"] == str(base)
    assert json.loads(meta["tvtool.low_rank"])["rank"] == 2
    dropped = {s["name"] for s in json.loads(meta["tvtool.skipped"])}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
            "model.layers.1.self_attn.v_proj.bias"} <= dropped
    assert all(k.endswith((".lora_A", ".lora_B")) for k in keys)
    m = tvtool.materialize(source=DeltaSource(base=base, delta=res.output), output=tmp_path / "m",
                           options=tvtool.MaterializeOptions(alphas=(1.5,), progress=False))
    got, B0 = state_dict(m.folders[1.5]), state_dict(base)
    assert_bit_equal(got, B0, sorted(dropped))
    assert not torch.equal(got["model.layers.0.mlp.up_proj.weight"], B0["model.layers.0.mlp.up_proj.weight"])
    assert (m.folders[1.5] / "tokenizer.json").read_bytes() == (reasoner / "tokenizer.json").read_bytes()


def test_refactoring_a_delta_file_and_a_folder_output(llama, tmp_path):
    base, reasoner = llama
    d = tvtool.delta(base=base, reasoner=reasoner, output=tmp_path / "d.safetensors",
                     options=tvtool.DeltaOptions(dtype="float32", progress=False))
    a = svd_rank(source=DeltaSource(delta=d.output), output=tmp_path / "fa", options=_opts(rank=3, method="exact",
                                                                       include=r"embed_tokens|proj"))
    b = svd_rank(source=DeltaSource(base=base, reasoner=reasoner), output=tmp_path / "fb.safetensors",
                 options=_opts(rank=3, method="exact", include=r"embed_tokens|proj"))
    assert (tmp_path / "fa" / "config.json").is_file() and a.report_path == tmp_path / "fa" / "lowrank.json"
    ta = {t.name: t for t in a.tensors}
    assert ta["model.embed_tokens.weight"].kind == "factored" and ta["lm_head.weight"].kind == "full"
    for t in b.tensors:
        assert ta[t.name].kind == t.kind and ta[t.name].rank == t.rank
    report = json.loads(a.report_path.read_text())
    assert report["totals"]["factored"] == 15 and len(report["tensors"]) == len(a.tensors)


# -- PEFT -----------------------------------------------------------------------------------------------
def test_peft_adapter_merges_to_the_materialized_weights(pairs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, reasoner = pairs["qwen2"]
    res = svd_rank(source=DeltaSource(base=base, reasoner=reasoner), output=tmp_path / "f.safetensors",
                   options=_opts(energy=0.5, peft=str(tmp_path / "ad"), peft_alpha=(0.6, -0.5)))
    ranks = {t.rank for t in res.tensors if t.kind == "factored"}
    assert set(res.adapters) == {0.6, -0.5}
    folder = res.adapters[0.6]
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] in VLLM_RANKS and cfg["r"] >= max(ranks) and cfg["lora_alpha"] == cfg["r"]
    assert cfg["modules_to_save"] is None and cfg["bias"] == "none"
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                             "v_proj"]
    w = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    k = next(t.rank for t in res.tensors if t.name == "model.layers.0.self_attn.q_proj.weight")
    assert w[key].shape == (cfg["r"], 128) and (w[key][k:] == 0).all()  # zero-padded up to r
    card = (folder / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "peft" and "lora" in meta["tags"]
    assert "1-D (norms, biases)" in card and "q_proj.bias" in card

    m = tvtool.materialize(source=DeltaSource(base=base, delta=res.output), output=tmp_path / "m",
                           options=tvtool.MaterializeOptions(alphas=(0.6,), dtype="float32", progress=False))
    mat = state_dict(m.folders[0.6])
    B0 = state_dict(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, folder).merge_and_unload().state_dict()
    factored = {t.name for t in res.tensors if t.kind == "factored"}
    for n in B0:
        if n in factored:  # θ1 + B_α·A (PEFT, fp32) vs θ1 + α·(B·A) (materialize, fp32): rounding order only
            torch.testing.assert_close(merged[n], mat[n], rtol=0, atol=1e-6)
            assert not torch.equal(merged[n], B0[n].float())
        else:  # the adapter cannot carry 1-D deltas or embeddings/lm_head: the base's, bit for bit
            assert torch.equal(merged[n], B0[n].float()), n
    # materialize does apply the biases the adapter loses
    bias = "model.layers.0.self_attn.q_proj.bias"
    assert not torch.equal(mat[bias], B0[bias].float())
    # and in bf16 both round to the same model up to one bf16 ulp
    for n in factored:
        a, b = merged[n].to(torch.bfloat16).float(), mat[n].to(torch.bfloat16).float()
        assert ((a - b).abs() <= torch.finfo(torch.bfloat16).eps * a.abs().clamp_min(1e-30) * 2).all()


def test_adapter_card_yaml_names_a_hub_base():
    shares = {"kept": 0.5, "truncation": 0.1, "not_carried": 0.4, "not_carried_by_kind": {"1-D (norms, biases)": 0.4},
              "not_carried_tensors": ["model.norm.weight"]}
    card = adapter_card(alpha=0.6, rank=8, base={"source": "org/base", "repo_id": "org/base"}, shares=shares,
                        meta={"tvtool.low_rank": json.dumps({"rank": 2}),
                              "tvtool.reasoner": json.dumps({"source": "org/r1"})}, targets=["q_proj"])
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "org/base" and meta["library_name"] == "peft"
    assert meta["tvtool"]["alpha"] == 0.6 and "40.000% of ‖Δ‖²" in card


# -- vLLM -------------------------------------------------------------------------------------------------
def _greedy(llm, prompts: list[list[int]], n: int, lora=None) -> list[list[int]]:
    """vLLM's own greedy ids for token-id prompts (no tvtool in between), optionally through a LoRA."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), lora_request=lora,
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.vllm
def test_vllm_serves_adapters_like_the_materialized_low_rank_model(vengine, tmp_path):
    """Two α adapters on one engine; α=12 (extrapolated, so greedy output moves away from the base) must match
    vLLM on θ1 + 12·B·A materialized in float32; α=1 must match transformers on θ1 + B·A. The session engine
    holds each model by an in-place load (equal to a fresh engine: tests/engine/test_engine.py)."""
    from transformers import AutoModelForCausalLM
    from vllm.lora.request import LoRARequest

    base, reasoner = vengine.base, vengine.reasoner
    res = svd_rank(source=DeltaSource(base=base, reasoner=reasoner), output=tmp_path / "f.safetensors",
                   options=_opts(rank=4, drop_unfactored=True, peft=str(tmp_path / "ad"), peft_alpha=(12.0, 1.0)))
    m = tvtool.materialize(source=DeltaSource(base=base, delta=res.output), output=tmp_path / "m",
                           options=tvtool.MaterializeOptions(alphas=(12.0, 1.0), dtype="float32", progress=False))
    prompts, n = [[1, 5, 9, 13, 40], [1, 7, 7, 30], [1, 100, 42], [1, 60, 61, 62, 63, 64]], 10
    e = vengine.engine
    e.load_weights(path=base)
    lora = {name: _greedy(e.llm, prompts, n, LoRARequest(f"lowrank-{name}", 900 + i, str(path)) if path else None)
            for i, (name, path) in enumerate([("", None), ("a12", res.adapters[12.0]), ("a1", res.adapters[1.0])])}
    e.load_weights(path=m.folders[12.0])
    merged = _greedy(e.llm, prompts, n)
    assert lora["a12"] == merged
    assert lora["a12"] != lora[""]  # not vacuous: the adapter changes the greedy output
    model = AutoModelForCausalLM.from_pretrained(m.folders[1.0], dtype=torch.float32)
    for ids, out in zip(prompts, lora["a1"]):
        ref = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=3)[0, len(ids):].tolist()
        assert out == ref


# -- errors -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, message", [
    (dict(rank=0), "rank must be a positive integer, got 0 (--rank)"),
    (dict(rank=65), "rank 65 exceeds min(shape) = 64 of tensor 'model.layers.0.self_attn.k_proj.weight' (64, 128) "
                    "(--rank). Lower --rank, or --exclude that tensor"),
    (dict(energy=1.5), "energy must be in (0, 1], got 1.5 (--energy). E.g. 0.9 keeps 90% of ‖Δ‖² per tensor"),
    (dict(energy=0.0), "energy must be in (0, 1], got 0.0 (--energy). E.g. 0.9 keeps 90% of ‖Δ‖² per tensor"),
    (dict(), "give exactly one of --rank and --energy. E.g. --rank 32 or --energy 0.9"),
    (dict(rank=4, energy=0.9), "give exactly one of --rank and --energy. E.g. --rank 32 or --energy 0.9"),
    (dict(rank=4, include="nothing-matches"), "no 2-D tensor is selected for factorization (--include "
                                              "'nothing-matches' --exclude None). Loosen --include/--exclude "
                                              "(embeddings/lm_head need an explicit --include)"),
])
def test_bad_options_are_one_line_errors(llama, tmp_path, kw, message):
    base, reasoner = llama
    with pytest.raises(OptionsError) as e:
        svd_rank(source=DeltaSource(base=base, reasoner=reasoner),
                 output=tmp_path / "f.safetensors", options=_opts(**kw))
    assert str(e.value) == message
    assert not list(tmp_path.iterdir())  # nothing written


def test_delta_without_2d_tensors_is_an_error(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file({"norm.weight": torch.ones(4)}, path, metadata={"format": "pt", "tvtool.kind": "delta"})
    with pytest.raises(CheckpointError) as e:
        svd_rank(source=DeltaSource(delta=path), output=tmp_path / "f.safetensors", options=_opts(rank=1))
    assert str(e.value) == (f"the delta has no 2-D tensors to factorize ({path}). "
                            "Give a delta of a transformer checkpoint")


def test_needs_a_delta_or_a_pair(llama, tmp_path):
    with pytest.raises(OptionsError) as e:
        svd_rank(source=None, output=tmp_path / "f.safetensors", options=_opts(rank=1))
    assert str(e.value) == "give either a DELTA or both --base and --reasoner. Δ comes from a delta file or a " \
                           "base/reasoner pair"
