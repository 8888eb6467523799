"""A materialized α folder, sharded as real checkpoints are, starts a fresh vLLM engine (CPU) that generates
what transformers generates."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.mark.vllm
def test_materialized_folder_runs_in_vllm(vengine):
    """The session engine was started fresh on a materialized sharded folder; its first greedy tokens are
    those of transformers on that folder."""
    from transformers import AutoModelForCausalLM

    folder = vengine.materialized
    assert len(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    n = 8
    for text, got in zip(vengine.prompts, vengine.fresh_ids):
        ids = vengine.engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        ref = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             pad_token_id=3)[0, len(ids):].tolist()
        assert list(got[:n]) == ref
