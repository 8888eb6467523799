"""`eval --apply lora`: every α of a LoRA valve in one generate call per batch, the token ids of one call per α."""

from __future__ import annotations

import json

import pytest

from helpers import assert_one_line_error, cli

from tvtool.engine.engine import Engine
from tvtool.engine.options import EngineOptions, SamplingOptions
from tvtool.engine.prompting import PromptOptions
from tvtool.evaluation.data import load_problems
from tvtool.evaluation.evaluate import evaluate
from tvtool.evaluation.runs import EvalOptions
from tvtool.lowrank.alpha_adapter import alpha_adapters, open_valve
from tvtool.toy import ASSET_DIR, REASONER_DIR

VALVE = ASSET_DIR / "valves" / "plusplus"
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
N, BATCH = 24, 8
SAMPLING = SamplingOptions(max_tokens=200)
PROMPT = PromptOptions(instruction="")


class Counting:
    """The engine, recording each generate call: (number of prompts, adapters in it)."""

    def __init__(self, engine):
        self._e, self.calls = engine, []

    def __getattr__(self, name):
        return getattr(self._e, name)

    def generate(self, **kw):
        self.calls.append((len(kw["prompts"]), len(set(kw.get("loras") or [kw.get("lora")]))))
        return self._e.generate(**kw)


@pytest.mark.vllm
def test_lora_sweep_is_one_call_per_batch_with_the_ids_of_one_call_per_alpha(tmp_path):
    eo = EngineOptions(dtype="float32", max_model_len=256, enforce_eager=True, cpu_kv_cache_gb=1, enable_lora=True,
                       max_lora_rank=8, max_loras=len(ALPHAS))
    adapters = alpha_adapters(open_valve(VALVE), ALPHAS)  # the cache evaluate uses (TVTOOL_CACHE, conftest)
    problems = list(load_problems(dataset="toy", limit=N))
    with Engine(model=REASONER_DIR, options=eo) as engine:
        prompts = engine.prompts(questions=[p.question for p in problems], options=PROMPT)
        sequential = {a: [o[0].token_ids for o in engine.generate(prompts=prompts, sampling=SAMPLING,
                                                                  lora=adapters[a], add_special_tokens=False)]
                      for a in ALPHAS}  # today's path: one call per α
        base = [o[0].token_ids for o in engine.generate(prompts=prompts, sampling=SAMPLING, add_special_tokens=False)]
        counting = Counting(engine)
        res = evaluate(base=REASONER_DIR, delta=VALVE, alphas=ALPHAS, engine=counting, output=tmp_path / "o",
                       options=EvalOptions(dataset="toy", limit=N, apply="lora", batch_size=BATCH, progress=False),
                       prompt=PROMPT, sampling=SAMPLING)
    assert counting.calls == [(BATCH * len(ALPHAS), len(ALPHAS))] * (N // BATCH)  # every α in each call
    assert [r.alpha for r in res.runs] == list(ALPHAS)
    for a in ALPHAS:
        rows = {r["id"]: r for r in map(json.loads, (tmp_path / "o" / f"alpha-{a:g}" / "toy" / "samples.jsonl")
                                        .read_text().splitlines())}
        assert [tuple(rows[p.id]["token_ids"]) for p in problems] == sequential[a], a  # greedy: token for token
        run = json.loads((tmp_path / "o" / f"alpha-{a:g}" / "toy" / "run.json").read_text())
        assert run["settings"]["model"]["apply"] == "lora" and run["settings"]["model"]["alpha"] == a
        assert run["settings"]["lora"] == str(adapters[a])
    assert sequential[0.0] == base  # α = 0 (B = 0) gives the base model's tokens
    lengths = [res.runs[i].summary["mean_tokens"] for i in range(len(ALPHAS))]
    assert lengths[-1] < 0.5 * lengths[0]  # the valve shortens the chain


def test_lora_results_are_not_taken_for_swap_results(tmp_path):
    out = tmp_path / "o"
    run = out / "alpha-1" / "toy"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"record": {"stage": "eval", "options": {"model": {"apply": "lora"}},
                                                         "inputs": {}, "fingerprint": "0" * 64}}))
    r = cli("eval", "--base", REASONER_DIR, "--delta", VALVE, "--alpha", "1", "--dataset", "toy", "--limit", 2,
            "-o", out)
    assert r.exit_code != 0 and "the output folder holds results made with other settings or inputs" in r.stderr


def test_apply_lora_needs_an_alpha_sweep(tmp_path):
    assert_one_line_error(cli("eval", "--model", REASONER_DIR, "--apply", "lora", "--dataset", "toy", "-o", tmp_path),
                          "--apply lora applies to an α sweep (--apply lora). Pass --base with --delta VALVE and "
                          "--alpha")
