"""α-scaled adapters of a valve (what `tvtool serve` and `eval --apply lora` give vLLM), against PEFT and float64."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_one_line_error, cli
from tiny import state_dict

from tvtool.errors import CheckpointError, OptionsError
from tvtool.engine.serve_plan import factored_valve
from tvtool.lowrank.alpha_adapter import RECORD, adapter_folder, alpha_adapter, alpha_adapters, open_valve
from tvtool.lowrank.peft_adapter import VLLM_RANKS, write_peft_adapters
from tvtool.lowrank.svd import LowRankOptions, svd_rank

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def patterned(llama, tmp_path_factory):
    """A PEFT adapter with rsLoRA, an alpha_pattern and a rank_pattern (what vLLM may not honour)."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base, _ = llama
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(target_modules=TARGETS, lora_dropout=0.0, r=4, lora_alpha=8, use_rslora=True,
                     alpha_pattern={"q_proj": 32}, rank_pattern={"v_proj": 2})
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = tmp_path_factory.mktemp("patterned") / "adapter"
    peft_model.save_pretrained(path)
    return path


def _peft_delta(base, adapter) -> dict[str, torch.Tensor]:
    """PEFT's own merge minus the base, in float32: Δ of every adapted weight (the independent reference)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    b = state_dict(base)
    return {n: merged[n].double() - b[n].double() for n in b if any(f".{t}." in n for t in TARGETS)}


@pytest.mark.parametrize("alpha", [1.0, 0.37, -0.5])
def test_alpha_adapter_is_alpha_times_the_valve_under_peft(patterned, llama, tmp_path, alpha):
    base, _ = llama
    folder = alpha_adapter(open_valve(patterned), alpha, cache=tmp_path)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 8 and cfg["r"] in VLLM_RANKS  # ranks 4 and 2 padded to one rank, s = 1
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {} and not cfg["use_rslora"]
    ref, ours = _peft_delta(base, patterned), _peft_delta(base, folder)
    assert set(ours) == set(ref)
    for n in ref:  # PEFT reads the α adapter with scale 1: Δ_α = α·Δ up to float32 rounding
        torch.testing.assert_close(ours[n], alpha * ref[n], rtol=1e-5, atol=1e-7)
    w = load_file(folder / "adapter_model.safetensors")
    v_a = next(t for n, t in w.items() if "v_proj.lora_A" in n)
    assert v_a.shape[0] == 8 and torch.count_nonzero(v_a[2:]) == 0  # rank 2 zero-padded


def test_b_is_scaled_once_in_float32(patterned, tmp_path):
    valve = open_valve(patterned)
    w = load_file(alpha_adapter(valve, 0.3, cache=tmp_path) / "adapter_model.safetensors")
    src = load_file(patterned / "adapter_model.safetensors")
    m = next(m for m in valve.modules if m.module.endswith("q_proj"))
    key = f"base_model.model.{m.module}.lora_B.weight"
    k = src[key].shape[1]
    expected = (src[key].float() * (0.3 * m.scale)).to(src[key].dtype)  # one product, rounded once
    assert torch.equal(w[key][:, :k], expected) and m.scale == pytest.approx(32 / 4 ** 0.5)


def test_factored_delta_adapters_are_svd_rank_peft_adapters(llama, tmp_path):
    base, reasoner = llama
    f = tmp_path / "f.safetensors"
    svd_rank(base=base, reasoner=reasoner, output=f, options=LowRankOptions(rank=4, progress=False))
    ours = alpha_adapter(open_valve(f), 0.6, cache=tmp_path / "cache")
    theirs = write_peft_adapters(factored=f, output=tmp_path / "peft", alphas=(0.6,))[0.6]
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    assert 0 < open_valve(f).not_carried < 1  # norms stay full in the factored delta: a LoRA leaves them out


def test_adapters_are_cached_by_content_and_alpha(patterned, tmp_path):
    valve = open_valve(patterned)
    got = alpha_adapters(valve, (0.0, 0.5, 1.0, 0.5), cache=tmp_path)
    assert sorted(got) == [0.0, 0.5, 1.0]
    zero = load_file(got[0.0] / "adapter_model.safetensors")  # α = 0: B = 0, the base's outputs exactly
    assert all(torch.count_nonzero(t) == 0 for n, t in zero.items() if "lora_B" in n)
    assert got[0.5] == adapter_folder(valve, 0.5, cache=tmp_path) and (got[0.5] / RECORD).is_file()
    stamp = os.stat(got[0.5] / "adapter_model.safetensors").st_mtime_ns
    assert alpha_adapter(valve, 0.5, cache=tmp_path) == got[0.5]
    assert os.stat(got[0.5] / "adapter_model.safetensors").st_mtime_ns == stamp  # re-used, not rewritten
    edited = tmp_path / "edited"
    shutil.copytree(patterned, edited)
    w = load_file(edited / "adapter_model.safetensors")
    from safetensors.torch import save_file

    save_file({n: t * 2 for n, t in w.items()}, edited / "adapter_model.safetensors", metadata={"format": "pt"})
    other = alpha_adapter(open_valve(edited), 0.5, cache=tmp_path)
    assert other != got[0.5]  # other bytes, another key: never served from the stale folder


def test_a_full_delta_or_a_model_is_refused_with_the_command_that_factors_it(llama, f32_deltas, tmp_path):
    base, reasoner = llama
    with pytest.raises(OptionsError) as e:
        open_valve(f32_deltas["llama"])
    assert str(e.value) == (f"the valve is a full-rank delta, not a LoRA adapter or a factored delta "
                            f"({f32_deltas['llama']}). Factor it first: `tvtool svd-rank {f32_deltas['llama']} "
                            f"--energy 0.9 -o valve.safetensors` and serve that, or pass --rank R to factor it here "
                            f"(cached)")
    with pytest.raises(OptionsError, match="a model \\(a reasoner"):
        open_valve(reasoner)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a LoRA adapter, a factored delta or a model"):
        open_valve(tmp_path / "empty")


def test_rank_factors_a_reasoner_once(llama, tmp_path):
    base, reasoner = llama
    f = factored_valve(valve=reasoner, base=base, rank=4, cache=tmp_path, progress=False)
    valve = open_valve(f)
    assert valve.kind == "factored" and valve.rank == 8 and valve.not_carried > 0  # norms dropped, reported
    stamp = os.stat(f).st_mtime_ns
    assert factored_valve(valve=reasoner, base=base, rank=4, cache=tmp_path, progress=False) == f
    assert os.stat(f).st_mtime_ns == stamp  # svd-rank's record matched: re-used
    assert factored_valve(valve=reasoner, base=base, rank=2, cache=tmp_path, progress=False) != f


def test_eval_apply_lora_refuses_a_reasoner_sweep(llama, tmp_path):
    base, reasoner = llama
    assert_one_line_error(
        cli("eval", "--base", base, "--reasoner", reasoner, "--alpha", "0,1", "--apply", "lora", "-o", tmp_path / "o"),
        "--apply lora serves one LoRA valve (a PEFT adapter or a factored delta) per α (--apply lora). Pass --delta "
        "VALVE (no --reasoner, --include/--exclude, operators or --prompt-budget), or use --apply swap")
