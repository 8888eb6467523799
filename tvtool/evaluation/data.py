"""Evaluation datasets: GSM8K, MATH-500 and ASDiv as one list of `Problem` records.

`load_problems(dataset=...)` takes a bundled name (`gsm8k`, `math500`, `toy`), a local
file (`.jsonl` in GSM8K or MATH-500 format, `.xml` in ASDiv format) or a Hub id
(`openai/gsm8k`, `HuggingFaceH4/MATH-500`, `EleutherAI/asdiv`; needs a network).

GSM8K (test/train) and MATH-500 are bundled (MIT, see assets/DATA_LICENSES.md).
ASDiv is CC BY-NC and is not bundled: pass the path of ASDiv.xml or its Hub id.
AIME 2024 (the paper's other benchmark: QwQ 14/30 at 6827 tokens) is not bundled either: no copy
with a clear licence is available offline (the problems are MAA's; the Hub copies state none or
MIT without the MAA's grant). Pass a file: `.jsonl` (or a `.json` list) of
{problem|question|Problem, answer|Answer} records with integer answers 0–999 (kind `aime`,
detected from capitalised keys, integer answers or "aime" in the file name), or a Hub id
(`HuggingFaceH4/aime_2024`, `Maxwell-Jia/AIME_2024`; needs a network).
ASDiv problems whose answer is not one number (several answers, ratios, clock times,
text) are excluded and counted by reason; fractions such as `5/2` and `-(1/3)` are kept
(gold `5/2`, `-1/3`) because `tvtool.evaluation.scoring` compares them as exact rationals.
"""

from __future__ import annotations

import json
import random
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tvtool.errors import DatasetError, OptionsError
from tvtool.options import CliOptions, opt

KINDS = ("gsm8k", "math500", "asdiv", "aime")
ASSETS = Path(__file__).parents[1] / "assets"
BUNDLED: dict[str, dict[str, Path]] = {
    "gsm8k": {"test": ASSETS / "gsm8k" / "test.jsonl", "train": ASSETS / "gsm8k" / "train.jsonl"},
    "math500": {"test": ASSETS / "math500" / "test.jsonl"},
    "toy": {"test": ASSETS / "toy" / "test.jsonl", "train": ASSETS / "toy" / "train.jsonl"},
}
BUNDLED_KIND = {"gsm8k": "gsm8k", "math500": "math500", "toy": "gsm8k"}
# Hub id -> (kind, config name, {our split: hub split})
HUB: dict[str, tuple[str, str | None, dict[str, str]]] = {
    "openai/gsm8k": ("gsm8k", "main", {"test": "test", "train": "train"}),
    "HuggingFaceH4/MATH-500": ("math500", None, {"test": "test"}),
    "EleutherAI/asdiv": ("asdiv", None, {"test": "validation", "validation": "validation"}),
    "HuggingFaceH4/aime_2024": ("aime", None, {"test": "train", "train": "train"}),
    "Maxwell-Jia/AIME_2024": ("aime", None, {"test": "train", "train": "train"}),
}
LABEL = {"gsm8k": "GSM8K", "math500": "MATH-500", "asdiv": "ASDiv", "aime": "AIME"}
_LOCAL_FIX = ("Pass a local file instead: a GSM8K-format .jsonl, a MATH-500 .jsonl, "
              "or ASDiv.xml (e.g. dataset='/data/ASDiv.xml')")


@dataclass(frozen=True)
class Problem:
    """One evaluation problem: the prompt text, the reference answer and provenance."""

    id: str
    question: str  # text given to the model (ASDiv: Body + " " + Question)
    gold: str  # reference answer (GSM8K: commas removed; ASDiv: the number without unit)
    solution: str | None = None  # reference worked solution (GSM8K: no <<calc>> and no "#### N")
    meta: dict[str, Any] = field(default_factory=dict)  # MATH-500 subject/level, GSM8K steps, ASDiv grade, …


@dataclass(frozen=True)
class ProblemSet:
    """The problems used for one evaluation, where they came from and what was left out."""

    name: str  # bundled name, file name or Hub id
    kind: str  # gsm8k | math500 | asdiv (answer format; decides scoring)
    source: str  # file path or Hub id
    split: str
    problems: tuple[Problem, ...]
    excluded: dict[str, int]  # reason -> count of problems not used (ASDiv)
    description: str  # one line: which subset is used

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)


