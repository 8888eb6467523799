"""Answer extraction and scoring for GSM8K, ASDiv, MATH-500 and AIME responses.

Answer rules (`ANSWER_RULES`; `EvalOptions.answer_rule`):
- `paper` (default), CoT-Valve appendix A.1 for QwQ, R1-Distill and LIMO: "we first extract
  the result enclosed within \\boxed{}. If no such boxed answer is found, we default to using
  the last digit in the response as the final answer." Applied on EVERY dataset (A.1 does not
  restrict it to GSM8K): the last complete box, else the last number. A box cut off by the
  length limit is skipped (and its digits are not used as the fallback number).
- `boxed-only`: the last complete box, else no answer.
- `strict-match` / `flexible-extract`: lm-evaluation-harness's GSM8K filters, which A.1 uses
  for the LLaMA models (strict for LLaMA-3.1-8B, flexible for LLaMA-3.2-1B-Instruct):
  regex `#### (\\-?[0-9\\.\\,]+)` (first match) and `(-?[$0-9.,]{2,})|(-?[0-9]+)` (last match),
  compared as the harness's exact_match does (ignore case; drop `,`, `$`, a trailing `.`).

GSM8K/ASDiv/AIME answers are compared as numbers (exact rationals, then a small tolerance).
MATH-500 answers are compared with math-verify; ordinal marks and trailing `\\text{...}` units
(`12^{\\text{th}}\\text{ grade}`) are stripped when the first comparison fails.
math-verify runs in this process or in a worker process (`tvtool.evaluation.mathverify`), so a
pathological expression never hangs evaluation.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

from tvtool.errors import ScoringError
from tvtool.evaluation.mathverify import VERIFY_TIMEOUT_S, verify_equal

KINDS = ("gsm8k", "math500", "asdiv", "aime")
ANSWER_RULES = ("paper", "boxed-only", "strict-match", "flexible-extract")


@dataclass(frozen=True)
class Score:
    """What was read from one response and whether it matches the reference."""

    extracted: str | None  # the answer read from the response, None if none was found
    correct: bool
    boxed: bool = False  # the response has a complete \\boxed{} (else a fallback, or nothing, was used)


# --- extraction ---------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A number not glued to a preceding word/number (so "10-3" gives 10 and 3, not -3):
# comma- or space-grouped thousands ("118 000") or a plain integer, optional decimals, a bare decimal, or a/b.
_NUMBER_RE = re.compile(
    r"(?:(?<![\w.)\]}])-)?(?:\d+/\d+(?!\d|\.\d)|(?:\d{1,3}(?:,\d{3})+|\d{1,3}(?:[ \u00a0\u202f]\d{3})+(?!\d)|\d+)"
    r"(?:\.\d+)?|\.\d+)"
)
# lm-evaluation-harness gsm8k.yaml filters (strict-match: first match; flexible-extract: last match).
HARNESS_STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
HARNESS_FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def _check_kind(kind: str, rule: str = "paper") -> None:
    if kind not in KINDS:
        raise ScoringError(f"unknown answer kind {kind!r}", where="tvtool.evaluation.scoring",
                           fix=f"Use one of: {', '.join(KINDS)}")
    if rule not in ANSWER_RULES:
        raise ScoringError(f"unknown answer rule {rule!r}", where="tvtool.evaluation.scoring",
                           fix=f"Use one of: {', '.join(ANSWER_RULES)}")


def _balanced(text: str, start: int) -> int | None:
    """Index of the `}` closing the group that opens just before `start`, or None."""
    depth, i = 1, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # \{ and \} are literal braces; skip any escaped char
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` / `\\fbox{...}`, stripped; None if none.

    Braces are balanced, so `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`. A box cut off by
    the generation limit (never closed) is skipped in favour of the last complete one.
    """
    for m in reversed(list(_BOX_RE.finditer(text))):
        end = _balanced(text, m.end())
        if end is not None:
            return text[m.end():end].strip()
    return None


def _harness_extract(text: str, regex: re.Pattern, select: int) -> str | None:
    """lm-eval's RegexFilter: findall, pick a match, the first non-empty group of a tuple."""
    found = regex.findall(text)
    if not found:
        return None  # the harness writes "[invalid]", which never matches
    m = found[select]
    if isinstance(m, tuple):
        m = next((g for g in m if g), "")
    return m.strip()


def last_number(text: str) -> str | None:
    """The last number in `text`, ignoring an unclosed box at the end (a cut-off answer)."""
    opens = [m for m in _BOX_RE.finditer(text) if _balanced(text, m.end()) is None]
    numbers = _NUMBER_RE.findall(text[:opens[0].start()] if opens else text)
    return numbers[-1] if numbers else None


