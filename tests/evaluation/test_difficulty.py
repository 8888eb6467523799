"""Per-difficulty tables: fields (MATH-500 level, the GSM8K steps proxy, any field), per-level rows
recomputed by hand, the relative length per level, the plot and the sweep report's section."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import assert_one_line_error, cli

from tvtool.errors import OptionsError
from tvtool.evaluation.data import load_problems
from tvtool.evaluation.difficulty import STEP_BUCKETS, by_level, problem_levels, relative_lengths, resolve_field
from tvtool.evaluation.reflection import LONG_TO_SHORT_PHRASES, REFLECTION_PHRASES, count_reflections
from tvtool.evaluation.report import level_section, level_tables, markdown_table, plot_levels
from tvtool.evaluation.results import summarize

ASDIV = Path(__file__).parents[1] / "fixtures" / "asdiv_sample.xml"
TOY = Path(__file__).resolve().parents[2] / "tvtool" / "assets" / "toy"


def test_fields_auto_and_named():
    assert resolve_field("auto", problems=load_problems(dataset="math500", limit=20)) == "level"
    assert resolve_field("auto", problems=load_problems(dataset="gsm8k", limit=20)) == "steps"
    toy = load_problems(dataset="toy", limit=50)
    assert resolve_field("auto", problems=toy) is None  # one-line solutions: one bucket
    assert resolve_field("auto", problems=load_problems(dataset=str(ASDIV))) == "grade"
    assert resolve_field("none", problems=load_problems(dataset="math500", limit=20)) is None
    assert resolve_field("subject", problems=load_problems(dataset="math500", limit=20)) == "subject"
    with pytest.raises(OptionsError, match="no problem carries the difficulty field 'level'"):
        resolve_field("level", problems=load_problems(dataset="gsm8k", limit=3))


def test_gsm8k_steps_proxy_buckets_the_whole_test_split():
    ps = load_problems(dataset="gsm8k")
    first = ps.problems[0]  # "Janet sells 16 - 3 - 4 = <<…>>9 duck eggs a day.\nShe makes 9 * 2 = …\n#### 18"
    assert first.meta["steps"] == 2
    levels = problem_levels(ps, field="steps")
    counts = {b: sum(v == b for v in levels.values()) for b in STEP_BUCKETS}
    assert counts == {"≤2": 326, "3": 371, "4": 297, "5": 175, "≥6": 150}  # the counts in the module docstring


def test_any_record_field_names_the_difficulty(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text('{"problem": "1+1?", "answer": "2", "difficulty": "easy"}\n'
                 '{"problem": "2+2?", "answer": "4", "difficulty": "hard", "notes": "' + "x" * 100 + '"}\n')
    ps = load_problems(dataset=str(f))
    assert resolve_field("difficulty", problems=ps) == "difficulty" and problem_levels(ps, field="difficulty") == \
        {"mine/0": "easy", "mine/1": "hard"}
    assert "notes" not in ps.problems[1].meta  # long text is not kept


def test_per_level_rows_by_hand():
    recs = [{"id": "a", "index": 0, "num_tokens": 10, "correct": True, "response": "Wait. so 1",
             "think_end": "</think>", "thinking_tokens": 8, "answer_tokens": 2, "thinking_finished": True},
            {"id": "b", "index": 0, "num_tokens": 30, "correct": False, "response": "cut", "think_end": "</think>",
             "thinking_tokens": 30, "answer_tokens": 0, "thinking_finished": False},
            {"id": "c", "index": 0, "num_tokens": 50, "correct": True,
             "response": "let me just verify; recap: wait, wait", "think_end": "</think>", "thinking_tokens": 45,
             "answer_tokens": 5, "thinking_finished": True}]
    for r in recs:
        r["finish_reason"] = "stop" if r["thinking_finished"] else "length"
    levels = {"a": "1", "b": "5", "c": "5"}
    rows = by_level(recs, levels=levels, field="level")
    assert list(rows) == ["1", "5"]
    assert rows["1"] == {"n_samples": 1, "n_problems": 1, "accuracy": 100.0, "mean_tokens": 10.0,
                         "thinking_tokens_mean": 8.0, "answer_tokens_mean": 2.0, "unfinished_share": 0.0,
                         "reflections_mean": 1.0, "reflective_share": 100.0}
    assert rows["5"] == {"n_samples": 2, "n_problems": 2, "accuracy": 50.0, "mean_tokens": 40.0,
                         "thinking_tokens_mean": 37.5, "answer_tokens_mean": 2.5, "unfinished_share": 50.0,
                         "reflections_mean": 2.0, "reflective_share": 50.0}  # c: 4 phrases, b: none
    s = summarize(records=recs, params_b=None, levels=levels, difficulty="level")
    assert s["by_level"] == rows and s["difficulty_field"] == "level"
    assert "by_level" not in summarize(records=recs, params_b=None)


def test_reflection_list_holds_the_long_to_short_list():
    assert set(LONG_TO_SHORT_PHRASES) <= set(REFLECTION_PHRASES)
    assert LONG_TO_SHORT_PHRASES == ("wait", "re-examine", "double-check", "let me check", "recap",
                                     "let me just verify", "let me just check")
    text = "Let me just check. Recap: hmm, alternatively wait"
    assert count_reflections(text) == 5 and count_reflections(text, phrases=LONG_TO_SHORT_PHRASES) == 3


def _row(label, alpha, tokens: dict[str, float], **kw) -> dict:
    lv = {lev: {"n_samples": 2, "n_problems": 2, "accuracy": 50.0, "mean_tokens": t, "thinking_tokens_mean": None,
                "answer_tokens_mean": None, "unfinished_share": None, "reflections_mean": 0.5,
                "reflective_share": 50.0} for lev, t in tokens.items()}
    return {"label": label, "alpha": alpha, "accuracy": 50.0, "mean_tokens": sum(tokens.values()) / len(tokens),
            "difficulty_field": "level", "by_level": lv, **kw}


ROWS = [_row("alpha-0", 0.0, {"1": 20.0, "5": 90.0}), _row("alpha-0.5", 0.5, {"1": 50.0, "5": 150.0}),
        _row("alpha-1", 1.0, {"1": 100.0, "5": 180.0}),
        _row("budget-20", 1.0, {"1": 80.0, "5": 170.0}, prompt_budget=20)]


def test_relative_length_per_level_is_against_alpha_1():
    ref, rel = relative_lengths(ROWS[:3])
    assert ref["label"] == "alpha-1"
    assert rel == {"alpha-0": {"1": 0.2, "5": 0.5}, "alpha-0.5": {"1": 0.5, "5": pytest.approx(150 / 180)},
                   "alpha-1": {"1": 1.0, "5": 1.0}}  # easy problems compress more than hard ones
    ref, _ = relative_lengths(ROWS[:2])
    assert ref["label"] == "alpha-0.5"  # no α = 1: the largest α


def test_level_tables_and_plot(tmp_path):
    md = level_tables(rows=ROWS)
    lines = md.splitlines()
    assert lines[0] == "By difficulty (`level`):"
    assert "| run | α | 1 | 5 |" in lines and "| alpha-0 | 0 | 20.0 | 90.0 |" in lines
    assert "| alpha-0 | 0 | 0.20 | 0.50 |" in lines and "| alpha-0.5 | 0.5 | 0.50 | 0.83 |" in lines
    assert not any(line.startswith("| budget-20 | 1 | 0.") for line in lines)  # budget rows are not on the α curve
    assert ("| run | α | level | #problems | accuracy % | mean #tokens | reflections/resp. | reflective % |"
            in lines)  # no thinking columns: no row has a delimiter
    assert "| budget-20 | 1 | 5 | 2 | 50.0 | 170.0 | 0.50 | 50.0 |" in lines
    assert plot_levels(rows=ROWS, path=tmp_path / "l.png").stat().st_size > 1000
    assert plot_levels(rows=ROWS[:1], path=tmp_path / "one.png") is None and not (tmp_path / "one.png").exists()
    assert level_tables(rows=[{"label": "a", "alpha": 0.0, "accuracy": 1.0}]) == ""
    lines, png = level_section(name="math500", rows=ROWS, folder=tmp_path)
    assert lines[0] == "### math500 by difficulty" and png == tmp_path / "plot-math500-levels.png" and png.is_file()
    assert level_section(name="toy", rows=[{"label": "a", "alpha": 0.0}], folder=tmp_path) == ([], None)


def test_new_columns_stay_out_of_a_table_that_has_none():
    """The toy's rows: no delimiter, one sample, no levels → the table of before, column for column."""
    row = {"label": "alpha-0", "alpha": 0.0, "accuracy": 96.0, "mean_tokens": 19.6, "acu": 4.35e5, "truncated": 0,
           "n_samples": 200, "no_box_share": 0.0, "length_share": 0.0, "boxed_accuracy": 96.0,
           "reflections_mean": 0.0, "thinking_tokens_mean": None, "answer_tokens_mean": None,
           "unfinished_share": None, "accuracy_se": None, "maj_accuracy": None, "pass_at_k": None}
    assert markdown_table(rows=[row]).splitlines()[0] == (
        "| run | α | accuracy % | mean #tokens | ACU | #truncated | #samples | no box % | hit max % | acc. boxed % "
        "| reflections/resp. |")
    think = {**row, "thinking_tokens_mean": 15.0, "answer_tokens_mean": 4.6, "unfinished_share": 2.5}
    assert markdown_table(rows=[think]).splitlines()[0] == (
        "| run | α | accuracy % | mean #tokens | thinking #tokens | answer #tokens | ACU | #truncated | #samples "
        "| no box % | hit max % | unfinished % | acc. boxed % | reflections/resp. |")


