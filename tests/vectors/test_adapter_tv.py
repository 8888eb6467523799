"""PEFT LoRA adapters as task vectors, checked against PEFT's own merge (merge_and_unload)."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import assert_one_line_error, bits, cli
from tiny import state_dict

from tvtool import MaterializeOptions, materialize
from tvtool.errors import CheckpointError
from tvtool.vectors.taskvector import TaskVector
from tvtool.vectors.source import DeltaSource

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_merged(base, adapter) -> dict[str, torch.Tensor]:
    """PEFT's merge of `adapter` into the float32 base: the independent reference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _random_adapter(base, path, *, seed: int, **config):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(target_modules=TARGETS, lora_dropout=0.0, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(path)
    return path


def _within_one_rounding(ours: torch.Tensor, ref32: torch.Tensor) -> None:
    """`ours` (bf16) is one of the two bf16 neighbours of the float32 reference."""
    r = ref32.to(ours.dtype)
    step = (bits(r).to(torch.int32) - bits(ours).to(torch.int32)).abs()
    assert int(step.max()) <= 1, f"{int((step > 1).sum())} elements further than one rounding"


def test_alpha_one_equals_peft_merge_and_unload(lora_pair, llama, tmp_path):
    pytest.importorskip("peft")
    base, _ = llama
    adapter = lora_pair.adapters[0]
    ref = _peft_merged(base, adapter)
    base_sd = state_dict(base)
    bf16 = materialize(source=DeltaSource(base=base, delta=adapter), output=tmp_path / "bf16",
                       options=MaterializeOptions(alphas=(1.0,), progress=False)).folders[1.0]
    f32 = materialize(source=DeltaSource(base=base, delta=adapter), output=tmp_path / "f32",
                      options=MaterializeOptions(alphas=(1.0, 0.0), dtype="float32", progress=False)).folders
    ours16, ours32, zero = state_dict(bf16), state_dict(f32[1.0]), state_dict(f32[0.0])
    assert set(ours16) == set(base_sd)
    changed = [n for n in base_sd if any(f".{t}." in n for t in TARGETS)]
    assert changed and all(not torch.equal(ours16[n], base_sd[n]) for n in changed)
    for n in base_sd:
        _within_one_rounding(ours16[n], ref[n])  # the base's dtype: rounded once
        torch.testing.assert_close(ours32[n], ref[n], rtol=2e-6, atol=1e-7)  # float32: up to float32 rounding
        assert torch.equal(zero[n], base_sd[n].float())  # α = 0 is the base
        if n not in changed:
            assert torch.equal(ours16[n], base_sd[n])  # Δ = 0 off the adapted modules
    assert json.loads((bf16 / "config.json").read_text())["model_type"] == "llama"  # the base's config


def test_rslora_and_alpha_pattern_scale_like_peft(llama, tmp_path):
    pytest.importorskip("peft")
    base, _ = llama
    adapter = _random_adapter(base, tmp_path / "rs", seed=3, r=8, lora_alpha=16, use_rslora=True,
                              alpha_pattern={"q_proj": 32}, rank_pattern={"v_proj": 4})
    ref, base_sd = _peft_merged(base, adapter), state_dict(base)
    tv = TaskVector.load(adapter)
    assert tv.provenance()["zero_elsewhere"] and len(tv.names()) == 2 * len(TARGETS)
    for n in tv.names():
        torch.testing.assert_close(base_sd[n].float() + tv.get(n), ref[n], rtol=2e-6, atol=1e-7)
    q = next(n for n in tv.names() if "q_proj" in n)
    v = next(n for n in tv.names() if "v_proj" in n)
    assert tv.terms[0][1].scale[q] == pytest.approx(32 / 8 ** 0.5)
    assert tv.terms[0][1].scale[v] == pytest.approx(16 / 4 ** 0.5)


def test_svd_rank_of_an_adapter_keeps_it_a_task_vector(lora_pair, llama, tmp_path):
    from tvtool.lowrank.svd import LowRankOptions, svd_rank

    base, _ = llama
    adapter = lora_pair.adapters[0]
    svd_rank(source=DeltaSource(delta=adapter), output=tmp_path / "f.safetensors",
             options=LowRankOptions(rank=8, method="exact", dtype="float32", progress=False))
    a = materialize(source=DeltaSource(base=base, delta=adapter), output=tmp_path / "a",
                    options=MaterializeOptions(alphas=(0.5,), dtype="float32", progress=False)).folders[0.5]
    b = materialize(source=DeltaSource(base=base, delta=tmp_path / "f.safetensors"), output=tmp_path / "b",
                    options=MaterializeOptions(alphas=(0.5,), dtype="float32", progress=False)).folders[0.5]
    sa, sb = state_dict(a), state_dict(b)
    for n in sa:
        torch.testing.assert_close(sa[n], sb[n], rtol=1e-5, atol=1e-6)


def test_adapters_that_are_not_plain_lora_are_refused(lora_pair, llama, tmp_path):
    import shutil

    base, _ = llama
    dora = tmp_path / "dora"
    shutil.copytree(lora_pair.adapters[0], dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(CheckpointError):
        TaskVector.load(dora)
    assert_one_line_error(cli("materialize", base, "--delta", dora, "--alpha", "1", "-o", tmp_path / "o"),
                          f"DoRA adapters are not supported as task vectors ({dora / 'adapter_config.json'}). "
                          "Train plain LoRA (tvtool train does), or merge with peft's merge_and_unload")