def extract_answer(text: str, *, kind: str, rule: str = "paper") -> str | None:
    """The answer `rule` reads from `text` (see the module docstring), None if there is none."""
    _check_kind(kind, rule)
    if rule == "strict-match":
        return _harness_extract(text, HARNESS_STRICT_RE, 0)
    if rule == "flexible-extract":
        return _harness_extract(text, HARNESS_FLEXIBLE_RE, -1)
    boxed = extract_boxed(text)
    if boxed is not None or rule == "boxed-only":
        return boxed
    return last_number(text)


# --- numeric comparison (gsm8k, asdiv) ------------------------------------------

_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname|boxed)\s*\{([^{}]*)\}")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*(?:\{([^{}]*)\}|(\d))\s*(?:\{([^{}]*)\}|(\d))")
_LEAD_RE = re.compile(
    r"(?P<sign>[-+]?)\s*(?:\(\s*(?P<pnum>-?\s*[\d.]+)\s*\)\s*/\s*\(\s*(?P<pden>[\d.]+)\s*\)"
    r"|\(\s*(?P<inum>\d+)\s*/\s*(?P<iden>\d+)\s*\)"
    r"|(?P<num>\d+)\s*/\s*(?P<den>\d+)(?!\d|\.\d)"
    r"|(?P<dec>\d+(?:\.\d*)?|\.\d+))"
)
_THOUSANDS_RE = re.compile(r"\d{1,3}(?:,\d{3})+(?![\d,])")
_SPACE_THOUSANDS_RE = re.compile(r"(?<![\d.])\d{1,3}(?:[ \u00a0\u202f]\d{3})+(?!\d)")  # "9 500", "118 000"
_CURRENCY = ("\\$", "$", "\\euro", "\\pounds", "€", "£", "¥", "₹")
# What may follow the number: end, a word (unit), an inch/foot/degree mark, a rate ("/year"), "(unit)".
_REST_OK_RE = re.compile(r"[.!]?$|[A-Za-z\"'″′”°]|/\s*[A-Za-z]|\((?![\s\d.+-])")
# One number in a short sentence: "Seth is 16 years old".
_SENTENCE_RE = re.compile(r"(?:[A-Za-z'’]+\s+)+(?P<n>-?\d+(?:\.\d+)?)(?:\s+[A-Za-z'’]+)*\s*\.?")


def _clean(text: str) -> str:
    """Strip LaTeX wrappers, currency, percent and thousands commas from an answer."""
    s = text.strip()
    for _ in range(3):  # nested \text{\textbf{...}}
        s = _TEXT_CMD_RE.sub(r" \1 ", s)
    s = _FRAC_RE.sub(lambda m: f"({m[1] or m[2]})/({m[3] or m[4]})", s)
    for tok in ("\\!", "\\,", "\\;", "\\:"):  # thin spaces, also inside numbers: 10,\!080
        s = s.replace(tok, "")
    for tok in ("\\left", "\\right", "\\ ", "~", *_CURRENCY, "\\%", "%", "^\\circ", "^{\\circ}",
                "\\circ", "\\displaystyle"):
        s = s.replace(tok, " ")
    s = s.replace("{,}", ",")
    s = s.replace("\\approx", "=").replace("\\cdot", "*").replace("\\times", "*")
    if "=" in s:  # "x = 5", "16-3-4=9": the value is after the last '='
        s = s.rsplit("=", 1)[1]
    s = s.strip().strip("{}").strip()
    s = _THOUSANDS_RE.sub(lambda m: m[0].replace(",", ""), s)
    s = _SPACE_THOUSANDS_RE.sub(lambda m: re.sub(r"\s", "", m[0]), s)
    m = re.fullmatch(r"\(\s*([-+]?[\d.]+)\s*\)", s)  # "(5)"
    return m[1] if m else s


def parse_number(text: str | None) -> Fraction | None:
    """The single number `text` states (units and words after it allowed), or None.

    Accepts `18`, `-3`, `0.50`, `.5`, `1,000`, `9 500`, `$18`, `€77`, `67"`, `$18,000/year`,
    `18 dollars`, `9 (apples)`, `\\text{9 apples}`, `Seth is 16 years old`, `\\frac{1}{2}`, `1/2`,
    `-(1/3)`, `25%`. Rejects text, several numbers (`8; 40`), ratios and clock times (`5:45`)
    and expressions (`2+3`).
    """
    if text is None:
        return None
    s = _clean(text)
    m = _LEAD_RE.match(s)
    if not m:
        m = _SENTENCE_RE.fullmatch(s)
        return Fraction(m["n"]) if m else None
    rest = s[m.end():].strip()
    if rest and (not _REST_OK_RE.match(rest) or re.search(r"[;:]", rest)):
        return None  # another number, an operator, a second answer after ';' ...
    try:
        if m["pnum"] is not None:
            value = Fraction(m["pnum"].replace(" ", "")) / Fraction(m["pden"])
        elif m["inum"] is not None:
            value = Fraction(int(m["inum"]), int(m["iden"]))
        elif m["num"] is not None:
            value = Fraction(int(m["num"]), int(m["den"]))
        else:
            value = Fraction(m["dec"])
    except (ValueError, ZeroDivisionError):  # 1/0, or a number over Python's digit limit
        return None
    return -value if m["sign"] == "-" else value


