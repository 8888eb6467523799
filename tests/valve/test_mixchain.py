"""MixChain-Z: β (eq. 4), filtering and schema on hand-made records; real builds with vLLM CPU, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine_setup import Crash as _Crash, Flaky as _Flaky

from tvtool.evaluation.data import Problem
from tvtool.errors import OptionsError, OutputError
from tvtool.valve.mixchain import DATA_FILE, assemble, columns, dataset_card, write_dataset
from tvtool.valve.mixchain_length import betas
from tvtool.valve.options import MixChainOptions, parse_min_correct
from tvtool.vectors.source import DeltaSource

ALPHAS = (0.2, 0.4, 0.6, 0.8)


def _words(text: str) -> int:
    return len(text.split())


def _rec(tokens: int, correct: bool, finish: str = "stop", text: str | None = None) -> dict:
    return {"response": text or f"r{tokens}", "num_tokens": tokens, "finish_reason": finish, "correct": correct}


# --- β and the min-correct policy -------------------------------------------------------


def test_beta_is_eq4_over_present_solutions():
    assert betas([10, 20, 30]) == [1.0, 0.5, 0.0]
    assert betas([40, None, 10, 20]) == [0.0, None, 1.0, pytest.approx(2 / 3)]


@pytest.mark.parametrize("lengths,expected", [([7], [1.0]), ([5, 5, 5], [1.0, 1.0, 1.0]),
                                              ([None, 9, None], [None, 1.0, None]), ([None, None], [None, None]),
                                              ([], [])])
def test_beta_degenerate_cases(lengths, expected):
    assert betas(lengths) == expected


def test_min_correct_policy():
    assert parse_min_correct("all", k=4) == 4 and parse_min_correct("ANY", k=4) == 1
    assert parse_min_correct("0", k=4) == 0 and parse_min_correct(3, k=4) == 3
    for bad in ("5", "-1", "most", ""):
        with pytest.raises(OptionsError):
            parse_min_correct(bad, k=4)


# --- assembly on hand-made records ---------------------------------------------------------


def _problems():
    return [Problem(id="q/0", question="Q0", gold="1", solution="a b c d e f"),  # 6 tokens
            Problem(id="q/1", question="Q1", gold="2", solution="a b"),  # 2 tokens
            Problem(id="q/2", question="Q2", gold="3", solution=None)]


def _generations():
    # per α: q/0 all correct; q/1 one wrong (α=0.4) and one truncated-but-correct (α=0.8); q/2 all wrong
    return [{"q/0": _rec(10, True), "q/1": _rec(4, True), "q/2": _rec(5, False)},
            {"q/0": _rec(16, True), "q/1": _rec(9, False), "q/2": _rec(5, False)},
            {"q/0": _rec(26, True), "q/1": _rec(12, True), "q/2": _rec(5, False)},
            {"q/0": _rec(46, True), "q/1": _rec(30, True, "length"), "q/2": _rec(30, True, "length")}]


def test_require_all_keeps_only_fully_correct_questions():
    rows, stats = assemble(problems=_problems(), alphas=ALPHAS, generations=_generations(), count_tokens=_words,
                           min_correct=4)
    assert [r["id"] for r in rows] == ["q/0"]
    r = rows[0]
    assert list(r) == columns(4)
    assert [r[f"solution_{i}_token"] for i in range(5)] == [6, 10, 16, 26, 46]
    assert [r[f"beta_{i}"] for i in range(5)] == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    assert r["solution_0"] == r["answer"] == "a b c d e f" and r["target"] == "1" and r["question"] == "Q0"
    assert [r[f"solution_{i}"] for i in range(1, 5)] == ["r10", "r16", "r26", "r46"]
    assert [r[f"alpha_{i}"] for i in range(1, 5)] == list(ALPHAS)
    assert all(r[f"correct_{i}"] for i in range(1, 5))
    assert stats["dropped"] == {"too few correct": 2, "no solution": 0}
    assert stats["correct_histogram"] == {"0": 1, "1": 0, "2": 1, "3": 0, "4": 1}
    assert [a["correct"] for a in stats["per_alpha"]] == [2, 1, 2, 3]  # truncated ones still score correct
    assert [a["truncated"] for a in stats["per_alpha"]] == [0, 0, 0, 2]
    assert [a["kept"] for a in stats["per_alpha"]] == [1, 1, 1, 1]
    assert stats["per_alpha"][0]["accuracy"] == pytest.approx(200 / 3)
    assert stats["per_alpha"][3]["mean_tokens_generated"] == pytest.approx((46 + 30 + 30) / 3)
    assert [(t["samples"], t["mean_tokens"]) for t in stats["table9"]] == [(1, 6), (1, 10), (1, 16), (1, 26), (1, 46)]


def test_any_policy_leaves_wrong_and_truncated_solutions_out():
    rows, stats = assemble(problems=_problems(), alphas=ALPHAS, generations=_generations(), count_tokens=_words,
                           min_correct=1)
    assert [r["id"] for r in rows] == ["q/0", "q/1"]
    r = rows[1]
    assert [r[f"correct_{i}"] for i in range(1, 5)] == [True, False, True, False]
    for i in (2, 4):  # wrong, and truncated: no text, no length, no β; α still recorded
        assert r[f"solution_{i}"] is None and r[f"solution_{i}_token"] is None and r[f"beta_{i}"] is None
        assert r[f"alpha_{i}"] == ALPHAS[i - 1]
    # β over the present solutions (2, 4, 12 tokens), the ground truth included
    assert [r[f"beta_{i}"] for i in (0, 1, 3)] == pytest.approx([1.0, 0.8, 0.0])
    assert [(t["samples"], t["mean_tokens"]) for t in stats["table9"]] == [(2, 4), (2, 7), (1, 16), (2, 19), (1, 46)]
    assert stats["dropped"] == {"too few correct": 1, "no solution": 0}
    # keep_truncated counts the finished-by-length correct chain; q/2 then has 1 correct solution
    rows, stats = assemble(problems=_problems(), alphas=ALPHAS, generations=_generations(), count_tokens=_words,
                           min_correct=1, keep_truncated=True)
    assert [r["id"] for r in rows] == ["q/0", "q/1", "q/2"]
    assert rows[1]["solution_4_token"] == 30 and rows[1]["beta_4"] == 0.0 and rows[1]["correct_4"]
    q2 = rows[2]  # no ground truth, one generated solution: the degenerate β = 1
    assert q2["solution_0"] is None and q2["answer"] is None and q2["beta_0"] is None
    assert q2["beta_4"] == 1.0 and [q2[f"solution_{i}"] for i in (1, 2, 3)] == [None] * 3


def test_zero_min_correct_drops_questions_without_any_solution():
    rows, stats = assemble(problems=_problems(), alphas=ALPHAS, generations=_generations(), count_tokens=_words,
                           min_correct=0)
    assert [r["id"] for r in rows] == ["q/0", "q/1"]
    assert stats["dropped"] == {"too few correct": 0, "no solution": 1}


def test_scorer_replaces_the_recorded_scores_and_missing_generations_fail():
    probs = _problems()[:2]
    gens = [{"q/0": _rec(3, False, text="\\boxed{1}"), "q/1": _rec(3, True, text="\\boxed{7}")}]
    rows, _ = assemble(problems=probs, alphas=(0.5,), generations=gens, count_tokens=_words, min_correct=1,
                       scorer=lambda resp, p: resp == f"\\boxed{{{p.gold}}}")
    assert [r["id"] for r in rows] == ["q/0"] and rows[0]["solution_1"] == "\\boxed{1}"
    with pytest.raises(OutputError, match="q/1"):
        assemble(problems=probs, alphas=(0.5,), generations=[{"q/0": _rec(3, True)}], count_tokens=_words,
                 min_correct=0)


# --- writing: schema, loading, card ------------------------------------------------------------


def _record(alphas=ALPHAS) -> dict:
    return {"alphas": list(alphas), "min_correct": 1, "keep_truncated": False, "vllm_version": "0",
            "models": {"base": "org/base", "delta": None, "reasoner": "org/reasoner"},
            "dataset": {"name": "gsm8k", "split": "train", "n": 3, "description": "GSM8K train: first 3 of 7473",
                        "seed": None},
            "sampling": {"max_tokens": 64, "temperature": 0.0, "top_p": 1.0},
            "prompt": {"chat_template": True, "instruction": "step by step", "system_prompt": None}}


def test_written_dataset_loads_with_its_schema_and_card(tmp_path):
    datasets = pytest.importorskip("datasets")
    from huggingface_hub import DatasetCard

    gens = _generations()
    gens[3]["q/0"] = _rec(46, False)
    rows, stats = assemble(problems=_problems(), alphas=ALPHAS, generations=gens, count_tokens=_words, min_correct=1)
    # a column that is null in every row must keep its type
    assert all(r["solution_4"] is None for r in rows)
    card = dataset_card(stats=stats, record=_record(), license="mit", source_datasets=["openai/gsm8k"])
    write_dataset(rows=rows, k=4, folder=tmp_path, card=card, record={"stats": stats})
    ds = datasets.load_dataset(str(tmp_path), split="train")
    assert ds.column_names == columns(4) and ds.num_rows == 2
    f = ds.features
    assert f["solution_4"].dtype == "string" and f["solution_4_token"].dtype == "int64"
    assert f["correct_1"].dtype == "bool" and f["beta_0"].dtype == "float64" and f["alpha_4"].dtype == "float64"
    assert ds.to_list() == rows
    jl = [json.loads(x) for x in (tmp_path / "mixchain.jsonl").read_text().splitlines()]
    assert jl == rows  # the same rows as JSON lines, not read a second time by load_dataset (num_rows above)
    data = DatasetCard.load(tmp_path / "README.md").data
    assert data.license == "mit" and {"tvtool", "mixchain", "cot-valve"} <= set(data.tags)
    assert (tmp_path / DATA_FILE).is_file()
    text = (tmp_path / "README.md").read_text()
    for t in stats["table9"]:  # the Table 9 rows: index, #samples, mean #tokens
        mean = "–" if t["mean_tokens"] is None else f"{t['mean_tokens']:.1f}"
        assert f"| {t['label']} | {t['samples']} | {mean} |" in text
    assert "2 of 3" in text.replace("*", "")


# --- real builds (vLLM CPU, the shared session engine) ------------------------------------------


def _odd_scorer(resp: str, p: Problem) -> bool:
    """A stand-in verifier for random models: deterministic, neither always True nor always False."""
    return (len(resp) + len(p.question)) % 2 == 0


def _build(vengine, out: Path, engine, **kw):
    from tvtool.engine.options import SamplingOptions
    from tvtool.valve.mixchain import build_mixchain

    opts = dict(limit=3, alphas=(0.6, 0.2), batch_size=1, progress=False, keep_truncated=True, min_correct="any")
    return build_mixchain(source=DeltaSource(base=vengine.base, reasoner=vengine.reasoner), output=out, engine=engine,
                          sampling=SamplingOptions(max_tokens=12), scorer=_odd_scorer,
                          options=MixChainOptions(**{**opts, **kw}))


@pytest.mark.vllm
def test_build_on_a_tiny_pair_matches_its_generations(vengine, tmp_path):
    datasets = pytest.importorskip("datasets")
    from transformers import AutoTokenizer

    from tvtool.evaluation.data import load_problems
    from tvtool.evaluation.results import read_samples

    out = tmp_path / "mc"
    res = _build(vengine, out, vengine.engine, min_correct="0")
    assert res.engine_starts == 0 and res.generations == tmp_path / "mc.generations"
    assert not (tmp_path / "mc.partial").exists()
    ds = datasets.load_dataset(str(out), split="train")
    probs = load_problems(dataset="gsm8k", split="train", limit=3)
    assert ds.column_names == columns(2) and ds["id"] == [p.id for p in probs]  # every question has solution_0
    tok = AutoTokenizer.from_pretrained(vengine.reasoner)
    gens = [{r["id"]: r for r in read_samples(res.generations / f"alpha-{a}" / "gsm8k" / "samples.jsonl")}
            for a in ("0.2", "0.6")]
    for row, p in zip(ds, probs):
        assert row["solution_0"] == p.solution and row["target"] == p.gold
        assert row["solution_0_token"] == len(tok(p.solution, add_special_tokens=False)["input_ids"]) + 1  # + EOS
        lengths = [row["solution_0_token"]]
        for k, (a, gen) in enumerate(zip((0.2, 0.6), gens), start=1):
            g = gen[p.id]
            assert row[f"alpha_{k}"] == a and row[f"correct_{k}"] == _odd_scorer(g["response"], p)
            if row[f"correct_{k}"]:
                assert row[f"solution_{k}"] == g["response"]
                assert row[f"solution_{k}_token"] == g["num_tokens"] == len(g["token_ids"])
            else:
                assert row[f"solution_{k}"] is None and row[f"solution_{k}_token"] is None
            lengths.append(row[f"solution_{k}_token"])
        assert [row[f"beta_{i}"] for i in range(3)] == pytest.approx(betas(lengths))
    kept_generated = sum(row[f"correct_{k}"] for row in ds for k in (1, 2))
    assert 0 < kept_generated < 6  # the stand-in verifier keeps some, not all
    record = json.loads((out / "mixchain.json").read_text())
    assert record["alphas"] == [0.2, 0.6] and record["stats"] == res.stats and record["sampling"]["greedy"]
    assert "| 0 (ground truth) | 3 |" in (out / "README.md").read_text()


@pytest.mark.vllm
def test_interrupted_build_resumes_to_the_same_dataset(vengine, tmp_path):
    datasets = pytest.importorskip("datasets")

    ref = _build(vengine, tmp_path / "ref", vengine.engine)
    out = tmp_path / "mc"
    with pytest.raises(_Crash):  # 3 questions × 2 α, one per batch: dies during the second α
        _build(vengine, out, _Flaky(vengine.engine, ok=4))
    assert not out.exists() and not (tmp_path / "mc.partial").exists()
    again = _Flaky(vengine.engine, ok=99)
    res = _build(vengine, out, again)
    assert again.prompts_seen == 2  # only the missing (question, α) pairs were generated
    rows = datasets.load_dataset(str(out), split="train").to_list()
    assert rows == datasets.load_dataset(str(tmp_path / "ref"), split="train").to_list()
    assert res.stats == ref.stats
    # a finished dataset is not replaced silently; with --overwrite a new filter reuses the generations
    with pytest.raises(OutputError):
        _build(vengine, out, vengine.engine)
    idle = _Flaky(vengine.engine, ok=0)
    loose = _build(vengine, out, idle, overwrite=True, min_correct="0")
    assert len(rows) < loose.rows == 3 and loose.stats["dropped"]["too few correct"] == 0
    assert datasets.load_dataset(str(out), split="train").num_rows == 3  # the rebuilt folder, not a stale cache


def test_bad_requests_fail_before_any_generation(tmp_path):
    from tvtool.engine.options import SamplingOptions
    from tvtool.valve.mixchain import build_mixchain

    kw = dict(source=DeltaSource(base="b", reasoner="r"), output=tmp_path / "mc")  # never opened: the checks come first
    with pytest.raises(OptionsError, match="one solution"):
        build_mixchain(sampling=SamplingOptions(n=2), **kw)
    with pytest.raises(OptionsError, match="exactly one"):
        build_mixchain(**{**kw, "source": DeltaSource(base="b", delta="d", reasoner="r")})
    with pytest.raises(OptionsError, match="min-correct"):
        build_mixchain(options=MixChainOptions(alphas=(0.2, 0.4), min_correct="3"), **kw)
    with pytest.raises(OptionsError, match="inside"):
        build_mixchain(options=MixChainOptions(work_dir=str(tmp_path / "mc" / "gen")), **kw)
    (tmp_path / "mc").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        build_mixchain(**kw)


# --- one way of counting lengths; max_tokens fits the context ------------------------------------


def test_a_generated_solution_and_the_same_text_as_ground_truth_get_the_same_count():
    """The toy reasoner's greedy chains (EOS included in the generated ids, as vLLM records them),
    given again as solution_0: the same length, so β is not skewed towards the ground truth."""
    import torch
    from transformers import AutoTokenizer

    from tvtool import toy
    from tvtool.valve.mixchain import solution_length

    tok = AutoTokenizer.from_pretrained(str(toy.REASONER_DIR))
    rows = toy.read_jsonl(path=toy.TEST_PATH)[:4]
    torch.manual_seed(0)
    model = toy.load_model(path=toy.REASONER_DIR)
    gens = toy.greedy_generate(model=model, tokenizer=tok, questions=[r["question"] for r in rows])
    probs, gen = [], {}
    for i, (r, ids) in enumerate(zip(rows, gens)):
        token_ids = ids + [tok.eos_token_id]  # what the engine records for a chain that stopped at EOS
        text = tok.decode(ids)
        probs.append(Problem(id=f"t/{i}", question=r["question"], gold=str(r["gold"]), solution=text))
        gen[f"t/{i}"] = {"response": text, "num_tokens": len(token_ids), "finish_reason": "stop", "correct": True}
        assert solution_length(text=text, tokenizer=tok) == len(token_ids)
    out, _ = assemble(problems=probs, alphas=(0.5,), generations=[gen], min_correct=1,
                      count_tokens=lambda t: solution_length(text=t, tokenizer=tok))
    for row in out:
        assert row["solution_0"] == row["solution_1"]
        assert row["solution_0_token"] == row["solution_1_token"] > 10
        assert row["beta_0"] == row["beta_1"] == 1.0


def test_max_tokens_is_clamped_to_the_context_left_after_the_longest_prompt():
    from tvtool import toy
    from tvtool.evaluation.data import load_problems
    from tvtool.engine.options import EngineOptions, SamplingOptions
    from tvtool.valve.mixchain_length import clamp_max_tokens, fit_context
    from tvtool.engine.prompting import PromptOptions, load_tokenizer

    assert clamp_max_tokens(max_tokens=100, context=256, longest_prompt=40) == (100, None)
    n, note = clamp_max_tokens(max_tokens=4096, context=256, longest_prompt=40)
    assert n == 216 and note == ("max_tokens lowered from 4096 to 216: the context is 256 tokens and the longest "
                                 "prompt has 40")
    with pytest.raises(OptionsError) as e:
        clamp_max_tokens(max_tokens=10, context=30, longest_prompt=30)
    assert str(e.value) == ("the longest prompt (30 tokens) fills the engine's context of 30 tokens "
                            "(--max-model-len). Raise --max-model-len (within the model's limit) or shorten the prompts")
    # the toy build: default max_tokens (4096) against the toy's 256 positions, no --max-tokens needed
    probs = load_problems(dataset="toy", split="train", limit=50)
    tok = load_tokenizer(toy.REASONER_DIR)
    prompt = PromptOptions(instruction="")
    longest = max(len(tok(tok.apply_chat_template([{"role": "user", "content": p.question}], tokenize=False,
                                                  add_generation_prompt=True), add_special_tokens=False)["input_ids"])
                  for p in probs)
    s, note = fit_context(problems=probs, tokenizer=tok, shell=toy.REASONER_DIR, prompt=prompt,
                           sampling=SamplingOptions(), engine_options=EngineOptions())
    assert s.max_tokens == toy.MAX_POSITIONS - longest and "lowered from 4096" in note
    s, note = fit_context(problems=probs, tokenizer=tok, shell=toy.REASONER_DIR, prompt=prompt,
                           sampling=SamplingOptions(max_tokens=100), engine_options=EngineOptions(max_model_len=200))
    assert s.max_tokens == 100 and note is None


def test_a_mixchain_that_keeps_no_question_is_one_line(tmp_path, monkeypatch):
    """Every generated answer wrong under --min-correct all: nothing to write (an empty dataset would crash
    `datasets` and train nothing), so one line that says how to keep some; the generations stay for a re-run."""
    from engine_setup import RecordingEngine  # answers \boxed{0}: wrong for every toy question
    from helpers import assert_one_line_error, cli

    from tvtool.engine.engine import Engine
    from tvtool.toy import ASSET_DIR

    monkeypatch.setattr(Engine, "for_source", RecordingEngine.for_source)
    out = tmp_path / "mc"
    r = cli("mixchain", ASSET_DIR / "base", "--reasoner", ASSET_DIR / "reasoner", "--dataset", "toy", "--limit", "3",
            "--alpha", "0.5", "--min-correct", "all", "--max-tokens", "8", "--instruction", "", "--no-progress",
            "-o", out)
    assert_one_line_error(r, "MixChain-Z would be empty: none of 3 questions kept (3 too few "
                             f"correct; --min-correct all of 1 α) ({out}). Lower --min-correct, raise --limit or "
                             f"--max-tokens (the generations in {tmp_path / 'mc.generations'} are reused)")
    assert not out.exists() and (tmp_path / "mc.generations").is_dir()