@dataclass(frozen=True)
class DatasetOptions(CliOptions):
    """Which problems to evaluate on; `load_problems(**dataclasses.asdict(opts))`."""

    dataset: str = opt("gsm8k", "gsm8k | math500 | toy, a .jsonl/.xml path, or a Hub id (openai/gsm8k, "
                                "HuggingFaceH4/MATH-500, EleutherAI/asdiv)")
    split: str = opt("test", "Split: test or train (GSM8K, toy)")
    limit: int | None = opt(None, "Use only this many problems (the first N, or N random ones with --seed)")
    seed: int | None = opt(None, "Shuffle with this seed before taking --limit problems")
    kind: str | None = opt(None, "Answer format of a file or Hub dataset: gsm8k | math500 | asdiv "
                                 "(default: detected)")


# --- record converters -------------------------------------------------------------


def _gsm8k(rec: dict, *, pid: str, where: str) -> Problem:
    for key in ("question", "answer"):
        if not isinstance(rec.get(key), str):
            raise DatasetError(f"GSM8K record has no {key!r} text", where=where,
                               fix='Each line must be {"question": ..., "answer": "...\\n#### N"}')
    if "####" not in rec["answer"]:
        raise DatasetError("GSM8K answer has no '#### N' final line", where=where,
                           fix="End each answer with '#### <number>', or pass kind='math500' for "
                               "{problem, answer} records")
    work, final = rec["answer"].rsplit("####", 1)
    gold = final.strip().replace(",", "")
    if not gold:
        raise DatasetError("GSM8K answer is empty after '####'", where=where,
                           fix="Put the final number after '####'")
    solution = re.sub(r"<<[^>]*>>", "", work).strip()
    steps = sum(bool(line.strip()) for line in work.splitlines())  # the difficulty proxy (tvtool.evaluation.difficulty)
    return Problem(id=pid, question=rec["question"], gold=gold, solution=solution or None,
                   meta={**_extra(rec, ("question", "answer")), "steps": steps})


def _math500(rec: dict, *, pid: str, where: str) -> Problem:
    for key in ("problem", "answer"):
        if not isinstance(rec.get(key), str):
            raise DatasetError(f"MATH-500 record has no {key!r} text", where=where,
                               fix='Each line must be {"problem": ..., "answer": ...}')
    meta = {**_extra(rec, ("problem", "answer", "solution")),
            **{k: rec[k] for k in ("subject", "level", "unique_id") if k in rec}}
    return Problem(id=rec.get("unique_id") or pid, question=rec["problem"], gold=rec["answer"],
                   solution=rec.get("solution"), meta=meta)


def _extra(rec: dict, used: tuple[str, ...]) -> dict:
    """A record's other short fields (numbers, booleans, text up to 64 characters), kept in `Problem.meta`
    so that any of them can name the difficulty (`--difficulty-field`)."""
    return {k: v for k, v in rec.items() if k not in used and (isinstance(v, (int, float, bool))
                                                               or isinstance(v, str) and len(v) <= 64)}


def _aime(rec: dict, *, pid: str, where: str) -> Problem:
    """{problem|question|Problem, answer|Answer, id|ID?} with an integer answer 0–999."""
    get = lambda *keys: next((rec[k] for k in keys if rec.get(k) is not None), None)  # noqa: E731
    question, answer = get("problem", "question", "Problem", "Question"), get("answer", "Answer")
    if not isinstance(question, str):
        raise DatasetError("AIME record has no problem text", where=where,
                           fix='Each record needs "problem" (or "question", "Problem") and "answer" (or "Answer")')
    text = str(answer).strip() if isinstance(answer, (int, str)) and not isinstance(answer, bool) else ""
    if not re.fullmatch(r"0*\d{1,3}", text):
        raise DatasetError(f"AIME answer is not an integer 0–999: {answer!r}", where=where,
                           fix="AIME answers are integers from 0 to 999; pass kind='math500' for other answers")
    meta = {k: rec[k] for k in ("url", "year") if rec.get(k) is not None}
    rid = get("id", "ID", "idx")
    return Problem(id=str(rid) if rid is not None else pid, question=question, gold=str(int(text)),
                   solution=get("solution", "Solution"), meta=meta)


_NUM = r"-?\d+(?:\.\d+)?"


