"""Dataset loaders: bundled GSM8K/MATH-500, ASDiv files, format detection, subsets, errors."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from tvtool.evaluation import data
from tvtool.evaluation.data import DatasetOptions, Problem, asdiv_answer, load_problems
from tvtool.errors import DatasetError, OptionsError

FIXTURE = Path(__file__).parents[1] / "fixtures" / "asdiv_sample.xml"
REAL_ASDIV = Path("/work/shared/datasets/asdiv/ASDiv.xml")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- bundled files ------------------------------------------------------------------


@pytest.mark.parametrize("rel,sha", [
    ("gsm8k/test.jsonl", "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"),
    ("gsm8k/train.jsonl", "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"),
    ("math500/test.jsonl", "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132"),
])
def test_bundled_files_are_the_upstream_bytes(rel, sha):
    assert hashlib.sha256((data.ASSETS / rel).read_bytes()).hexdigest() == sha


def test_gsm8k_test_bundled():
    ps = load_problems(dataset="gsm8k")
    assert (ps.name, ps.kind, ps.split, len(ps), ps.excluded) == ("gsm8k", "gsm8k", "test", 1319, {})
    assert ps.source == str(data.ASSETS / "gsm8k" / "test.jsonl")
    assert ps.description == "GSM8K test: all 1319 problems"
    first = ps.problems[0]
    assert first.id == "gsm8k/test/0"
    assert first.question.startswith("Janet’s ducks lay 16 eggs per day.")
    assert first.gold == "18"
    assert first.solution == ("Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
                              "She makes 9 * 2 = $18 every day at the farmer’s market.")
    assert len({p.id for p in ps}) == 1319


def test_gsm8k_gold_without_commas_and_negatives():
    ps = load_problems(dataset="gsm8k")
    by_id = {p.id: p for p in ps}
    assert by_id["gsm8k/test/611"].gold == "1450000"  # "#### 1,450,000" on line 612
    assert all(re.fullmatch(r"-?\d+", p.gold) for p in ps)
    assert [p.gold for p in ps if p.gold.startswith("-")] == ["-10", "-3"]
    assert not any("<<" in p.solution or "####" in p.solution for p in ps)


def test_gsm8k_train_bundled():
    ps = load_problems(dataset="gsm8k", split="train")
    assert (len(ps), ps.split, ps.description) == (7473, "train", "GSM8K train: all 7473 problems")
    assert ps.problems[0].gold == "72"
    assert ps.problems[0].question.startswith("Natalia sold clips to 48 of her friends")
    assert sorted(p.gold for p in ps if p.gold.startswith("-")) == ["-12", "-47", "-7"]
    assert sum("," in p.gold for p in ps) == 0


def test_math500_bundled():
    ps = load_problems(dataset="math500")
    assert (ps.kind, len(ps), ps.description) == ("math500", 500, "MATH-500 test: all 500 problems")
    first = ps.problems[0]
    assert first.id == "test/precalculus/807.json"
    assert first.gold == r"\left( 3, \frac{\pi}{2} \right)"
    assert first.question.startswith("Convert the point $(0,3)$ in rectangular coordinates")
    assert first.meta == {"subject": "Precalculus", "level": 2, "unique_id": "test/precalculus/807.json"}
    assert first.solution.endswith(r"$\boxed{\left( 3, \frac{\pi}{2} \right)}.$")
    assert len({p.id for p in ps}) == 500
    assert sum(bool(re.fullmatch(r"-?\d+", p.gold)) for p in ps) == 311


def test_bundled_split_that_does_not_exist():
    with pytest.raises(DatasetError) as e:
        load_problems(dataset="math500", split="train")
    assert str(e.value) == "no 'train' split in the bundled math500 data (math500). Use split='test'"


@pytest.mark.skipif(not data.BUNDLED["toy"]["test"].is_file(), reason="toy set not generated in this checkout")
def test_toy_bundled():
    ps = load_problems(dataset="toy")
    assert ps.kind == "gsm8k" and len(ps) > 0
    assert all(re.fullmatch(r"-?\d+", p.gold) for p in ps)


def test_toy_format_through_a_directory(tmp_path):
    """The toy set is GSM8K-format test.jsonl/train.jsonl; a directory path picks the split."""
    write_jsonl(tmp_path / "test.jsonl", [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}])
    write_jsonl(tmp_path / "train.jsonl", [{"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"},
                                           {"question": "What is 7 - 9?", "answer": "7 - 9 = -2\n#### -2"}])
    test = load_problems(dataset=str(tmp_path))
    train = load_problems(dataset=str(tmp_path), split="train")
    assert [(p.id, p.question, p.gold, p.solution) for p in test] == [("test/0", "What is 2 + 3?", "5", "2 + 3 = 5")]
    assert [p.gold for p in train] == ["2", "-2"]
    assert train.description == f"GSM8K ({tmp_path.name}/train.jsonl): all 2 problems"
    assert (train.name, train.source) == (f"{tmp_path.name}/train.jsonl", str(tmp_path / "train.jsonl"))
    with pytest.raises(DatasetError) as e:
        load_problems(dataset=str(tmp_path), split="dev")
    assert str(e.value) == f"directory has no dev.jsonl ({tmp_path}). Pass a file, or a directory holding dev.jsonl"


# --- ASDiv --------------------------------------------------------------------------


def test_asdiv_fixture_exclusions_and_records():
    ps = load_problems(dataset=str(FIXTURE))
    assert (ps.name, ps.kind, ps.source) == ("asdiv_sample.xml", "asdiv", str(FIXTURE))
    assert ps.excluded == {"multiple answers": 2, "ratio": 1, "clock time": 1, "a.m./p.m. time": 1, "text": 2}
    assert [(p.id, p.gold) for p in ps] == [
        ("sample-01", "9"), ("sample-02", "383"), ("sample-08", "5/2"), ("sample-09", "-1/3"),
        ("sample-11", "14"), ("sample-12", "5"), ("sample-13", "0.46")]
    assert ps.description == ("ASDiv (asdiv_sample.xml): all 7 problems with a single numeric answer "
                              "(of 14; excluded: 2 multiple answers, 2 text, 1 ratio, 1 clock time, "
                              "1 a.m./p.m. time)")
    p1, p12 = ps.problems[0], ps.problems[5]
    assert p1.question == "Ana has four pears and five plums. How many fruits does Ana have?"
    assert p1.meta == {"grade": "1", "solution_type": "Addition", "unit": "fruits", "answer": "9 (fruits)",
                       "formula": "4+5=9", "source": "tvtool tests"}
    assert p12.question == ("Tom & Jerry found 3 < 5 crumbs, so they took 5 crumbs > 3. "
                            "How many crumbs did Tom & Jerry take?")
    assert ps.problems[1].meta["unit"] is None  # plain number "383"


@pytest.mark.parametrize("answer,solution_type,expected", [
    ("9 (apples)", "Addition", ("9", "apples", None)),
    ("14  (seats)", "Multiplication", ("14", "seats", None)),
    ("3.333 (minutes)", "Common-Division", ("3.333", "minutes", None)),
    ("383", "Addition", ("383", None, None)),
    ("-(1/3)", "Algebra-1", ("-1/3", None, None)),
    ("30 (girls); 15 (boys)", "Algebra-1", (None, None, "multiple answers")),
    ("9:7", "Ratio", (None, None, "ratio")),
    ("14:55", "Addition", (None, None, "clock time")),
    ("9:03:36 a.m.", "Addition", (None, None, "a.m./p.m. time")),
    ("11:55 p.m. on 24 December 2014.", "Subtraction", (None, None, "a.m./p.m. time")),
    ("The 60th caller.", "LCM", (None, None, "text")),
])
def test_asdiv_answer_forms(answer, solution_type, expected):
    assert asdiv_answer(answer=answer, solution_type=solution_type) == expected


@pytest.mark.skipif(not REAL_ASDIV.is_file(), reason="ASDiv.xml (CC BY-NC) is not shipped; needs /work/shared")
def test_real_asdiv_file():
    ps = load_problems(dataset=str(REAL_ASDIV))
    assert len(ps) == 2093
    assert ps.excluded == {"multiple answers": 90, "text": 61, "ratio": 43, "clock time": 13, "a.m./p.m. time": 5}
    assert ps.description == ("ASDiv (ASDiv.xml): all 2093 problems with a single numeric answer (of 2305; "
                              "excluded: 90 multiple answers, 61 text, 43 ratio, 13 clock time, 5 a.m./p.m. time)")
    assert ps.problems[0].id == "nluds-0001" and ps.problems[0].gold == "9"
    assert {p.id: p.gold for p in ps}["nluds-1008"] == "14"
    assert sum("/" in p.gold for p in ps) == 9


# --- format detection ---------------------------------------------------------------


def test_detects_math500_jsonl(tmp_path):
    f = write_jsonl(tmp_path / "mine.jsonl", [{"problem": "Find $x$.", "answer": r"\frac{1}{2}"}])
    ps = load_problems(dataset=str(f))
    assert (ps.kind, ps.problems[0].id, ps.problems[0].gold, ps.problems[0].solution) == \
        ("math500", "mine/0", r"\frac{1}{2}", None)


def test_kind_override_for_other_extensions(tmp_path):
    f = tmp_path / "gsm.txt"
    write_jsonl(f, [{"question": "q", "answer": "w\n#### 1,024"}])
    assert load_problems(dataset=str(f), kind="gsm8k").problems[0].gold == "1024"
    with pytest.raises(DatasetError) as e:
        load_problems(dataset=str(f))
    assert str(e.value) == (f"unsupported file type '.txt' ({f}). Use a .jsonl file (GSM8K or MATH-500 "
                            "format) or an ASDiv .xml file, or pass kind=")


def test_kind_override_that_does_not_fit(tmp_path):
    f = write_jsonl(tmp_path / "m.jsonl", [{"problem": "p", "answer": "3"}])
    with pytest.raises(DatasetError) as e:
        load_problems(dataset=str(f), kind="gsm8k")
    assert str(e.value) == (f"GSM8K record has no 'question' text ({f}, line 1). "
                            'Each line must be {"question": ..., "answer": "...\\n#### N"}')


def test_undetectable_jsonl(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "42"}])
    with pytest.raises(DatasetError) as e:
        load_problems(dataset=str(f))
    assert str(e.value) == (f"cannot tell the dataset format of the first record ({f}). Expected GSM8K lines "
                            "{question, answer ending '#### N'} or MATH-500 lines {problem, answer}; "
                            "or pass kind='gsm8k' or kind='math500'")


# --- subsets --------------------------------------------------------------------------


def test_limit_without_seed_is_the_first_n():
    full = load_problems(dataset="math500")
    ps = load_problems(dataset="math500", limit=5)
    assert ps.problems == full.problems[:5]
    assert ps.description == "MATH-500 test: first 5 of 500 problems"


def test_seed_gives_a_deterministic_shuffled_subset():
    a = load_problems(dataset="gsm8k", limit=20, seed=7)
    b = load_problems(dataset="gsm8k", limit=20, seed=7)
    c = load_problems(dataset="gsm8k", limit=20, seed=8)
    first = load_problems(dataset="gsm8k", limit=20)
    assert [p.id for p in a] == [p.id for p in b]
    assert [p.id for p in a] != [p.id for p in c]
    assert [p.id for p in a] != [p.id for p in first]
    assert len({p.id for p in a}) == 20
    assert a.description == "GSM8K test: 20 of 1319 problems, shuffled with seed 7"
    assert sorted(p.id for p in load_problems(dataset="gsm8k", seed=7)) == sorted(p.id for p in
                                                                                   load_problems(dataset="gsm8k"))


def test_limit_larger_than_the_set_and_bad_limit():
    assert len(load_problems(dataset=str(FIXTURE), limit=100)) == 7
    with pytest.raises(OptionsError) as e:
        load_problems(dataset="gsm8k", limit=0)
    assert str(e.value) == ("limit must be a positive integer, got 0 (load_problems(limit=...)). "
                            "Pass limit=None to use all problems")


def test_options_dataclass_feeds_load_problems():
    import dataclasses

    opts = DatasetOptions(dataset="math500", limit=2)
    assert len(load_problems(**dataclasses.asdict(opts))) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.limit = 3


# --- errors ---------------------------------------------------------------------------


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DatasetError) as e:
        load_problems(dataset=str(missing))
    assert str(e.value) == (f"dataset file not found ({missing}). Check the path; ASDiv is not bundled, "
                            "pass the path of your ASDiv.xml")


def test_malformed_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"question": "q", "answer": "a\\n#### 1"}\n\n{"question": oops}\n', encoding="utf-8")
    with pytest.raises(DatasetError) as e:
        load_problems(dataset=str(f))
    assert str(e.value) == f"not valid JSON: Expecting value ({f}, line 3). Each line must be one JSON object"


def test_gsm8k_line_without_final_answer(tmp_path):
    f = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "w\n#### 1"}, {"question": "q", "answer": "7"}])
    with pytest.raises(DatasetError) as e:
        load_problems(dataset=str(f))
    assert str(e.value) == (f"GSM8K answer has no '#### N' final line ({f}, line 2). End each answer with "
                            "'#### <number>', or pass kind='math500' for {problem, answer} records")


def test_bad_xml(tmp_path):
    f = tmp_path / "broken.xml"
    f.write_text("<ProblemSet><Problem>", encoding="utf-8")
    with pytest.raises(DatasetError) as e:
        load_problems(dataset=str(f))
    assert str(e.value) == (f"not valid XML (no element found: line 1, column 21) ({f}). "
                            "Pass ASDiv.xml from github.com/chaochun/nlu-asdiv-dataset")


def test_unknown_name():
    with pytest.raises(DatasetError) as e:
        load_problems(dataset="svamp")
    assert str(e.value) == ("unknown dataset 'svamp' (load_problems(dataset=...)). Use gsm8k, math500, toy, "
                            "a Hub id (openai/gsm8k, HuggingFaceH4/MATH-500, EleutherAI/asdiv, HuggingFaceH4/aime_2024, "
                            "Maxwell-Jia/AIME_2024) or a local "
                            ".jsonl/.xml file path such as '/data/ASDiv.xml'")


def test_unknown_kind():
    with pytest.raises(OptionsError) as e:
        load_problems(dataset="gsm8k", kind="svamp")
    assert str(e.value) == ("unknown dataset kind 'svamp' (load_problems(kind=...)). "
                            "Use one of: gsm8k, math500, asdiv, aime, or leave it unset to detect")


# --- Hub (datasets.load_dataset is replaced: no network in tests) -----------------------


def test_hub_offline_gives_a_one_line_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub\n(offline)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetError) as e:
        load_problems(dataset="openai/gsm8k")
    assert str(e.value) == ("cannot load Hub dataset split 'test' (ConnectionError) (openai/gsm8k). Pass a local "
                            "file instead: a GSM8K-format .jsonl, a MATH-500 .jsonl, or ASDiv.xml "
                            "(e.g. dataset='/data/ASDiv.xml')")


def test_hub_rows_are_converted(monkeypatch):
    import datasets

    calls = []
    rows = {
        "openai/gsm8k": [{"question": "q1", "answer": "a <<1+1=2>>2\n#### 2,000"}],
        "EleutherAI/asdiv": [
            {"body": "Body.", "question": "How many?", "solution_type": "Addition", "answer": "9 (apples)",
             "formula": "7+2=9"},
            {"body": "B.", "question": "Q?", "solution_type": "Ratio", "answer": "5:6", "formula": "10:12=5:6"}],
    }

    def fake(name, config=None, *, split):
        calls.append((name, config, split))
        return rows[name]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    g = load_problems(dataset="openai/gsm8k")
    a = load_problems(dataset="EleutherAI/asdiv")
    assert calls == [("openai/gsm8k", "main", "test"), ("EleutherAI/asdiv", None, "validation")]
    assert [(p.id, p.gold, p.solution) for p in g] == [("openai/gsm8k/test/0", "2000", "a 2")]
    assert (g.source, g.kind) == ("openai/gsm8k", "gsm8k")
    assert [(p.question, p.gold) for p in a] == [("Body. How many?", "9")]
    assert a.excluded == {"ratio": 1}


def test_problem_is_frozen():
    import dataclasses

    p = Problem(id="x", question="q", gold="1")
    assert (p.solution, p.meta) == (None, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.gold = "2"


# --- AIME (not bundled: no clearly licensed copy offline; common layouts load) -----------


AIME_ROWS = [{"problem": "Find x.", "answer": "204", "id": 60, "url": "https://aops/x", "year": 2024},
             {"problem": "Find y.", "answer": "033"}]


@pytest.mark.parametrize("name,rows,kind", [
    ("aime24.jsonl", AIME_ROWS, None),  # HuggingFaceH4/aime_2024 layout; "aime" in the name
    ("test.jsonl", [{"ID": "2024-I-1", "Problem": "Find x.", "Answer": 204},
                    {"ID": "2024-I-2", "Problem": "Find y.", "Answer": 33}], None),  # Maxwell-Jia layout
    ("test.jsonl", [{"question": "Find x.", "answer": 204}, {"question": "Find y.", "answer": 33}], None),
    ("problems.jsonl", AIME_ROWS, "aime"),
])
def test_aime_layouts(tmp_path, name, rows, kind):
    f = write_jsonl(tmp_path / name, rows)
    ps = load_problems(dataset=str(f), kind=kind)
    assert ps.kind == "aime" and [(p.question, p.gold) for p in ps] == [("Find x.", "204"), ("Find y.", "33")]
    assert ps.description.startswith("AIME (")


def test_aime_json_list(tmp_path):
    f = tmp_path / "aime_2024.json"
    f.write_text(json.dumps(AIME_ROWS))
    ps = load_problems(dataset=str(f))
    assert ps.kind == "aime" and [p.id for p in ps] == ["60", "aime_2024/1"] and ps.problems[0].meta["year"] == 2024


@pytest.mark.parametrize("answer", ["1000", "-3", "12.5", "\\frac{1}{2}", True])
def test_aime_answer_must_be_an_integer_0_to_999(tmp_path, answer):
    f = write_jsonl(tmp_path / "aime.jsonl", [{"problem": "p", "answer": answer}])
    with pytest.raises(DatasetError) as e:
        load_problems(dataset=str(f))
    assert str(e.value) == (f"AIME answer is not an integer 0–999: {answer!r} ({f}, line 1). AIME answers are "
                            "integers from 0 to 999; pass kind='math500' for other answers")


def test_math500_layout_is_still_math500(tmp_path):
    f = write_jsonl(tmp_path / "m.jsonl", [{"problem": "p", "answer": "12", "subject": "Algebra"}])
    assert load_problems(dataset=str(f)).kind == "math500"


def test_aime_hub_ids(monkeypatch):
    import datasets

    calls = []
    rows = {"HuggingFaceH4/aime_2024": [{"id": 60, "problem": "Find x.", "answer": "204", "year": "2024"}],
            "Maxwell-Jia/AIME_2024": [{"ID": "2024-II-4", "Problem": "Find y.", "Answer": 33}]}

    def fake(name, config=None, *, split):
        calls.append((name, config, split))
        return rows[name]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    a, b = load_problems(dataset="HuggingFaceH4/aime_2024"), load_problems(dataset="Maxwell-Jia/AIME_2024")
    assert calls == [("HuggingFaceH4/aime_2024", None, "train"), ("Maxwell-Jia/AIME_2024", None, "train")]
    assert [(p.id, p.gold, a.kind) for p in a] == [("60", "204", "aime")]
    assert [(p.id, p.question, p.gold, b.kind) for p in b] == [("2024-II-4", "Find y.", "33", "aime")]


def test_aime_is_scored_as_integers():
    from tvtool.evaluation.scoring import score

    assert score(r"so the answer is \boxed{033}", "33", kind="aime").correct is True
    assert score("…the answer is 204. I think that's it.", "204", kind="aime").correct is True
    assert score(r"\boxed{204.5}", "204", kind="aime").correct is False
