"""Thinking-aware answers: the forms thinking models write, token counts from token ids, detection,
re-reading a finished run without generating, and runs finished before all this still finished."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tvtool.engine.options import EngineOptions, Sample, SamplingOptions, sampling_record
from tvtool.engine.prompting import PromptOptions
from tvtool.errors import OutputError
from tvtool.evaluation.answers import read_sample
from tvtool.evaluation.data import load_problems
from tvtool.evaluation.results import read_samples
from tvtool.evaluation.runs import EvalOptions, is_complete, run_one, run_record
from tvtool.evaluation.thinking import THINK_END, ThinkReader, detect_think_end

FIXTURE = Path(__file__).parents[1] / "fixtures" / "finished-greedy-run"
R1_TEMPLATE = (  # as DeepSeek-R1-Distill's: past answers lose their thinking; the reply's <think> is pre-filled
    "{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}{% else %}"
    "{% set c = m['content'] %}{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "<｜Assistant｜>{{ c }}{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")
WORDS = ("<unk> <s> </s> so the answer is wait let me check think hard x</think> 1 2 3 4 5 6 7 8 9 10 "
         "\\boxed{3} \\boxed{4} \\boxed{5} \\boxed{6} <think> recap").split()


def _tokenizer(*, tag: str | None = THINK_END, special: bool = False, template: str | None = None):
    """A word-level tokenizer (one token per space-separated word); `tag` added as one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                chat_template=template)
    if tag:
        t.add_tokens([tag], special_tokens=special)
    return t


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


# --- the forms, one response each -------------------------------------------------------------------


def test_r1_prefilled_form_reads_after_the_closing_tag():
    tok = _tokenizer()
    text = "so the answer is 3 wait let me check </think> the answer is \\boxed{4}"
    read = ThinkReader(THINK_END, tokenizer=tok).read(text, _ids(tok, text))
    assert read.answer == " the answer is \\boxed{4}" and read.finished
    assert (read.thinking_tokens, read.answer_tokens) == (10, 4)  # "so the answer is 3 wait let me check </think>"
    rec = read_sample({"response": text, "token_ids": _ids(tok, text), "gold": "4"}, kind="gsm8k", rule="paper",
                      reader=ThinkReader(THINK_END, tokenizer=tok))
    assert (rec["extracted"], rec["correct"], rec["thinking_finished"]) == ("4", True, True)


def test_full_tag_form():
    tok = _tokenizer()
    text = "<think> think hard 2 </think> so 5"
    read = ThinkReader(THINK_END, tokenizer=tok).read(text, _ids(tok, text))
    assert (read.answer, read.finished, read.thinking_tokens, read.answer_tokens) == (" so 5", True, 5, 2)


def test_a_box_in_the_thinking_loses_to_the_one_after_it():
    tok = _tokenizer()
    text = "so \\boxed{3} wait let me check </think> so \\boxed{4}"
    rec = read_sample({"response": text, "token_ids": _ids(tok, text), "gold": "4"}, kind="gsm8k", rule="paper",
                      reader=ThinkReader(THINK_END, tokenizer=tok))
    assert (rec["extracted"], rec["correct"]) == ("4", True)
    whole = read_sample({"response": text, "token_ids": _ids(tok, text), "gold": "4"}, kind="gsm8k",
                        rule="paper", reader=ThinkReader(None, tokenizer=tok))  # --think-end none: the last box of all
    assert whole["extracted"] == "4" and whole["thinking_tokens"] is None
    first = "so \\boxed{4} </think> so \\boxed{3}"  # the after-part's box wins even if the thinking had the gold
    rec = read_sample({"response": first, "token_ids": _ids(tok, first), "gold": "4"}, kind="gsm8k", rule="paper",
                      reader=ThinkReader(THINK_END, tokenizer=tok))
    assert (rec["extracted"], rec["correct"]) == ("3", False)


def test_unfinished_thinking_is_scored_on_the_whole_text_and_counted():
    tok = _tokenizer()
    text = "think hard so the answer is 6 wait let me check 5"  # cut by max_tokens inside the thinking
    rec = read_sample({"response": text, "token_ids": _ids(tok, text), "gold": "5"}, kind="gsm8k", rule="paper",
                      reader=ThinkReader(THINK_END, tokenizer=tok))
    assert (rec["extracted"], rec["correct"]) == ("5", True)  # A.1: the last number of the response
    assert (rec["thinking_finished"], rec["thinking_tokens"], rec["answer_tokens"]) == (False, 12, 0)


