"""Trained valves in the engine: PEFT, vLLM LoRA, materialize and the in-engine α sweep agree;
the CoT-Valve toy pipeline (MixChain, ++, +P, α sweeps, Table 1) runs through every stage."""

from __future__ import annotations

import dataclasses as dc
import json
from pathlib import Path

import pytest
import torch

from engine_setup import MAX_TOKENS

from tvtool import toy
from tvtool.merge.config import MergeConfig
from tvtool.vectors.source import DeltaSource

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = ["what is 3 + 4", "tom has 5 apples and buys 2 more", "ann has 7 cat and gives one", "how many dog"]


def _pairs(path: Path) -> Path:
    """question/solution pairs in the tiny vocabulary (one fixed style of answer to learn)."""
    rows = [{"question": q, "solution": f"think step one {a} + {b} = {a + b} so the answer is {a + b} ."}
            for q, (a, b) in zip(QUESTIONS * 2, [(3, 4), (5, 2), (7, 1), (2, 2), (1, 6), (4, 4), (9, 0), (6, 3)])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _fp32_copy(base: Path, out: Path) -> Path:
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    shutil.copy(base / "generation_config.json", out / "generation_config.json")
    return out


@pytest.mark.vllm
def test_a_trained_adapter_gives_the_same_greedy_tokens_everywhere(vengine, tmp_path):
    """A valve trained a few steps on the tiny llama (float32): PEFT (transformers), vLLM serving it as
    LoRA, vLLM on `materialize --delta ADAPTER`, and vLLM with θ + 1·Δθ loaded in place."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tvtool import MaterializeOptions, materialize
    from tvtool.engine.options import SamplingOptions
    from tvtool.engine.prompting import PromptOptions, build_prompt
    from tvtool.valve.train import train
    from tvtool.valve.options import TrainOptions

    base = _fp32_copy(vengine.base, tmp_path / "base32")
    prompt = PromptOptions(instruction="")
    res = train(mode="valve", model=base, data=_pairs(tmp_path / "pairs.jsonl"), output=tmp_path / "valve",
                prompt=prompt, options=TrainOptions(rank=8, lora_alpha=16, lr=2e-2, batch_size=4, epochs=4,
                                                    threads=1, progress=False))
    adapter = res.folder
    tok = AutoTokenizer.from_pretrained(base)
    prompts = [build_prompt(question=q, tokenizer=tok, options=prompt) for q in QUESTIONS]

    def hf(model) -> list[tuple[int, ...]]:
        out = []
        for p in prompts:
            ids = tok(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                g = model.generate(ids, do_sample=False, max_new_tokens=MAX_TOKENS, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
            out.append(tuple(g[0, ids.shape[1]:].tolist()))
        return [x[:x.index(tok.eos_token_id) + 1] if tok.eos_token_id in x else x for x in out]

    plain = hf(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval())
    peft_ids = hf(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                            adapter).eval())
    assert peft_ids != plain  # the valve changes what the model writes: the comparison below can fail

    eng, sampling = vengine.engine, SamplingOptions(max_tokens=MAX_TOKENS)

    def vllm(**kw) -> list[tuple[int, ...]]:
        return [o[0].token_ids for o in eng.generate(prompts=prompts, sampling=sampling, add_special_tokens=False,
                                                      **kw)]

    eng.load_weights(path=base)
    assert vllm(lora=adapter) == peft_ids  # vLLM serves the PEFT adapter
    mat = materialize(source=DeltaSource(base=base, delta=adapter), output=tmp_path / "m",
                      options=MaterializeOptions(alphas=(1.0,), dtype="float32", progress=False)).folders[1.0]
    eng.load_weights(path=mat)
    assert vllm() == peft_ids  # materialize --delta ADAPTER
    eng.load_alpha(source=DeltaSource(base=str(base), delta=str(adapter)), config=MergeConfig(1.0))
    assert vllm() == peft_ids  # the in-engine sweep's θ + α·Δθ at α = 1
    eng.load_alpha(source=DeltaSource(base=str(base), delta=str(adapter)), config=MergeConfig(0.0))
    assert vllm() == plain


def test_the_toy_training_questions_are_new_and_disjoint_from_the_test_set():
    rows = toy.read_jsonl(path=ROOT / "recipes" / "data" / "toy-train-2000.jsonl")
    test = {r["question"] for r in toy.read_jsonl(path=toy.TEST_PATH)}
    qs = [r["question"] for r in rows]
    assert len(qs) == len(set(qs)) == 2000 and not set(qs) & test


@pytest.mark.vllm
@pytest.mark.slow
def test_the_toy_valve_pipeline_passes_through_every_stage(tmp_path):
    """recipes/toy-valve.yaml, CI-sized: 24 MixChain questions, 2 steps per valve stage, 8 test questions."""
    from tvtool.sweep.recipe import load_recipe
    from tvtool.sweep.run import SweepOptions, sweep

    r = load_recipe(ROOT / "recipes" / "toy-valve.yaml")
    r = r.model_copy(update=dict(
        alphas=(0.0, 1.0), datasets=tuple(dc.replace(d, limit=8) for d in r.datasets),
        mixchain=dc.replace(r.mixchain, limit=24, min_correct="any"),
        train=tuple(dc.replace(t, alphas=(0.0, 1.0) if t.mode == "valve++" else (1.0,),
                               options=dc.replace(t.options, max_steps=2, batch_size=8)) for t in r.train)))
    out = tmp_path / "run"
    res = sweep(recipe=r, options=SweepOptions(output=str(out), progress=False))
    mc = json.loads((out / "mixchain" / "mixchain.json").read_text())
    assert mc["dataset"]["n"] == 24 and mc["stats"]["kept"] > 0
    assert mc["sampling"]["max_tokens"] == 200  # the recipe's, within the toy's 256-token context
    for name, stages in (("plusplus", 1), ("progressive", 5)):
        rec = json.loads((out / "train" / name / "train.json").read_text())
        assert rec["steps"] == 2 * stages and (out / "train" / name / "adapter_model.safetensors").is_file()
    assert len(list((out / "train" / "progressive" / "stages").iterdir())) == 5
    assert set(res.tables) == {"toy", "toy-plusplus", "toy-progressive"}
    assert [x["alpha"] for x in res.tables["toy-plusplus"]] == [0.0, 1.0]
    report = (out / "REPORT.md").read_text()
    assert "## Table 1 (toy, greedy)" in report and "CoT-Valve++ `plusplus`" in report and "CoT-Valve+P" in report
    assert "tvtool train valve++ --model tvtool/assets/toy/reasoner" in report or "tvtool train valve++" in report
    assert str(tmp_path) not in report.split("## Recipe")[0].split("## Reproduce")[0]  # relative paths
    again = sweep(recipe=r, options=SweepOptions(output=str(out), progress=False))
    assert again.engine_starts == 0 and again.tables == res.tables  # finished stages are not redone