def asdiv_answer(*, answer: str, solution_type: str = "") -> tuple[str | None, str | None, str | None]:
    """(gold, unit, exclusion reason) of an ASDiv `<Answer>`: `9 (apples)` -> ("9", "apples", None).

    Reasons: "multiple answers" (`8; 40`), "a.m./p.m. time" (`3:30 p.m.`), "ratio" (`5:6`
    with Solution-Type Ratio), "clock time" (`5:45`), "text" (`Yes`, `6th`).
    """
    a = " ".join(answer.split())  # also fixes the double space in `14  (seats)`
    if ";" in a:
        return None, None, "multiple answers"
    if re.search(r"\b[ap]\.m\.", a):
        return None, None, "a.m./p.m. time"
    if re.fullmatch(r"\d+:\d+(?::\d+)?", a):
        return None, None, "ratio" if solution_type.strip() == "Ratio" else "clock time"
    m = re.fullmatch(rf"({_NUM})(?: \(([^()]*)\))?", a)
    if m:
        return m[1], m[2], None
    m = re.fullmatch(r"(-?)\(?(\d+/\d+)\)?", a)  # 5/2, -(1/3)
    if m:
        return m[1] + m[2], None, None
    return None, None, "text"


def _asdiv(rec: dict, *, pid: str, where: str) -> tuple[Problem | None, str | None]:
    if not isinstance(rec.get("answer"), str) or not isinstance(rec.get("question"), str):
        raise DatasetError("ASDiv problem has no Question or Answer", where=where,
                           fix="Each <Problem> needs <Body>, <Question> and <Answer>")
    gold, unit, reason = asdiv_answer(answer=rec["answer"], solution_type=rec.get("solution_type") or "")
    if reason:
        return None, reason
    question = " ".join(p.strip() for p in (rec.get("body") or "", rec["question"]) if p and p.strip())
    meta = {"grade": rec.get("grade"), "solution_type": rec.get("solution_type"), "unit": unit,
            "answer": rec["answer"], "formula": rec.get("formula")}
    meta.update({k: rec[k] for k in ("source", "class") if rec.get(k)})
    return Problem(id=rec.get("id") or pid, question=question, gold=gold, solution=rec.get("formula"),
                   meta=meta), None


# --- readers --------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) for each non-blank line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read file: {type(e).__name__}", where=str(path),
                           fix="Pass a readable UTF-8 .jsonl file") from e
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"not valid JSON: {e.msg}", where=f"{path}, line {n}",
                               fix="Each line must be one JSON object") from e
        if not isinstance(rec, dict):
            raise DatasetError(f"a JSON {json_kind(rec)}, not an object", where=f"{path}, line {n}",
                               fix="Each line must be one JSON object, e.g. {\"question\": ..., \"answer\": ...}")
        out.append((n, rec))
    if not out:
        raise DatasetError("file has no records", where=str(path), fix="Pass a non-empty .jsonl file")
    return out