def test_qwq_untagged_chain_is_read_whole():
    """QwQ-32B-Preview writes no tags: auto finds none (template, outputs), nothing is split."""
    text = "so the answer is \\boxed{3} wait let me check recap so \\boxed{5}"
    tag, how = detect_think_end(option="auto", tokenizer=_tokenizer(tag=None), responses=[text])
    assert (tag, how) == (None, "not found")
    rec = read_sample({"response": text, "token_ids": list(range(14)), "gold": "5"}, kind="gsm8k", rule="paper",
                      reader=ThinkReader(tag, tokenizer=None))
    assert (rec["extracted"], rec["correct"]) == ("5", True)
    assert (rec["think_end"], rec["thinking_tokens"], rec["answer_tokens"], rec["thinking_finished"]) == \
        (None, None, None, None)


def test_token_counts_come_from_the_token_ids_not_the_text():
    tok = _tokenizer()
    reader = ThinkReader(THINK_END, tokenizer=tok)
    tag = tok.convert_tokens_to_ids(THINK_END)
    text = "so the answer is 3 </think> so 3"  # re-tokenized: 6 thinking tokens, 2 answer tokens
    ids = [3, 4, 5, 6, 8, 8, 8, tag, 3, 13, 2]  # what the engine generated: 8 up to the tag, 3 after it
    read = reader.read(text, ids)
    assert (read.thinking_tokens, read.answer_tokens) == (8, 3)
    two = "2 </think> 3 </think> so 4"  # the LAST tag ends the thinking
    read = reader.read(two, _ids(tok, two))
    assert (read.thinking_tokens, read.answer_tokens, read.answer) == (4, 2, " so 4")


def test_a_tag_merged_into_another_token_ends_at_the_first_prefix_that_decodes_to_it():
    tok = _tokenizer(tag=None)  # "x</think>" is one word of the vocabulary, "</think>" alone is not
    text = "think hard x</think> 5"
    ids = _ids(tok, text)
    assert _ids(tok, THINK_END) == [0] and 0 not in ids and len(ids) == 4  # the tag's own ids never appear
    read = ThinkReader(THINK_END, tokenizer=tok).read(text, ids)
    assert (read.thinking_tokens, read.answer_tokens, read.answer) == (3, 1, " 5")


def test_a_special_tag_left_out_of_the_text_still_splits():
    """vLLM detokenizes with skip_special_tokens: a tokenizer whose </think> is special loses it from the text."""
    tok = _tokenizer(special=True)
    ids = _ids(tok, "so \\boxed{3} </think> so \\boxed{4}")
    text = tok.decode(ids, skip_special_tokens=True)
    assert THINK_END not in text
    read = ThinkReader(THINK_END, tokenizer=tok).read(text, ids)
    assert read.finished and (read.thinking_tokens, read.answer_tokens) == (3, 2) and "boxed{4}" in read.answer
    assert "boxed{3}" not in read.answer


def test_detection_and_what_it_records():
    r1 = _tokenizer(template=R1_TEMPLATE)
    assert detect_think_end(option="auto", tokenizer=r1) == (THINK_END, "chat template")
    assert detect_think_end(option="auto", tokenizer=_tokenizer(), responses=["a", "b </think> c"]) == \
        (THINK_END, "outputs")
    assert detect_think_end(option="none", tokenizer=r1, responses=["</think>"]) == (None, "off")
    assert detect_think_end(option="<|end_of_thought|>") == ("<|end_of_thought|>", "option")
    with pytest.raises(Exception, match="delimiter is empty"):
        ThinkReader(" ")


# --- runs: detection, re-reading without generating, finished runs of before ------------------------


class _Thinker:
    """A stand-in engine (no vLLM): an R1-like model, responses per question, ids from the tokenizer."""

    options = EngineOptions()

    def __init__(self, responses: dict[str, str], tokenizer):
        self.responses, self.tokenizer, self.calls = responses, tokenizer, 0

    def sampling_record(self, sampling):
        return sampling_record(model_dir=Path("/nonexistent-model"), sampling=sampling)

    def prompts(self, *, questions, options):
        return list(questions)

    def generate(self, *, prompts, sampling, lora=None, add_special_tokens=True):
        self.calls += 1
        return [[Sample(index=0, token_ids=tuple(_ids(self.tokenizer, self.responses[q])), text=self.responses[q],
                        finish_reason="stop" if THINK_END in self.responses[q] else "length")] for q in prompts]


