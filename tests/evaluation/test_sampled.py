"""Sampled protocols: maj@n, pass@k and the standard error against hand-computed values; the
deepseek-r1 preset as vLLM receives it and as run.json records it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from helpers import assert_one_line_error, cli

from tvtool.engine.options import SamplingOptions, check_sampling, sampling_record
from tvtool.errors import OptionsError
from tvtool.evaluation.results import summarize
from tvtool.evaluation.sampled import majority_correct, pass_at_k, sampled_stats

TOY = Path(__file__).resolve().parents[2] / "tvtool" / "assets" / "toy"


def _recs(pid: str, answers, correct) -> list[dict]:
    return [{"id": pid, "index": i, "extracted": a, "correct": c, "num_tokens": 10, "finish_reason": "stop"}
            for i, (a, c) in enumerate(zip(answers, correct))]


# Four problems, n = 4 samples each (hand-computed values below).
SAMPLES = [
    *_recs("A", ["5", "3", "5", "3"], [True, False, True, False]),  # 2-2 tie: "5" came first → right; c = 2
    *_recs("B", ["7", "8", "8", None], [False, True, True, False]),  # "8" wins 2-1 (no answer: no vote); c = 2
    *_recs("C", ["1", "2", "3", "4"], [False, False, False, True]),  # 1-1-1-1: "1" came first → wrong; c = 1
    *_recs("D", [None, None, None, None], [False, False, False, False]),  # no answer at all → wrong; c = 0
]


def test_maj_at_n_and_pass_at_k_by_hand():
    s = sampled_stats(SAMPLES, kind="gsm8k")
    assert s["n_per_problem"] == 4
    assert s["maj_accuracy"] == pytest.approx(50.0)  # A and B
    # pass@1 = c/n: (2 + 2 + 1 + 0) / 16
    # pass@2 = 1 − C(n−c, 2)/C(4, 2): A, B: 1 − 1/6 = 5/6; C: 1 − 3/6 = 1/2; D: 0
    #        → (5/6 + 5/6 + 1/2 + 0) / 4 = 13/24
    # pass@4: A, B, C have a correct sample, D none → 3/4
    assert s["pass_at_k"] == pytest.approx({"1": 100 * 5 / 16, "2": 100 * 13 / 24, "4": 75.0})
    # shares p_i = 1/2, 1/2, 1/4, 0 (mean 5/16): sample variance (3/16² · 2 + 1/16² + 5/16²) / 3 = 44/768
    assert s["accuracy_se"] == pytest.approx(100 * math.sqrt(44 / 768) / 2)
    full = summarize(records=SAMPLES, params_b=None, kind="gsm8k")
    assert full["accuracy"] == pytest.approx(100 * 5 / 16) == pytest.approx(s["pass_at_k"]["1"])  # mean over samples


def test_numbers_vote_as_numbers_and_order_is_by_sample_index():
    f = _recs("F", ["17", "18", "18.0", "$18"], [False, True, True, True])
    assert majority_correct(f, kind="gsm8k")  # three votes for 18, written three ways
    assert not majority_correct(f, kind="math500")  # as text 1-1-1-1: the first answer, "17", wins the tie
    shuffled = [f[2], f[0], f[3], f[1]]  # records in file order; votes are counted in sample order
    assert sampled_stats(shuffled, kind="math500")["maj_accuracy"] == 0.0


def test_pass_at_k_is_the_unbiased_estimator():
    for n in (1, 2, 5, 16, 64):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n=n, c=c, k=k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_one_sample_per_problem_adds_nothing():
    one = [r for r in SAMPLES if r["index"] == 0]
    assert sampled_stats(one, kind="gsm8k") == {}
    assert "maj_accuracy" not in summarize(records=one, params_b=None, kind="gsm8k")


# --- the deepseek-r1 preset --------------------------------------------------------------------------


def test_protocol_preset_sets_decoding_and_is_recorded(tmp_path):
    s = check_sampling(SamplingOptions(protocol="deepseek-r1", n=8))
    assert (s.temperature, s.top_p, s.n) == (0.6, 0.95, 8)
    assert check_sampling(s) == s  # idempotent
    rec = sampling_record(model_dir=tmp_path, sampling=SamplingOptions(protocol="deepseek-r1", n=8))
    assert (rec["protocol"], rec["temperature"], rec["top_p"], rec["greedy"]) == ("deepseek-r1", 0.6, 0.95, False)
    assert SamplingOptions().protocol is None and sampling_record(model_dir=tmp_path, sampling=SamplingOptions())[
        "greedy"]  # greedy stays the default
    with pytest.raises(OptionsError, match="contradicts"):
        check_sampling(SamplingOptions(protocol="deepseek-r1", temperature=0.8))
    assert SamplingOptions(protocol="deepseek-r1", n=4).to_cli_args() == ["--n", "4", "--protocol", "deepseek-r1"]


def test_vllm_receives_the_preset():
    pytest.importorskip("vllm")
    from tvtool.engine.engine import Engine

    params = Engine.sampling_params(None, SamplingOptions(protocol="deepseek-r1", n=4, max_tokens=32))
    assert (params.temperature, params.top_p, params.n) == (0.6, 0.95, 4)


def test_contradicting_protocol_is_one_cli_line(tmp_path):
    r = cli("eval", "--model", TOY / "base", "--dataset", "toy", "--limit", "1", "-o", tmp_path / "o",
            "--protocol", "deepseek-r1", "--temperature", "0.8")
    assert_one_line_error(r, "--protocol deepseek-r1 sets temperature 0.6 and top-p 0.95; --temperature 0.8 "
                             "contradicts it (--protocol). Drop --temperature/--top-p, or drop --protocol")
