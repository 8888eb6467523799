"""Reading the answers in samples.jsonl: one record read (thinking split, answer rule), summary
statistics, and re-reading under another rule or delimiter without generating again.

Every figure here is computed from the per-sample records (response, finish_reason, correct and the
thinking fields), so a summary can always be recomputed from samples.jsonl:
- `no_box_share`: % of responses whose answer part has no complete `\\boxed{}` (their answer came
  from the fallback of the paper's rule, or there was none);
- `length_share`: % of responses that hit max_tokens (finish_reason "length");
- `boxed_accuracy`: accuracy (%) on the responses whose answer part has a box;
- `reflections_mean`: mean count of reflection phrases per response (`tvtool.evaluation.reflection`);
- `thinking_tokens_mean`, `answer_tokens_mean`: mean tokens before/after the thinking delimiter
  (`tvtool.evaluation.thinking`), `unfinished_share`: % of responses whose thinking never closed;
  None (n/a) when no delimiter was in effect; `think_end`: the delimiter (None: none).
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Sequence

from tvtool.evaluation.reflection import mean_reflections
from tvtool.evaluation.scoring import extract_boxed, score
from tvtool.evaluation.thinking import ThinkReader
from tvtool.io.atomic import write_text

THINK_KEYS = ("thinking_tokens_mean", "answer_tokens_mean", "unfinished_share")


def read_sample(rec: dict, *, kind: str, rule: str | None, reader: ThinkReader) -> dict:
    """`rec` (a samples.jsonl record) with its thinking fields (`think_end`, `thinking_tokens`,
    `answer_tokens`, `thinking_finished`) read by `reader` and, with `rule`, its answer (`extracted`,
    `correct`, `answer_rule`) read from the answer part."""
    read = reader.read(rec["response"], rec.get("token_ids"))
    rec.update(think_end=reader.think_end, thinking_tokens=read.thinking_tokens, answer_tokens=read.answer_tokens,
               thinking_finished=read.finished)
    if rule:
        sc = score(read.answer, rec["gold"], kind=kind, rule=rule)
        rec.update(extracted=sc.extracted, correct=sc.correct, answer_rule=rule)
    return rec


def answer_part(rec: dict) -> str:
    """The text the answer rule read: after the record's last delimiter, or all of it."""
    text, tag = rec["response"], rec.get("think_end")
    return text[text.rfind(tag) + len(tag):] if tag and tag in text else text


def answer_stats(records: Sequence[dict]) -> dict:
    """The statistics above over `records` (those with a response); None where undefined."""
    recs = [r for r in records if isinstance(r.get("response"), str)]
    if not recs:
        return {"no_box_share": None, "length_share": None, "boxed_accuracy": None, "reflections_mean": None,
                **thinking_stats(recs)}
    tag = next((r["think_end"] for r in recs if r.get("think_end")), None)
    boxed = [r for r in recs if extract_boxed(answer_part(r)) is not None]
    scored = [r for r in boxed if r.get("correct") is not None]
    return {"no_box_share": 100.0 * (len(recs) - len(boxed)) / len(recs),
            "length_share": 100.0 * sum(r.get("finish_reason") == "length" for r in recs) / len(recs),
            "boxed_accuracy": 100.0 * sum(bool(r["correct"]) for r in scored) / len(scored) if scored else None,
            "reflections_mean": mean_reflections(r["response"] for r in recs), **thinking_stats(recs),
            "think_end": tag}


def thinking_stats(records: Sequence[dict]) -> dict:
    """Mean thinking and answer tokens and the unfinished share (%) over the records read with a
    delimiter; None (n/a) when there are none."""
    split = [r for r in records if r.get("thinking_finished") is not None]
    counted = [r for r in split if r.get("thinking_tokens") is not None]
    return {"thinking_tokens_mean": statistics.fmean(r["thinking_tokens"] for r in counted) if counted else None,
            "answer_tokens_mean": statistics.fmean(r["answer_tokens"] for r in counted) if counted else None,
            "unfinished_share": 100.0 * sum(not r["thinking_finished"] for r in split) / len(split) if split
            else None}


def reread_file(path: str | os.PathLike, *, kind: str, rule: str | None, reader: ThinkReader) -> int:
    """Read again the records of samples.jsonl read with another delimiter or (scored ones) another
    answer rule: no regeneration when only how answers are read changed. The file is replaced
    atomically; returns how many records changed."""
    path = Path(path)
    if not path.is_file():
        return 0
    records = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    rescored = lambda r: rule and r.get("correct") is not None and r.get("answer_rule") != rule  # noqa: E731
    stale = [r for r in records if isinstance(r.get("response"), str)
             and (r.get("think_end") != reader.think_end or rescored(r))]
    for r in stale:
        read_sample(r, kind=kind, rule=rule if r.get("correct") is not None else None, reader=reader)
    if stale:
        write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return len(stale)