def _read_json_list(path: Path) -> list[tuple[int, dict]]:
    """(index + 1, record) of a .json file holding one list of objects (as some AIME copies ship)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot read JSON: {type(e).__name__}", where=str(path),
                           fix="Pass a .json list of objects, or a .jsonl file") from e
    if not isinstance(data, list) or not data:
        raise DatasetError("not a non-empty JSON list of objects", where=str(path),
                           fix="Pass a .json list of objects, or a .jsonl file")
    for i, r in enumerate(data, start=1):
        if not isinstance(r, dict):
            raise DatasetError(f"item {i} of the list is a JSON {json_kind(r)}, not an object", where=str(path),
                               fix="Pass a .json list of objects, or a .jsonl file")
    return list(enumerate(data, start=1))


def json_kind(value: Any) -> str:
    """The JSON name of a parsed value's type ('list', 'string', 'number', 'boolean', 'null', 'object'),
    for messages that say what a line held instead of an object."""
    kinds = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return kinds.get(type(value), "null")


def _read_asdiv_xml(path: Path) -> list[dict]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DatasetError(f"not valid XML ({e})", where=str(path),
                           fix="Pass ASDiv.xml from github.com/chaochun/nlu-asdiv-dataset") from e
    except OSError as e:
        raise DatasetError(f"cannot read file: {type(e).__name__}", where=str(path),
                           fix="Pass a readable ASDiv.xml file") from e
    rows = []
    for p in root.iter("Problem"):
        text = {child.tag: (child.text or "") for child in p}
        rows.append({"id": p.get("ID"), "grade": p.get("Grade"), "source": p.get("Source"),
                     "class": p.get("Class"), "body": text.get("Body"), "question": text.get("Question"),
                     "answer": text.get("Answer"), "solution_type": text.get("Solution-Type"),
                     "formula": text.get("Formula")})
    if not rows:
        raise DatasetError("no <Problem> elements", where=str(path),
                           fix="Pass an ASDiv-format .xml file (<ProblemSet><Problem>...)")
    return rows


def _detect_jsonl_kind(path: Path, rec: dict) -> str:
    if ("Problem" in rec and "Answer" in rec) or (isinstance(rec.get("answer"), int)
                                                  and ("problem" in rec or "question" in rec)):
        return "aime"
    if "aime" in path.name.lower() and "answer" in rec and ("problem" in rec or "question" in rec):
        return "aime"
    if "problem" in rec and "answer" in rec:
        return "math500"
    if "question" in rec and "####" in str(rec.get("answer", "")):
        return "gsm8k"
    raise DatasetError("cannot tell the dataset format of the first record", where=str(path),
                       fix="Expected GSM8K lines {question, answer ending '#### N'} or MATH-500 lines "
                           "{problem, answer}; or pass kind='gsm8k' or kind='math500'")


def _convert(rows: list[tuple[str, dict]], *, kind: str, prefix: str) -> tuple[list[Problem], Counter]:
    """Problems from (where, record) rows; ids default to `prefix/index`."""
    problems, excluded = [], Counter()
    for i, (where, rec) in enumerate(rows):
        pid = f"{prefix}/{i}"
        if kind == "gsm8k":
            problems.append(_gsm8k(rec, pid=pid, where=where))
        elif kind == "math500":
            problems.append(_math500(rec, pid=pid, where=where))
        elif kind == "aime":
            problems.append(_aime(rec, pid=pid, where=where))
        else:
            problem, reason = _asdiv(rec, pid=pid, where=where)
            if problem is None:
                excluded[reason] += 1
            else:
                problems.append(problem)
    return problems, excluded


def _from_file(path: Path, *, kind: str | None, prefix: str | None = None) -> tuple[str, list[Problem], Counter]:
    suffix = path.suffix.lower()
    if kind is None and suffix not in (".jsonl", ".xml", ".json"):
        raise DatasetError(f"unsupported file type {suffix or '(none)'!r}", where=str(path),
                           fix="Use a .jsonl file (GSM8K or MATH-500 format) or an ASDiv .xml file, "
                               "or pass kind=")
    if kind == "asdiv" or (kind is None and suffix == ".xml"):
        rows = [(f"{path}, problem {r['id'] or i + 1}", r) for i, r in enumerate(_read_asdiv_xml(path))]
        kind = "asdiv"
    else:
        records = _read_json_list(path) if suffix == ".json" else _read_jsonl(path)
        kind = kind or _detect_jsonl_kind(path, records[0][1])
        rows = [(f"{path}, line {n}", rec) for n, rec in records]
    problems, excluded = _convert(rows, kind=kind, prefix=prefix or path.stem)
    return kind, problems, excluded


def _from_hub(hub_id: str, *, kind: str | None, split: str) -> tuple[str, list[Problem], Counter]:
    known_kind, config, splits = HUB.get(hub_id, (None, None, {}))
    kind = kind or known_kind
    hub_split = splits.get(split, split)
    try:
        import datasets
    except ImportError as e:
        raise DatasetError("the 'datasets' package is needed to load Hub datasets", where=hub_id,
                           fix="pip install 'tvtool[eval]'; or " + _LOCAL_FIX) from e
    try:
        ds = datasets.load_dataset(hub_id, config, split=hub_split)
        records = [dict(r) for r in ds]
    except Exception as e:  # offline, unknown id, bad split: all end the same way
        raise DatasetError(f"cannot load Hub dataset split {hub_split!r} ({type(e).__name__})",
                           where=hub_id, fix=_LOCAL_FIX) from e
    if kind == "asdiv":  # EleutherAI/asdiv uses lower-case field names
        records = [{"id": r.get("id"), "body": r.get("body"), "question": r.get("question"),
                    "answer": r.get("answer"), "solution_type": r.get("solution_type"),
                    "formula": r.get("formula"), "grade": r.get("grade")} for r in records]
    rows = [(f"{hub_id} {hub_split}, row {i}", r) for i, r in enumerate(records)]
    problems, excluded = _convert(rows, kind=kind, prefix=f"{hub_id}/{hub_split}")
    return kind, problems, excluded


# --- the public verb -------------------------------------------------------------


def _describe(*, label: str, kind: str, n_used: int, n_eligible: int, n_total: int,
              limit: int | None, seed: int | None, excluded: Counter) -> str:
    if limit is None and seed is None:
        desc = f"{label}: all {n_eligible} problems"
    elif seed is None:
        desc = f"{label}: first {n_used} of {n_eligible} problems"
    else:
        desc = f"{label}: {n_used} of {n_eligible} problems"
    if kind == "asdiv":
        reasons = ", ".join(f"{c} {r}" for r, c in excluded.most_common())
        desc += f" with a single numeric answer (of {n_total}; excluded: {reasons or 'none'})"
    return desc + (f", shuffled with seed {seed}" if seed is not None else "")


def load_problems(*, dataset: str, split: str = "test", limit: int | None = None,
                  seed: int | None = None, kind: str | None = None) -> ProblemSet:
    """Load a dataset as a `ProblemSet`, optionally a deterministic subset.

    `limit` without `seed` takes the first N problems; with `seed` the problems are
    shuffled with `random.Random(seed)` first, so the same seed gives the same subset.
    `kind` overrides format detection for files and Hub ids.
    """
    if kind is not None and kind not in KINDS:
        raise OptionsError(f"unknown dataset kind {kind!r}", where="load_problems(kind=...)",
                           fix=f"Use one of: {', '.join(KINDS)}, or leave it unset to detect")
    if limit is not None and limit < 1:
        raise OptionsError(f"limit must be a positive integer, got {limit}", where="load_problems(limit=...)",
                           fix="Pass limit=None to use all problems")
    if dataset in BUNDLED:
        if split not in BUNDLED[dataset]:
            raise DatasetError(f"no {split!r} split in the bundled {dataset} data", where=dataset,
                               fix=f"Use split={' or '.join(repr(s) for s in BUNDLED[dataset])}")
        path = BUNDLED[dataset][split]
        if not path.is_file():
            raise DatasetError(f"bundled file {path.name} is missing", where=str(path),
                               fix="Reinstall tvtool (the toy set is written by tvtool.toy), or pass a path")
        kind = kind or BUNDLED_KIND[dataset]
        _, problems, excluded = _from_file(path, kind=kind, prefix=f"{dataset}/{split}")
        name, source, label = dataset, str(path), f"{LABEL.get(dataset, dataset)} {split}"
    elif Path(dataset).expanduser().exists():
        path = name_path = Path(dataset).expanduser()
        if path.is_dir():  # e.g. a toy-style directory with test.jsonl and train.jsonl
            path = path / f"{split}.jsonl"
            if not path.is_file():
                raise DatasetError(f"directory has no {split}.jsonl", where=dataset,
                                   fix=f"Pass a file, or a directory holding {split}.jsonl")
        kind, problems, excluded = _from_file(path, kind=kind)
        name = path.name if path == name_path else f"{name_path.name}/{path.name}"
        source, label = str(path), f"{LABEL[kind]} ({name})"
    elif Path(dataset).suffix.lower() in (".jsonl", ".xml", ".json") or dataset.startswith((".", "/", "~")):
        raise DatasetError("dataset file not found", where=dataset,
                           fix="Check the path; ASDiv is not bundled, pass the path of your ASDiv.xml")
    elif dataset in HUB or (kind is not None and re.fullmatch(r"[\w.-]+/[\w.-]+", dataset)):
        kind, problems, excluded = _from_hub(dataset, kind=kind, split=split)
        name, source, label = dataset, dataset, f"{LABEL[kind]} {split} ({dataset})"
    else:
        raise DatasetError(f"unknown dataset {dataset!r}", where="load_problems(dataset=...)",
                           fix=f"Use gsm8k, math500, toy, a Hub id ({', '.join(HUB)}) or a local .jsonl/.xml "
                               "file path such as '/data/ASDiv.xml'")
    n_eligible = len(problems)
    if seed is not None:
        problems = list(problems)
        random.Random(seed).shuffle(problems)
    problems = problems[:limit] if limit is not None else problems
    description = _describe(label=label, kind=kind, n_used=len(problems), n_eligible=n_eligible,
                            n_total=n_eligible + sum(excluded.values()), limit=limit, seed=seed,
                            excluded=excluded)
    return ProblemSet(name=name, kind=kind, source=source, split=split, problems=tuple(problems),
                      excluded=dict(excluded), description=description)
