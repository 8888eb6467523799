"""Session-wide vLLM engines for the generation/evaluation tests (a pytest plugin).

Engine starts are slow (~25-70 s on CPU), so the whole session shares:
- `vengine`: ONE engine started FRESH on the materialized θ1 + 0.5·Δ checkpoint of the tiny
  llama pair, written in 200 KB shards as big checkpoints are (float32, LoRA enabled, rank 8). Its first greedy outputs, taken before any
  in-place load, are the "fresh engine" reference for the in-place α tests; afterwards
  tests swap weights in place (load_alpha / load_weights) as they need.
- `lora_pair`: a PEFT rank-8 adapter with random non-zero weights on the tiny llama base,
  and the PEFT-merged model saved in float32 (the LoRA test starts a second engine on it).
Load with `pytest_plugins = ["engine_setup"]` in tests/conftest.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ALPHA = 0.5
PROBES = ["tom has 3 apples and buys 2 more how many apples", "what is 7 + 5", "ann gives bob one cat"]
MAX_TOKENS = 24


def engine_options(**kw):
    from tvtool.engine.options import EngineOptions

    base = dict(dtype="float32", enforce_eager=True, cpu_kv_cache_gb=1, max_num_seqs=16)
    return EngineOptions(**{**base, **kw})


@dataclass
class VEngine:
    engine: object  # tvtool.engine.engine.Engine
    base: Path
    reasoner: Path
    materialized: Path  # θ1 + ALPHA·Δ written by tvtool.merge.materialize, in several shards
    prompts: list[str]  # PROBES through the engine's chat template
    fresh_ids: list[tuple[int, ...]]  # greedy ids of the fresh engine on `materialized`


@pytest.fixture(scope="session")
def vengine(pairs, tmp_path_factory):
    pytest.importorskip("vllm")
    from tvtool import DeltaSource, MaterializeOptions, materialize
    from tvtool.engine.engine import Engine
    from tvtool.engine.options import SamplingOptions
    from tvtool.engine.prompting import PromptOptions

    base, reasoner = pairs["llama"]
    out = tmp_path_factory.mktemp("vengine")
    res = materialize(source=DeltaSource(base=base, reasoner=reasoner), output=out,
                      options=MaterializeOptions(alphas=(ALPHA,), progress=False, max_shard_size="200KB"))
    mat = res.folders[ALPHA]
    eng = Engine(model=mat, options=engine_options(enable_lora=True, max_lora_rank=8))
    prompts = eng.prompts(questions=PROBES, options=PromptOptions())
    outs = eng.generate(prompts=prompts, sampling=SamplingOptions(max_tokens=MAX_TOKENS), add_special_tokens=False)
    yield VEngine(eng, base, reasoner, mat, prompts, [o[0].token_ids for o in outs])
    eng.close()


@dataclass
class LoraPair:
    adapters: list[Path]  # rank-8 PEFT adapters on the llama base, random non-zero weights
    merged: Path  # adapters[0] merged into the base (merge_and_unload), saved in float32


@pytest.fixture(scope="session")
def lora_pair(pairs, tmp_path_factory):
    pytest.importorskip("peft")
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, _ = pairs["llama"]
    out = tmp_path_factory.mktemp("lora")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapters = []
    for seed in (1, 2):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        path = out / f"adapter-{seed}"
        peft_model.save_pretrained(path)
        adapters.append(path)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapters[0]).merge_and_unload()
    merged_dir = out / "merged"
    merged.save_pretrained(merged_dir)
    AutoTokenizer.from_pretrained(base).save_pretrained(merged_dir)
    return LoraPair(adapters, merged_dir)


class Crash(Exception):
    """Stands for a kill in the middle of a run."""


class Flaky:
    """The engine, but generate() raises `Crash` after `ok` calls; counts the prompts it generated."""

    def __init__(self, engine, ok: int):
        self._e, self.ok, self.prompts_seen = engine, ok, 0

    def __getattr__(self, name):
        return getattr(self._e, name)

    def generate(self, **kw):
        if self.ok == 0:
            raise Crash
        self.ok -= 1
        self.prompts_seen += len(kw["prompts"])
        return self._e.generate(**kw)


class RecordingEngine:
    """A stand-in for the vLLM engine (no vLLM): remembers what it generated for which weights."""

    made: list["RecordingEngine"] = []

    def __init__(self, options):
        from tvtool.engine.options import EngineOptions

        self.options, self.weights, self.tokenizer, self.starts = options or EngineOptions(), {"kind": "dummy"}, None, 0
        self.generated: list[tuple[str, str]] = []  # (weights held, prompt)
        RecordingEngine.made.append(self)

    @classmethod
    def for_source(cls, *, source, options=None, lazy=True, **kw):
        return cls(options)

    def load_alpha(self, *, source, config, force=False):
        from tvtool.engine.engine import alpha_weights

        self.weights = alpha_weights(source=source, config=config)
        return {"path": "streaming", "seconds": 0.0, "bytes_read": 0, "storage_bytes": 0, "workers": 1}

    def hold_folder(self, *, path):
        self.weights = {"kind": "folder", "path": str(path)}
        return True

    def sampling_record(self, sampling):
        return {"max_tokens": sampling.max_tokens, "n": sampling.n, "temperature": sampling.temperature}

    def prompts(self, *, questions, options):
        return list(questions)

    def check_prompts(self, *, prompts, add_special_tokens=True):
        pass

    def generate(self, *, prompts, sampling, lora=None, add_special_tokens=True):
        from tvtool.engine.options import Sample

        self.generated += [(json.dumps(self.weights, sort_keys=True), p) for p in prompts]
        return [[Sample(index=0, token_ids=(1, 2, 3), text="so \\boxed{0}", finish_reason="stop")] for _ in prompts]

    def close(self):
        pass
