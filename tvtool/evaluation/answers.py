"""What the answers in samples.jsonl say: summary statistics, and re-scoring under another rule.

Every figure here is computed from the per-sample records (response, finish_reason, correct), so
a summary can always be recomputed from samples.jsonl:
- `no_box_share`: % of responses without a complete `\\boxed{}` (their answer came from the
  fallback of the paper's rule, or there was none);
- `length_share`: % of responses that hit max_tokens (finish_reason "length");
- `boxed_accuracy`: accuracy (%) on the responses that have a box;
- `reflections_mean`: mean count of reflection phrases per response (`tvtool.evaluation.reflection`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from tvtool.io.atomic import write_text
from tvtool.evaluation.reflection import mean_reflections
from tvtool.evaluation.scoring import extract_boxed, score


def answer_stats(records: Sequence[dict]) -> dict:
    """The statistics above over `records` (those with a response); None where undefined."""
    recs = [r for r in records if isinstance(r.get("response"), str)]
    if not recs:
        return {"no_box_share": None, "length_share": None, "boxed_accuracy": None, "reflections_mean": None}
    boxed = [r for r in recs if extract_boxed(r["response"]) is not None]
    scored = [r for r in boxed if r.get("correct") is not None]
    return {"no_box_share": 100.0 * (len(recs) - len(boxed)) / len(recs),
            "length_share": 100.0 * sum(r.get("finish_reason") == "length" for r in recs) / len(recs),
            "boxed_accuracy": 100.0 * sum(bool(r["correct"]) for r in scored) / len(scored) if scored else None,
            "reflections_mean": mean_reflections(r["response"] for r in recs)}


def rescore_file(path: str | os.PathLike, *, kind: str, rule: str) -> int:
    """Re-score the scored records of samples.jsonl not scored with `rule` (no regeneration needed
    when only the answer rule changed); the file is replaced atomically. Returns how many changed."""
    path = Path(path)
    if not path.is_file():
        return 0
    records = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    stale = [r for r in records if r.get("correct") is not None and r.get("answer_rule") != rule]
    for r in stale:
        sc = score(r["response"], r["gold"], kind=kind, rule=rule)
        r.update(extracted=sc.extracted, correct=sc.correct, answer_rule=rule)
    if stale:
        write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return len(stale)
