"""Activation checkpointing and length-grouped micro-batches change memory and padding, not the training steps;
and the memory plan (tvtool.valve.plan) against the measured peak.

How the peak is measured on CPU: torch's profiler with profile_memory=True records every allocation and free of
torch's CPU allocator with the running total ("Total Allocated", counted from when profiling starts). Profiling
starts right after the model and its LoRA are built (the patched `build_peft_model`) and ends when training
returns, so the largest total is the peak increase over the loaded model: LoRA gradients, AdamW state,
activations, logits and temporaries — what the plan predicts beside the weights (its overhead term is for GPUs).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from valve_data import mixchain_rows, write_jsonl

from tvtool import toy
from tvtool.engine.prompting import PromptOptions
from tvtool.valve.options import TrainOptions
from tvtool.valve.train import train
from tvtool.valve.train_data import micro_batches, padding

pytest.importorskip("peft")
TOY = toy.REASONER_DIR


def test_length_groups_keep_the_step_and_cut_padding():
    lengths = [5, 90, 7, 88, 6, 91, 8, 87, 50, 52, 49, 51]
    idx = list(range(12))[::-1]
    plain = micro_batches(idx=idx, lengths=lengths, world=2, grad_accum=3)
    grouped = micro_batches(idx=idx, lengths=lengths, world=2, grad_accum=3, by_length=True)
    for parts in (plain, grouped):
        flat = [i for proc in parts for m in proc for i in m]
        assert sorted(flat) == sorted(idx) and {len(m) for proc in parts for m in proc} == {2}
    assert grouped == [[[5, 1], [9, 11], [6, 2]], [[3, 7], [8, 10], [4, 0]]]  # micro k: the k-th longest pairs
    assert padding(grouped, lengths) == (6, 590) and padding(plain, lengths) == (168, 752)
    assert micro_batches(idx=[3, 1], lengths=lengths, world=2, grad_accum=2, by_length=True) == [[[1], []], [[3], []]]


def _prompt():
    return PromptOptions(instruction="")


def test_checkpointing_and_length_groups_give_the_same_steps_and_adapter(tmp_path):
    """valve++ (β from 0.25 to 1 mixed in every batch, β = 0 kept: zero gradient): the same per-step losses and
    final adapter with --grad-checkpointing and --group-by-length (fp32; tolerance: float rounding of another
    summation order, rel 1e-5 on the losses, 1e-5 on adapter weights of size ~0.05)."""
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "mc.jsonl", mixchain_rows(8))
    base = dict(rank=8, lora_alpha=16, lr=2e-3, batch_size=8, grad_accum=2, epochs=2, threads=1, progress=False,
                skip_zero_beta=False)
    ref = train(mode="valve++", model=TOY, data=data, output=tmp_path / "ref", prompt=_prompt(),
                options=TrainOptions(**base))
    alt = train(mode="valve++", model=TOY, data=data, output=tmp_path / "alt", prompt=_prompt(),
                options=TrainOptions(**base, grad_checkpointing=True, group_by_length=True))
    assert alt.record["execution"]["grad_checkpointing"] and alt.record["execution"]["group_by_length"]
    assert alt.record["execution"]["padding_share"] < 0.6 * ref.record["execution"]["padding_share"]
    assert not alt.skipped and len(ref.losses) == len(alt.losses) == 10
    assert [x["loss"] for x in alt.losses] == pytest.approx([x["loss"] for x in ref.losses], rel=1e-5)
    a, b = load_file(ref.folder / "adapter_model.safetensors"), load_file(alt.folder / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    assert sum(float(v.abs().sum()) for k, v in a.items() if "lora_B" in k) > 1  # it trained


# --- the plan against the measured peak --------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A Llama-shaped model big enough that activations dominate (h 256, 4 layers, GQA 4/2, vocabulary 2048)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import tiny

    root = tmp_path_factory.mktemp("mem") / "model"
    cfg = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root)
    tiny.tokenizer("{% for m in messages %}{{ m['content'] }} {% endfor %}").save_pretrained(root)
    return root


def _data(path: Path, lengths: list[int]) -> Path:
    """Pairs whose solutions are `n` number words (one token each), β mixed."""
    rows = [{"question": "what is 3 + 4 ?", "solution": " ".join(str((7 * k + j) % 100) for j in range(n)),
             "beta": (1.0, 0.5, 0.25, 0.75)[k % 4]} for k, n in enumerate(lengths)]
    return write_jsonl(path, rows)


def _peak_increase(monkeypatch, **kw):
    """(peak torch CPU allocation above the loaded model, the finished train result)."""
    from torch.profiler import ProfilerActivity, profile

    import tvtool.valve.train_loop as tl

    real, prof = tl.build_peft_model, profile(activities=[ProfilerActivity.CPU], profile_memory=True)

    def build(*a, **k):
        net = real(*a, **k)
        prof.__enter__()
        return net

    monkeypatch.setattr(tl, "build_peft_model", build)
    try:
        res = train(**kw)
    finally:
        prof.__exit__(None, None, None)
    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(os.path.join(d, "trace.json"))
        events = json.loads(Path(d, "trace.json").read_text())["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"), res


WEIGHTS = ("base weights", "gathered units", "LoRA weights", "overhead")  # held before profiling, or GPU-only


@pytest.mark.parametrize("name, lengths, options", [
    ("fp32, micro-batch 4 padded to 193 tokens", [186, 150, 120, 90] * 2, dict(batch_size=4)),
    ("fp32, micro-batch 4, checkpointed", [186, 150, 120, 90] * 2, dict(batch_size=4, grad_checkpointing=True)),
    ("fp32, micro-batch 1 of 507 tokens", [500] * 2, dict(batch_size=1)),
    ("bf16 autocast, micro-batch 4, checkpointed", [186, 150, 120, 90] * 2,
     dict(batch_size=4, precision="bf16", grad_checkpointing=True)),
    ("fp32, LoRA dropout 0.1, checkpointed", [186, 150, 120, 90] * 2,
     dict(batch_size=4, dropout=0.1, grad_checkpointing=True)),
])
def test_the_plan_is_within_a_quarter_of_the_measured_peak(tmp_path, monkeypatch, model_dir, name, lengths, options):
    """Planned LoRA gradients + AdamW state + activations + logits (the plan's components but the weights and the
    GPU overhead) against the measured peak increase of two optimizer steps (the second has AdamW's state)."""
    o = TrainOptions(rank=8, lora_alpha=16, lr=1e-3, epochs=1, max_steps=2, threads=1, progress=False, **options)
    peak, res = _peak_increase(monkeypatch, mode="valve++", model=model_dir, data=_data(tmp_path / "d.jsonl", lengths),
                               output=tmp_path / "out", prompt=_prompt(), options=o)
    plan = res.record["memory_plan"]
    planned = sum(v for k, v in plan["components"].items() if not k.startswith(WEIGHTS))
    assert plan["micro_batch"] == options["batch_size"] and plan["seq_len"] == max(lengths) + 7  # prompt 6 + EOS
    assert res.record["execution"]["dtypes"] == {"base": [o.precision.replace("fp32", "float32").replace(
        "bf16", "bfloat16")], "lora": ["float32"]}  # LoRA weights (and so AdamW's state) stay fp32
    print(f"{name}: planned {planned / 2**20:.2f} MiB, measured {peak / 2**20:.2f} MiB, ratio {planned / peak:.3f}")
    assert 0.75 * peak <= planned <= 1.25 * peak, (planned, peak)