def _decimals(text: str) -> int:
    m = re.match(r"\s*-?\d*\.(\d+)", _clean(text))
    return len(m[1]) if m else 0


def numbers_match(pred: str | None, gold: str) -> bool:
    """Numeric equality of two answers: exact rationals (always for two integers), else within 1e-6 relative.

    If the reference is written with 2+ decimals (ASDiv `3.14 (square yards)`, `3.333`),
    a more precise prediction that rounds to it also counts (3.1416 == 3.14).
    """
    p, g = parse_number(pred), parse_number(gold)
    if p is None or g is None:
        return False
    if p == g:
        return True
    if p.denominator == 1 and g.denominator == 1:  # integers: exact (11,111,111,110 is not 11,111,111,100)
        return False
    if abs(p - g) <= Fraction(1, 10**6) * max(1, abs(g)):
        return True
    k = _decimals(gold)
    return k >= 2 and math.floor(p * 10**k + Fraction(1, 2)) == g * 10**k


# --- MATH-500 comparison (math-verify, tvtool.evaluation.mathverify) ----------------------


_ORDINAL_RE = re.compile(r"(?<=\d)\s*\^\s*\{?\s*(?:\\(?:text|textrm|mathrm)\s*\{\s*)?(?:st|nd|rd|th)\s*\}?\s*\}?")
_TEXT_UNIT_RE = re.compile(r"(?:\\[,;:! ]|\s)*\\(?:text|textrm|mathrm|mbox)\s*\{\s*[A-Za-z][A-Za-z .]*\}"
                           r"(?:\s*\^\s*\{?\d\}?)?\s*$")


def strip_units(answer: str) -> str:
    """`12^{\\text{th}}\\text{ grade}` -> `12`: drop ordinal marks and trailing `\\text{...}` words
    (math-verify cannot parse them). An answer that is only text is kept as it is."""
    s = _ORDINAL_RE.sub("", answer)
    while (m := _TEXT_UNIT_RE.search(s)) and s[:m.start()].strip():
        s = s[:m.start()]
    return s.strip()


def math_equal(pred: str | None, gold: str, *, timeout: int = VERIFY_TIMEOUT_S) -> bool:
    """MATH-500 equivalence of a LaTeX answer and the reference, via math-verify (again without
    ordinal marks and text units when that fails and stripping changed something)."""
    if pred is None or not pred.strip():
        return False
    if verify_equal(pred=pred, gold=gold, timeout=timeout):
        return True
    sp, sg = strip_units(pred), strip_units(gold)
    return (sp, sg) != (pred.strip(), gold.strip()) and bool(sp) and verify_equal(pred=sp, gold=sg, timeout=timeout)


def harness_match(pred: str | None, gold: str) -> bool:
    """lm-eval's exact_match for gsm8k: ignore_case, regexes_to_ignore `,` `\\$` `(?s).*#### ` `\\.$`."""
    if pred is None:
        return False

    def norm(x: str) -> str:
        for rx in (",", "\\$", "(?s).*#### ", "\\.$"):
            x = re.sub(rx, "", x)
        return x.lower()

    return norm(pred) == norm(gold)


# --- public entry points --------------------------------------------------------


def is_correct(pred: str | None, gold: str, *, kind: str, rule: str = "paper",
               timeout: int = VERIFY_TIMEOUT_S) -> bool:
    """Whether an extracted answer matches the reference answer of a `kind` dataset (the lm-eval
    rules compare as the harness does; the others as numbers, or with math-verify for MATH-500)."""
    _check_kind(kind, rule)
    if rule in ("strict-match", "flexible-extract"):
        return harness_match(pred, gold)
    if kind == "math500":
        return math_equal(pred, gold, timeout=timeout)
    return numbers_match(pred, gold)


def score(response: str, gold: str, *, kind: str, rule: str = "paper", timeout: int = VERIFY_TIMEOUT_S) -> Score:
    """Extract the answer from a model response with `rule` and check it against the reference."""
    extracted = extract_answer(response, kind=kind, rule=rule)
    return Score(extracted=extracted, correct=is_correct(extracted, gold, kind=kind, rule=rule, timeout=timeout),
                 boxed=extract_boxed(response) is not None)
