"""Summary statistics recomputed from samples.jsonl, re-scoring under another answer rule, reflections."""

from __future__ import annotations

import json

import pytest

from tvtool.engine.options import EngineOptions, SamplingOptions
from tvtool.evaluation.results import read_samples
from tvtool.evaluation.runs import EvalOptions, run_one
from tvtool.evaluation.reflection import REFLECTION_PHRASES, count_reflections

# CoT-Valve Fig. 4 (the same GSM8K question, long to short)
QWQ_257 = ("So, Amanda has 14 notebooks now. Wait a minute, let me double-check that. She had 10, ordered 6 more, "
           "so that's 10 + 6 = 16. Then lost 2, so 16 - 2 = 14. Yeah, that seems right. Alternatively, maybe I "
           "can think of it differently.")
INTERP_133 = "16 - 2 = 14 notebooks. Therefore, Amanda now has 14 notebooks."


@pytest.mark.parametrize("text,n", [
    (QWQ_257, 3),  # "Wait", "double-check", "Alternatively"
    (INTERP_133, 0),
    ("Hmm. But wait, let me verify: 2+2=4. Let's double-check. Let’s verify.", 5),  # "but wait" counts once
    ("The waiter waited; a re-checked hmmm value.", 0),  # whole words only
    ("WAIT. Wait! wait?", 3),
])
def test_reflection_counts(text, n):
    assert count_reflections(text) == n


def test_documented_phrases_are_all_counted():
    for p in REFLECTION_PHRASES:
        assert count_reflections(f"x {p} y") == 1, p


class _Canned:
    """A stand-in engine (no vLLM) returning fixed responses per question."""

    options = EngineOptions()
    tokenizer = None

    def __init__(self, answers: dict[str, tuple[str, str]]):
        self.answers, self.calls = answers, 0

    def sampling_record(self, sampling):
        return {"max_tokens": sampling.max_tokens}

    def prompts(self, *, questions, options):
        return list(questions)

    def generate(self, *, prompts, sampling, lora=None, add_special_tokens=True):
        from tvtool.engine.options import Sample

        self.calls += 1
        return [[Sample(index=0, token_ids=tuple(range(len(self.answers[q][0].split()))), text=self.answers[q][0],
                        finish_reason=self.answers[q][1])] for q in prompts]


def _problems():
    from tvtool.evaluation.data import load_problems

    return load_problems(dataset="gsm8k", limit=5)


def _canned(probs):
    g = [p.gold for p in probs]
    texts = [(f"Wait, so \\boxed{{{g[0]}}}", "stop"),                            # boxed, right, 1 reflection
             (f"Hmm, hmm. The result is {g[1]}. I think that's the answer.", "stop"),  # no box, right (fallback)
             ("so \\boxed{-1}", "stop"),                                       # boxed, wrong
             (f"Let me check: {g[3]} and then \\boxed{{{g[3]}", "length"),      # cut-off box, fallback right
             ("Alternatively, wait, but wait", "length")]                      # nothing, wrong, 3 reflections
    return _Canned({p.question: t for p, t in zip(probs, texts)})


def test_summary_fields_recompute_from_samples(tmp_path):
    probs = _problems()
    s = run_one(engine=_canned(probs), problems=probs, folder=tmp_path, model={"path": "m"},
                sampling=SamplingOptions(max_tokens=8), options=EvalOptions(progress=False))
    recs = read_samples(tmp_path / "samples.jsonl")
    assert [r["correct"] for r in recs] == [True, True, False, True, False]
    # recomputed here from the records, by hand
    boxed = [r for r in recs if "\\boxed{" in r["response"] and r["finish_reason"] == "stop"]
    assert s["no_box_share"] == pytest.approx(100 * (len(recs) - len(boxed)) / len(recs)) == 60.0
    assert s["length_share"] == pytest.approx(100 * sum(r["finish_reason"] == "length" for r in recs) / 5) == 40.0
    assert s["boxed_accuracy"] == pytest.approx(100 * sum(r["correct"] for r in boxed) / len(boxed)) == 50.0
    assert s["reflections_mean"] == pytest.approx((1 + 2 + 0 + 1 + 3) / 5)
    assert s == json.loads((tmp_path / "summary.json").read_text())
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["scoring"] == {"answer_rule": "paper", "think_end": None, "think_end_from": "not found",
                              "difficulty_field": "steps"}  # GSM8K's proxy (tvtool.evaluation.difficulty)
    assert {r["answer_rule"] for r in recs} == {"paper"}


def test_another_answer_rule_rescores_without_generating(tmp_path):
    probs = _problems()
    eng = _canned(probs)
    kw = dict(problems=probs, folder=tmp_path, model={"path": "m"}, sampling=SamplingOptions(max_tokens=8))
    paper = run_one(engine=eng, options=EvalOptions(progress=False), **kw)
    strict = run_one(engine=eng, options=EvalOptions(progress=False, answer_rule="boxed-only"), **kw)
    assert eng.calls == 1  # the second run generated nothing
    assert (paper["accuracy"], strict["accuracy"]) == (60.0, 20.0)  # the fallback answered 2 of 5
    assert paper["boxed_accuracy"] == strict["boxed_accuracy"] == 50.0
    recs = read_samples(tmp_path / "samples.jsonl")
    assert [r["extracted"] for r in recs][1:4] == [None, "-1", None]
    assert {r["answer_rule"] for r in recs} == {"boxed-only"}
    assert json.loads((tmp_path / "run.json").read_text())["scoring"]["answer_rule"] == "boxed-only"
    assert run_one(engine=eng, options=EvalOptions(progress=False), **kw) == paper  # and back
