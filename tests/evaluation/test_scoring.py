"""Answer extraction and scoring on hand-written responses (GSM8K, ASDiv, MATH-500)."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from tvtool.evaluation import mathverify
from tvtool.evaluation.mathverify import VerifyWorker
from tvtool.evaluation.scoring import (Score, ScoringError, extract_answer, extract_boxed, is_correct, parse_number, score)

# --- extract_boxed ----------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    (r"so the answer is \boxed{42}.", "42"),
    (r"So the answer is \boxed{ 42 }", "42"),  # the toy model's spacing
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"first \boxed{3} then, correcting, \boxed{5}", "5"),
    (r"\fbox{7}", "7"),
    (r"\boxed {8}", "8"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not close the box
    (r"\boxed{\boxed{9}}", "9"),
    (r"\boxed{5} and then the output was cut: \boxed{\frac{1}{", "5"),
    ("no box here, the answer is 12", None),
    (r"\boxed{", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


# --- extract_answer ------------------------------------------------------------------------


@pytest.mark.parametrize("text,kind,expected", [
    (r"2 + 2 = 4, so \boxed{4}. Check: 4 + 1 = 5", "gsm8k", "4"),  # the box wins over later numbers
    ("She pays 3 * 6 = 18 dollars. The answer is 18.", "gsm8k", "18"),
    ("It costs $1,450,000 in total.", "gsm8k", "1,450,000"),
    ("The temperature is -10 degrees.", "gsm8k", "-10"),
    ("10-3 = 7", "gsm8k", "7"),
    ("x = -5.", "gsm8k", "-5"),
    ("The answer is .5", "gsm8k", ".5"),
    ("The answer is 5/2.", "asdiv", "5/2"),
    ("I do not know.", "gsm8k", None),
    ("The answer is 18.", "math500", "18"),  # paper A.1: the fallback holds on every dataset
    (r"The answer is $\boxed{\frac43}$", "math500", r"\frac43"),
])
def test_extract_answer(text, kind, expected):
    assert extract_answer(text, kind=kind) == expected


def test_unknown_kind():
    with pytest.raises(ScoringError) as e:
        extract_answer("1", kind="svamp")
    assert str(e.value) == "unknown answer kind 'svamp' (tvtool.evaluation.scoring). Use one of: gsm8k, math500, asdiv, aime"
    with pytest.raises(ScoringError) as e:
        extract_answer("1", kind="gsm8k", rule="loose")
    assert str(e.value) == ("unknown answer rule 'loose' (tvtool.evaluation.scoring). "
                            "Use one of: paper, boxed-only, strict-match, flexible-extract")


# --- numbers (gsm8k, asdiv) -------------------------------------------------------------


@pytest.mark.parametrize("pred,gold", [
    ("18", "18"), ("18.00", "18"), ("$18", "18"), (r"\$18", "18"), ("18 dollars", "18"),
    (r"18\text{ dollars}", "18"), (r"\text{18}", "18"), ("1,000", "1000"), ("1{,}000", "1000"),
    ("1450000", "1450000"), ("-3", "-3"), (r"-\frac{1}{3}", "-1/3"), ("-(1/3)", "-1/3"),
    ("0.50", ".5"), (".5", "0.5"), (r"\frac{1}{2}", "0.5"), ("1/2", "0.5"), (r"\dfrac{5}{2}", "5/2"),
    ("2.5", "5/2"), ("9 apples", "9 (apples)"), ("9", "9 (apples)"), ("14", "14  (seats)"),
    ("25%", "25"), (r"25\%", "25"), ("x = 5", "5"), (r"\left(5\right)", "5"),
    ("17.9999999", "18"), ("3.1416", "3.14 (square yards)"), ("0.333", "0.333"),
])
def test_numbers_that_match(pred, gold):
    assert is_correct(pred, gold, kind="gsm8k") is True
    assert is_correct(pred, gold, kind="asdiv") is True


@pytest.mark.parametrize("pred,gold", [
    ("17", "18"), ("-18", "18"), ("18", "-18"), ("1.8", "18"), ("0.33", "-1/3"), ("0.33", "1/3"),
    ("0.54", "0.5"), ("8; 40", "8"), ("5:45", "5"), ("2+3", "5"), ("Yes", "1"), ("", "5"), (None, "5"),
    ("3.15", "3.14"), ("1/0", "0"),
])
def test_numbers_that_do_not_match(pred, gold):
    assert is_correct(pred, gold, kind="gsm8k") is False


@pytest.mark.parametrize("text,value", [
    ("1,000", 1000), ("-0.25", -0.25), (r"\frac{3}{4}", 0.75), (r"\frac34", 0.75), ("9 (apples)", 9),
    ("8; 40", None), ("Mrs. Hilt", None), ("5:6", None), ("1" * 5000, None),
])
def test_parse_number(text, value):
    got = parse_number(text)
    assert (got if got is None else float(got)) == value


def test_score_gsm8k_and_asdiv_responses():
    assert score(r"16 - 3 - 4 = 9 eggs, 9 * 2 = 18. So the answer is \boxed{ 18 }", "18", kind="gsm8k") == \
        Score(extracted="18", correct=True, boxed=True)
    assert score("That makes $1,450,000.", "1450000", kind="gsm8k") == Score(extracted="1,450,000", correct=True)
    assert score(r"\boxed{17}", "18", kind="gsm8k") == Score(extracted="17", correct=False, boxed=True)
    assert score("no idea", "18", kind="gsm8k") == Score(extracted=None, correct=False)
    assert score(r"\boxed{9 \text{ apples}}", "9 (apples)", kind="asdiv").correct is True
    # without a box the LAST number counts (paper A.1), even when an earlier one was right
    assert score("There are 9 apples, and 2 of them are green.", "9", kind="asdiv") == \
        Score(extracted="2", correct=False)
    assert score("7 + 2 = 9 apples", "9", kind="asdiv") == Score(extracted="9", correct=True)


# --- MATH-500 (math-verify) -----------------------------------------------------------------


@pytest.mark.parametrize("pred,gold", [
    (r"\frac{4}{3}", r"\frac43"),
    (r"(3, \pi/2)", r"\left( 3, \frac{\pi}{2} \right)"),
    ("10080", r"10,\!080"),
    ("11111111100", r"11,\! 111,\! 111,\! 100"),
    ("C", r"\text{(C)}"),
    ("(C)", r"\text{(C)}"),
    (r"(3, 4]", r"(3,4]"),
    (r"(-\infty,0]", r"(-\infty, 0]"),
    (r"(0,9)\cup(9,36)", r"(0,9) \cup (9,36)"),
    ("-2, 1", "1,-2"),
    (r"\frac{9}{5}", r"1\frac{4}{5}"),
    ("0.0000672", ".0000672"),
    ("32348", r"\$32,\!348"),
    (r"\sqrt{117}", r"3\sqrt{13}"),
    ("90", r"90^\circ"),
    (r"\begin{pmatrix} -\frac13 \\ \frac23 \\ \frac53 \end{pmatrix}",
     r"\begin{pmatrix} -1/3 \\ 2/3 \\ 5/3 \end{pmatrix}"),
])
def test_math500_equivalent_forms(pred, gold):
    assert is_correct(pred, gold, kind="math500") is True


@pytest.mark.parametrize("pred,gold", [
    ("D", r"\text{(C)}"),
    ("(3,4)", "(3,4]"),
    ("4.67", r"\frac{14}{3}"),
    (r"\frac{3}{4}", r"\frac43"),
    ("(3, \\pi)", r"\left( 3, \frac{\pi}{2} \right)"),
    ("1, 2", "1,-2"),
    ("", "5"),
    (None, "5"),
])
def test_math500_wrong_answers(pred, gold):
    assert is_correct(pred, gold, kind="math500") is False


def test_score_math500_response():
    resp = r"Hence $r = 3$ and $\theta = \pi/2$, i.e. $\boxed{\left(3, \dfrac{\pi}{2}\right)}$."
    assert score(resp, r"\left( 3, \frac{\pi}{2} \right)", kind="math500") == \
        Score(extracted=r"\left(3, \dfrac{\pi}{2}\right)", correct=True, boxed=True)
    assert score("The answer is 4/3.", r"\frac43", kind="math500") == Score(extracted="4/3", correct=True)
    assert score("The answer is 4/3.", r"\frac43", kind="math500", rule="boxed-only") == \
        Score(extracted=None, correct=False)


def test_pathological_expression_times_out_in_main_thread():
    t = time.monotonic()
    assert is_correct(r"9^{9^{9^{9}}}", "5", kind="math500", timeout=1) is False
    assert time.monotonic() - t < 10


# --- non-main threads (math-verify's signal timeouts cannot run there) ---------------------


def _in_thread(fn):
    out, errors = [], []

    def run():
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            errors.append(e)

    th = threading.Thread(target=run)
    th.start()
    th.join(120)
    assert not th.is_alive(), "scoring hung in a worker thread"
    if errors:
        raise errors[0]
    return out[0]


def test_scoring_from_a_non_main_thread():
    got = _in_thread(lambda: (
        score(r"\boxed{\frac{4}{3}}", r"\frac43", kind="math500"),
        score(r"\boxed{\frac{3}{4}}", r"\frac43", kind="math500"),
        score(r"\boxed{(3, \pi/2)}", r"\left( 3, \frac{\pi}{2} \right)", kind="math500").correct,
        score(r"\boxed{18}", "18", kind="gsm8k").correct,
    ))
    assert got == (Score(extracted=r"\frac{4}{3}", correct=True, boxed=True),
                   Score(extracted=r"\frac{3}{4}", correct=False, boxed=True),
                   True, True)


def test_pathological_expression_in_a_thread_does_not_hang():
    t = time.monotonic()
    got = _in_thread(lambda: is_correct(r"9^{9^{9^{9}}}", "5", kind="math500", timeout=1))
    assert got is False
    assert time.monotonic() - t < 30
    assert _in_thread(lambda: is_correct(r"\frac{4}{3}", r"\frac43", kind="math500"))  # worker still usable


def test_worker_past_the_deadline_is_killed_and_restarted():
    hang = "print('ready', flush=True)\nimport sys, time\nfor line in sys.stdin:\n    time.sleep(60)\n"
    worker = VerifyWorker(argv=[sys.executable, "-c", hang])
    try:
        t = time.monotonic()
        assert worker.verify(gold="1", pred="1", timeout=1) is None
        assert time.monotonic() - t < mathverify.HARD_DEADLINE_FACTOR * 1 + 5
        assert worker._proc is None  # killed; the next call starts a fresh child
        assert worker.verify(gold="1", pred="1", timeout=1) is None
    finally:
        worker.close()


def test_worker_that_cannot_start():
    worker = VerifyWorker(argv=[sys.executable, "-c", "raise SystemExit(1)"])
    with pytest.raises(ScoringError) as e:
        worker.verify(gold="1", pred="1", timeout=1)
    assert str(e.value) == (f"the math-verify worker process did not start ({sys.executable}). "
                            "Check that `python -c 'import math_verify'` works in this environment")


# --- answers that real models write: exact response tail, gold, verdict -----------------------

# (response tail, gold, kind, extracted by the paper rule, verdict)
FORMATS = [
    # GSM8K/ASDiv numbers that were missed
    (r"So Mark earns \boxed{\$9 500} a month.", "9500", "gsm8k", r"\$9 500", True),
    (r"The house now costs \boxed{\$118 000}", "118000", "gsm8k", r"\$118 000", True),
    ("Therefore, the house is now worth $118 000.", "118000", "gsm8k", "118 000", True),
    (r"She spent \boxed{€77}", "77", "gsm8k", "€77", True),
    ('The TV is \\boxed{67"} wide.', "67", "gsm8k", '67"', True),
    (r"He earns \boxed{\$18,000/year}", "18000", "gsm8k", r"\$18,000/year", True),
    (r"\boxed{Seth is 16 years old}", "16", "gsm8k", "Seth is 16 years old", True),
    (r"\boxed{Seth is 16 years old}", "17", "gsm8k", "Seth is 16 years old", False),
    # MATH-500
    (r"She is in \boxed{12^{\text{th}}\text{ grade}}.", "12", "math500", r"12^{\text{th}}\text{ grade}", True),
    (r"$\boxed{12^{\text{th}}\text{ grade}}$", "11", "math500", r"12^{\text{th}}\text{ grade}", False),
    (r"so $\boxed{\frac{\cos x}{\sin x}}$", r"\cot x", "math500", r"\frac{\cos x}{\sin x}", True),
    # kept right (other graders got these wrong)
    (r"The bag weighs \boxed{5 pounds}", "5", "gsm8k", "5 pounds", True),
    (r"The bag weighs \boxed{5 pounds}", "80", "gsm8k", "5 pounds", False),
    (r"Total: \boxed{86+42=128}", "128", "gsm8k", "86+42=128", True),
    (r"Total: \boxed{86+42=128}", "86", "gsm8k", "86+42=128", False),
    (r"She pays \boxed{\$50}", "0.5", "gsm8k", r"\$50", False),  # gold × 100 (cents) is not the dollars answer
    (r"She pays \boxed{50}", "0.5", "gsm8k", "50", False),
    (r"$x \in \boxed{[2,\infty)}$", r"(2,\infty)", "math500", r"[2,\infty)", False),
    (r"\boxed{11,111,111,110}", r"11,\! 111,\! 111,\! 100", "math500", "11,111,111,110", False),
    (r"\boxed{11,111,111,110}", "11111111100", "gsm8k", "11,111,111,110", False),
    # a box cut off by the length limit: the last complete box counts
    (r"so \boxed{7}. Let me double-check: the final answer is \boxed{\frac{1}{", "7", "gsm8k", "7", True),
    (r"so \boxed{7}. Hmm, wait, it is \boxed{\frac{15}{", r"\frac{15}{2}", "math500", "7", False),
]


@pytest.mark.parametrize("tail,gold,kind,extracted,verdict", FORMATS)
def test_answer_formats_real_models_write(tail, gold, kind, extracted, verdict):
    boxed = "\\boxed" in tail  # every boxed case here has a complete box
    assert score(tail, gold, kind=kind) == Score(extracted=extracted, correct=verdict, boxed=boxed)


def test_unboxed_math500_gets_the_last_number_and_boxed_only_gets_none():
    tail = "…So, the result is 23. I think that's the answer."
    assert score(tail, "23", kind="math500") == Score(extracted="23", correct=True, boxed=False)
    assert score(tail, "23", kind="math500", rule="boxed-only") == Score(extracted=None, correct=False, boxed=False)


def test_partial_box_is_skipped_also_by_the_number_fallback():
    # no complete box: the digits of the cut-off box are not an answer, the last number before it is
    assert extract_answer(r"5 + 3 = 8, so the answer is \boxed{12", kind="gsm8k") == "8"
    assert extract_answer(r"\boxed{12", kind="gsm8k", rule="boxed-only") is None


# --- lm-evaluation-harness GSM8K filters ---------------------------------------------------


@pytest.mark.parametrize("response,strict,flexible", [
    ("3 + 4 = 7 apples.\n#### 7", "7", "7"),
    ("The answer is 1,234.", None, "1,234."),  # strict needs '####'
    ("#### 12\nThen I kept going: 13 14", "12", "14"),  # strict: first '####'; flexible: last number
    ("It costs $18.00 in total", None, "$18.00"),
    ("#### -5.5 and then #### 6", "-5.5", "6"),
    ("x = 7", None, "7"),  # one digit: the second alternative
    ("no numbers", None, None),
])
def test_harness_regexes(response, strict, flexible):
    assert extract_answer(response, kind="gsm8k", rule="strict-match") == strict
    assert extract_answer(response, kind="gsm8k", rule="flexible-extract") == flexible


def test_harness_exact_match():
    assert score("so #### 1,234", "1234", kind="gsm8k", rule="strict-match").correct is True
    assert score("The answer is 1,234.", "1234", kind="gsm8k", rule="strict-match").correct is False
    assert score("The answer is 1,234.", "1234", kind="gsm8k", rule="flexible-extract").correct is True
    assert score("It costs $18.", "18", kind="gsm8k", rule="flexible-extract").correct is True
    # exact string match, as the harness: 18.00 is not 18 (the paper rule compares numbers)
    assert score("It costs 18.00", "18", kind="gsm8k", rule="flexible-extract").correct is False
    assert score("It costs 18.00", "18", kind="gsm8k").correct is True
    # flexible takes the last number even after a box (LLaMA-3.1-8B repeats: why A.1 used strict there)
    assert score(r"\boxed{18} Question: 5 more", "18", kind="gsm8k", rule="flexible-extract").correct is False
