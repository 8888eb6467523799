"""Per-difficulty statistics: which problem field says how hard a problem is, its buckets, and the
per-level summary of a run.

CoT-Valve's starting observation (abstract, §1 and Fig. 1) is that reasoning paths compress easily on
easy problems and not on hard ones; the Long-to-Short merging evaluation reports length, accuracy and
reflections per MATH level. A level's row says whether a shorter chain was cut where it was cheap.

Fields (`AnswerOptions.difficulty_field`; a field is read from `Problem.meta`):
- `level`: MATH-500's own difficulty, 1–5;
- `steps`: a proxy for GSM8K, which has no difficulty label: the number of lines of the gold worked
  solution (one computation per line; most carry a `<<…>>` calculator annotation), bucketed
  `STEP_BUCKETS` (≤2, 3, 4, 5, ≥6: 326, 371, 297, 175 and 150 problems of the test split);
- `grade`: ASDiv's school grade, 1–6;
- any other field the dataset's records carry (kept in `Problem.meta`, `tvtool.evaluation.data`).
`auto` takes the first of `AUTO_FIELDS` that the problems carry with at least two distinct values: one
bucket says nothing about difficulty (the toy set's one-line solutions, or a `--limit` inside one level).
"""

from __future__ import annotations

import statistics
from typing import Any, Callable, Iterable, Sequence

from tvtool.errors import OptionsError
from tvtool.evaluation.answers import thinking_stats
from tvtool.evaluation.data import Problem
from tvtool.evaluation.options import AUTO, NONE
from tvtool.evaluation.reflection import mean_reflections, reflective_share

AUTO_FIELDS = ("level", "steps", "grade")
STEP_BUCKETS = ("≤2", "3", "4", "5", "≥6")


def steps_bucket(steps: Any) -> str:
    """The GSM8K proxy's bucket of a step count (`STEP_BUCKETS`)."""
    n = int(steps)
    return "≤2" if n <= 2 else "≥6" if n >= 6 else str(n)


BUCKETS: dict[str, Callable[[Any], str]] = {"steps": steps_bucket}  # field → its bucket labels (else the value)
ORDER: dict[str, Sequence[str]] = {"steps": STEP_BUCKETS}  # field → its buckets in order (else numeric/text order)


def resolve_field(option: str, *, problems: Iterable[Problem]) -> str | None:
    """The difficulty field to report by (None: none). An explicit field no problem carries is refused."""
    problems = list(problems)
    if option == NONE:
        return None
    if option == AUTO:
        for f in AUTO_FIELDS:
            if len({str(p.meta[f]) for p in problems if p.meta.get(f) is not None}) >= 2:
                return f
        return None
    if not any(p.meta.get(option) is not None for p in problems):
        carried = sorted({k for p in problems for k, v in p.meta.items() if isinstance(v, (int, float, str))})
        raise OptionsError(f"no problem carries the difficulty field {option!r}", where="--difficulty-field",
                           fix=f"use one of: {', '.join(carried) or '(none)'}; or auto, or none")
    return option


def problem_levels(problems: Iterable[Problem], *, field: str) -> dict[str, str]:
    """id → level label (the bucket of `field`'s value); problems without the field are left out."""
    bucket = BUCKETS.get(field, str)
    return {p.id: bucket(p.meta[field]) for p in problems if p.meta.get(field) is not None}


def level_order(labels: Iterable[str], *, field: str) -> list[str]:
    """Levels easiest first: the field's bucket order, else numeric order when every label is a number."""
    labels = set(labels)
    if field in ORDER:
        return [b for b in ORDER[field] if b in labels] + sorted(labels - set(ORDER[field]))
    try:
        return sorted(labels, key=float)
    except ValueError:
        return sorted(labels)


def by_level(records: Sequence[dict], *, levels: dict[str, str], field: str) -> dict[str, dict]:
    """Per level (easiest first): #samples, #problems, accuracy %, mean #tokens, mean thinking/answer
    tokens, reflections per response, reflective % and unfinished % (`level_stats`)."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        if r["id"] in levels:
            groups.setdefault(levels[r["id"]], []).append(r)
    return {lev: level_stats(groups[lev]) for lev in level_order(groups, field=field)}


def level_stats(records: Sequence[dict]) -> dict:
    """The per-level row of `by_level` over `records` (None where undefined)."""
    scored = [r for r in records if r.get("correct") is not None]
    texts = [r["response"] for r in records if isinstance(r.get("response"), str)]
    return {"n_samples": len(records), "n_problems": len({r["id"] for r in records}),
            "accuracy": 100.0 * sum(bool(r["correct"]) for r in scored) / len(scored) if scored else None,
            "mean_tokens": statistics.fmean(r["num_tokens"] for r in records) if records else None,
            **thinking_stats(records),
            "reflections_mean": mean_reflections(texts), "reflective_share": reflective_share(texts)}


def relative_lengths(rows: Sequence[dict]) -> tuple[dict | None, dict[str, dict[str, float | None]]]:
    """(reference row, {run label: {level: mean #tokens / the reference's}}) over rows that carry
    `by_level` and an α: the reference is α = 1 (θ2, the long chain) if present, else the largest α."""
    rows = [r for r in rows if r.get("by_level") and r.get("alpha") is not None]
    if not rows:
        return None, {}
    ref = next((r for r in rows if r["alpha"] == 1.0), max(rows, key=lambda r: r["alpha"]))
    base = {lev: s.get("mean_tokens") for lev, s in ref["by_level"].items()}
    return ref, {r["label"]: {lev: (s["mean_tokens"] / base[lev] if base.get(lev) and s.get("mean_tokens")
                                    is not None else None) for lev, s in r["by_level"].items()} for r in rows}
