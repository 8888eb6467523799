"""A materialized α folder loads in vLLM (CPU) and generates what transformers generates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tvtool
from tvtool.vectors.source import DeltaSource


@pytest.mark.vllm
def test_materialized_folder_runs_in_vllm(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    base, reasoner = llama
    res = tvtool.materialize(source=DeltaSource(base=base, reasoner=reasoner), output=tmp_path,
                             options=tvtool.MaterializeOptions(alphas=(0.6,), progress=False, max_shard_size="200KB"))
    folder = res.folders[0.6]
    prompts = [[1, 5, 9, 13, 40], [1, 7, 7, 30]]
    p = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "vllm_greedy.py"), str(folder),
                        json.dumps(prompts), "8"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for ids, out in zip(prompts, got):
        ref = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                             pad_token_id=3)[0, len(ids):].tolist()
        assert out == ref
