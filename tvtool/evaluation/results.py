"""Evaluation records and their summaries: samples.jsonl, accuracy, #tokens, ACU, table rows.

Pure functions over the files a run writes (no engine): `tvtool.evaluation.evaluate` writes them,
`tvtool.evaluation.report`, `tvtool.valve.mixchain` and `tvtool.sweep.run` read them back.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Sequence

from tvtool.evaluation.answers import THINK_KEYS, answer_stats
from tvtool.evaluation.difficulty import by_level, problem_levels, resolve_field
from tvtool.evaluation.options import AUTO
from tvtool.evaluation.sampled import SAMPLED_KEYS, sampled_stats
from tvtool.io.checkpoint import Checkpoint
from tvtool.evaluation.data import ProblemSet
from tvtool.errors import OutputError
from tvtool.io.layout import SAMPLES

ACU_FORMULA = "ACU = accuracy[%] / (params[B] × mean #tokens) × 10²"
STAT_KEYS = ("no_box_share", "length_share", "boxed_accuracy", "reflections_mean",  # tvtool.evaluation.answers
             *THINK_KEYS, *SAMPLED_KEYS)  # tvtool.evaluation.sampled (n > 1 only)


def read_samples(path: Path, *, repair: bool = False) -> list[dict]:
    """Complete lines of samples.jsonl; with `repair`, a torn last line (killed writer) is cut off."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if repair and end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    out = []
    for line in data[:end].splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise OutputError("samples.jsonl has a damaged line", where=str(path),
                                  fix="delete the file (or pass --overwrite) to start this run again") from None
    return out


def summarize(*, records: Sequence[dict], params_b: float | None, params_source: str = "counted",
              kind: str | None = None, levels: dict[str, str] | None = None, difficulty: str | None = None) -> dict:
    """Accuracy (%), mean/median #tokens, #truncated, ACU, the answer and thinking statistics of
    `tvtool.evaluation.answers.answer_stats` over `records` (+ per subject); with several samples per
    problem those of `tvtool.evaluation.sampled` (`kind`: how answers vote); with `levels` (id → level of
    the `difficulty` field, `tvtool.evaluation.difficulty`) `by_level`."""
    n = len(records)
    scored = [r for r in records if r.get("correct") is not None]
    toks = [r["num_tokens"] for r in records]
    acc = 100.0 * sum(bool(r["correct"]) for r in scored) / len(scored) if scored else None
    mean = statistics.fmean(toks) if toks else None
    acu = (acc / (params_b * mean) * 100.0) if acc is not None and params_b and mean else None
    out = {"n_samples": n, "n_problems": len({r["id"] for r in records}), "accuracy": acc,
           "mean_tokens": mean, "median_tokens": statistics.median(toks) if toks else None,
           "truncated": sum(r["finish_reason"] == "length" for r in records),
           "params_b": params_b, "params_source": params_source, "acu": acu, "acu_formula": ACU_FORMULA,
           **answer_stats(records), **sampled_stats(records, kind=kind)}
    subjects = sorted({r["subject"] for r in records if r.get("subject")})
    if subjects:
        out["by_subject"] = {s: summarize_small([r for r in records if r.get("subject") == s]) for s in subjects}
    if levels:
        out["difficulty_field"] = difficulty
        out["by_level"] = by_level(records, levels=levels, field=difficulty)
    return out


def summarize_small(records: Sequence[dict]) -> dict:
    scored = [r for r in records if r.get("correct") is not None]
    return {"n_samples": len(records),
            "accuracy": 100.0 * sum(bool(r["correct"]) for r in scored) / len(scored) if scored else None,
            "mean_tokens": statistics.fmean(r["num_tokens"] for r in records)}


def count_params_b(path: str | os.PathLike) -> float:
    """Parameters of a checkpoint in billions (each stored tensor once)."""
    ck = Checkpoint.open(path)
    return sum(math.prod(ck.info(n).shape) for n in ck.names()) / 1e9


def summary_of(*, folder: Path, problems: ProblemSet, n: int, params_b: float | None,
               params_source: str = "counted", difficulty: str = AUTO) -> dict:
    """The summary of this problem set's samples in `folder`, in problem order (one record per key);
    `difficulty`: the `AnswerOptions.difficulty_field` of the per-level rows."""
    by_key = {(r["id"], r["index"]): r for r in read_samples(Path(folder) / SAMPLES)}
    records = [by_key[(p.id, i)] for p in problems for i in range(n) if (p.id, i) in by_key]
    field = resolve_field(difficulty, problems=problems)
    return summarize(records=records, params_b=params_b, params_source=params_source, kind=problems.kind,
                     levels=problem_levels(problems, field=field) if field else None, difficulty=field)