def test_an_unknown_difficulty_field_is_one_cli_line_before_any_engine(tmp_path):
    r = cli("eval", "--model", TOY / "base", "--dataset", "toy", "--limit", "2", "-o", tmp_path / "o",
            "--difficulty-field", "level")
    assert_one_line_error(r, "no problem carries the difficulty field 'level' (--difficulty-field). Use one of: "
                             "steps; or auto, or none")


@pytest.mark.vllm
def test_math500_on_the_toy_pair_gives_per_level_tables(tmp_path):
    """An α sweep of the toy pair on MATH-500: per-level rows that the records recompute, tables and plot.
    The toy is no math model: only the bookkeeping is checked, not its accuracy."""
    from tvtool.engine.options import EngineOptions, SamplingOptions
    from tvtool.engine.prompting import PromptOptions
    from tvtool.evaluation.evaluate import evaluate
    from tvtool.evaluation.results import read_samples
    from tvtool.evaluation.runs import EvalOptions
    from tvtool.vectors.source import DeltaSource

    res = evaluate(source=DeltaSource(base=str(TOY / "base"), reasoner=str(TOY / "reasoner")), alphas=(0.0, 1.0),
                   output=tmp_path,
                   options=EvalOptions(dataset="math500", limit=30, progress=False),
                   prompt=PromptOptions(instruction=""), sampling=SamplingOptions(max_tokens=100),
                   engine_options=EngineOptions(dtype="float32", max_model_len=256, cpu_kv_cache_gb=1,
                                                enforce_eager=True))
    levels = {p.id: str(p.meta["level"]) for p in load_problems(dataset="math500", limit=30)}
    for run in res.runs:
        s, recs = run.summary, read_samples(run.folder / "samples.jsonl")
        assert s["difficulty_field"] == "level" and list(s["by_level"]) == ["1", "2", "3", "4", "5"]
        for lev, row in s["by_level"].items():
            mine = [r for r in recs if levels[r["id"]] == lev]
            assert row["n_samples"] == len(mine) and row["mean_tokens"] == pytest.approx(
                sum(r["num_tokens"] for r in mine) / len(mine))
        assert s["thinking_tokens_mean"] is None  # the toy writes no tags
    md = (tmp_path / "summary-math500.md").read_text()
    assert "By difficulty (`level`):" in md and "| run | α | 1 | 2 | 3 | 4 | 5 |" in md
    assert "Length relative to alpha-1" in md
    assert (tmp_path / "summary-math500-levels.png").stat().st_size > 1000
    assert "By difficulty (`level`):" in res.summary()