def test_a_run_splits_records_and_rereads_under_another_delimiter_without_generating(tmp_path):
    probs = load_problems(dataset="gsm8k", limit=3)
    g = [p.gold for p in probs]
    tok = _tokenizer(template=R1_TEMPLATE)
    texts = [f"so \\boxed{{{g[0]}}} </think> so \\boxed{{3}}",  # right in the thinking, wrong after: wrong
             f"\\boxed{{{g[1]}}} wait </think> the answer is {g[1]}",  # finished, right, no box in its answer
             f"think hard so the answer is {g[2]}"]  # unfinished, right by the whole-text rule
    eng = _Thinker({p.question: t for p, t in zip(probs, texts)}, tok)
    kw = dict(engine=eng, problems=probs, folder=tmp_path, model={"path": "m"}, sampling=SamplingOptions(max_tokens=12))
    s = run_one(options=EvalOptions(progress=False), **kw)
    recs = read_samples(tmp_path / "samples.jsonl")
    assert [r["correct"] for r in recs] == [False, True, True]
    assert [(r["thinking_tokens"], r["answer_tokens"], r["thinking_finished"]) for r in recs] == \
        [(3, 2, True), (3, 4, True), (7, 0, False)]
    assert all(r["num_tokens"] == r["thinking_tokens"] + r["answer_tokens"] for r in recs)
    assert s["thinking_tokens_mean"] == pytest.approx(13 / 3) and s["answer_tokens_mean"] == pytest.approx(2.0)
    assert s["unfinished_share"] == pytest.approx(100 / 3) and s["think_end"] == THINK_END
    assert s["no_box_share"] == pytest.approx(200 / 3)  # the box in the second one's thinking is not its answer's
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["scoring"]["think_end"] == THINK_END and run["scoring"]["think_end_from"] == "chat template"
    # another delimiter rule: read again, nothing generated
    off = run_one(options=EvalOptions(progress=False, think_end="none"), **kw)
    assert eng.calls == 1 and off["thinking_tokens_mean"] is None and off["unfinished_share"] is None
    assert [r["correct"] for r in read_samples(tmp_path / "samples.jsonl")] == [False, True, True]
    assert json.loads((tmp_path / "run.json").read_text())["scoring"]["think_end_from"] == "off"
    assert run_one(options=EvalOptions(progress=False), **kw) == s and eng.calls == 1  # and back


def test_outputs_decide_when_the_template_does_not(tmp_path):
    probs = load_problems(dataset="gsm8k", limit=2)
    eng = _Thinker({p.question: f"wait </think> so {p.gold}" for p in probs}, _tokenizer())  # no template
    s = run_one(engine=eng, problems=probs, folder=tmp_path, model={"path": "m"},
                sampling=SamplingOptions(max_tokens=8), options=EvalOptions(progress=False))
    assert s["accuracy"] == 100.0 and s["unfinished_share"] == 0.0 and s["thinking_tokens_mean"] == 2.0
    assert json.loads((tmp_path / "run.json").read_text())["scoring"]["think_end_from"] == "outputs"


class _Idle:
    """The engine of the fixture's run (same options and sampling record); generating is a failure."""

    options = EngineOptions()
    tokenizer = None

    def sampling_record(self, sampling):
        return sampling_record(model_dir=Path("/nonexistent-model"), sampling=sampling)

    def prompts(self, *, questions, options):
        return list(questions)

    def generate(self, **kw):
        raise AssertionError("a finished run generated again")


def test_a_greedy_run_finished_before_still_counts_as_finished(tmp_path):
    """tests/fixtures/finished-greedy-run was written by tvtool before thinking models, protocols and levels."""
    folder = tmp_path / "run"
    shutil.copytree(FIXTURE, folder)
    probs = load_problems(dataset="gsm8k", limit=3)
    old = json.loads((folder / "summary.json").read_text())
    samples = (folder / "samples.jsonl").read_bytes()
    kw = dict(problems=probs, model={"path": "m"}, sampling=SamplingOptions(max_tokens=8), options=EvalOptions(),
              prompt=PromptOptions())
    assert "protocol" not in sampling_record(model_dir=tmp_path, sampling=SamplingOptions())
    assert is_complete(folder=folder, record=run_record(engine=_Idle(), lora=None, **kw), problems=probs, n=1)
    s = run_one(engine=_Idle(), folder=folder, params_b=1.0, **{**kw, "options": EvalOptions(progress=False)})
    assert (folder / "samples.jsonl").read_bytes() == samples  # nothing re-read: no tags, same rule
    assert {k: s[k] for k in old} == old  # the old figures; the new ones are n/a
    assert (s["thinking_tokens_mean"], s["unfinished_share"], s["difficulty_field"]) == (None, None, "steps")


def test_a_changed_protocol_is_new_work(tmp_path):
    probs = load_problems(dataset="gsm8k", limit=1)
    eng = _Thinker({probs.problems[0].question: "so 3"}, _tokenizer())
    kw = dict(engine=eng, problems=probs, folder=tmp_path, model={"path": "m"}, options=EvalOptions(progress=False))
    run_one(sampling=SamplingOptions(max_tokens=4), **kw)
    with pytest.raises(OutputError, match="other settings"):
        run_one(sampling=SamplingOptions(max_tokens=4, protocol="deepseek-r1"), **kw)
    rec = json.loads((tmp_path / "run.json").read_text())["record"]["options"]["sampling"]
    assert "protocol" not in rec  # the greedy run's record is what it was before protocols existed
