"""Statistics of sampled protocols: several samples per problem (`--n`, e.g. `--protocol deepseek-r1`).

With n samples per problem (the problem's scored samples, grouped by id):
- `accuracy` (in the summary already): the mean over all samples, i.e. pass@1 averaged over samples;
- `accuracy_se`: its standard error across problems, 100 · stdev(p_i) / √P, where p_i is problem i's
  share of correct samples (sample stdev, P − 1 degrees of freedom; None for one problem);
- `maj_accuracy` (maj@n): % of problems whose majority answer is correct. Votes are the extracted
  answers (numbers compared as exact rationals for GSM8K/ASDiv/AIME, text stripped otherwise; samples
  with no answer do not vote); a tie goes to the answer that occurred first (lowest sample index); a
  problem without any answer counts as wrong;
- `pass_at_k`: {k: %} for k = 1, 2, 4, … and n, the unbiased estimator of Chen et al. (2021, Codex
  §2.1) averaged over problems: 1 − C(n−c, k) / C(n, k) for c correct of n, computed as the product
  1 − Π_{i=n−c+1}^{n} (1 − k/i) so that large n does not overflow.
Computed only when some problem has more than one sample (n = 1: these equal the plain accuracy).
"""

from __future__ import annotations

import statistics
from typing import Hashable, Sequence

from tvtool.evaluation.scoring import parse_number

SAMPLED_KEYS = ("n_per_problem", "accuracy_se", "maj_accuracy", "pass_at_k")
NUMERIC_KINDS = ("gsm8k", "asdiv", "aime")


def pass_at_k(*, n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one problem with `c` correct of `n` samples (a probability, 0–1)."""
    if k > n:
        raise ValueError(f"k={k} > n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def ks(n: int) -> list[int]:
    """The k reported for n samples: powers of two below n, and n."""
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    return out + [n]


def vote_key(answer: str | None, *, kind: str | None) -> Hashable | None:
    """What a sample votes for: its extracted answer (a number for numeric kinds), None for no vote."""
    if answer is None or not answer.strip():
        return None
    if kind in NUMERIC_KINDS:
        value = parse_number(answer)
        if value is not None:
            return value
    return answer.strip()


def majority_correct(samples: Sequence[dict], *, kind: str | None) -> bool:
    """Whether the majority answer of one problem's samples (in sample order) is correct; ties go to
    the answer that occurred first."""
    counts: dict[Hashable, list] = {}  # vote → [count, first sample with it]; insertion order = first occurrence
    for s in samples:
        key = vote_key(s.get("extracted"), kind=kind)
        if key is not None:
            counts.setdefault(key, [0, s])[0] += 1
    if not counts:
        return False
    best = max(counts.values(), key=lambda v: v[0])  # max keeps the first of equal counts
    return bool(best[1]["correct"])


def sampled_stats(records: Sequence[dict], *, kind: str | None) -> dict:
    """The statistics above over the scored `records`; {} when no problem has several samples."""
    groups: dict[str, list[dict]] = {}
    for r in sorted((r for r in records if r.get("correct") is not None), key=lambda r: r["index"]):
        groups.setdefault(r["id"], []).append(r)
    if not groups or max(len(g) for g in groups.values()) < 2:
        return {}
    n = min(len(g) for g in groups.values())
    right = [(len(g), sum(bool(s["correct"]) for s in g)) for g in groups.values()]  # (n_i, c_i) per problem
    shares = [c / m for m, c in right]
    se = 100.0 * statistics.stdev(shares) / len(shares) ** 0.5 if len(shares) > 1 else None
    return {"n_per_problem": n, "accuracy_se": se,
            "maj_accuracy": 100.0 * sum(majority_correct(g, kind=kind) for g in groups.values()) / len(groups),
            "pass_at_k": {str(k): 100.0 * statistics.fmean(pass_at_k(n=m, c=c, k=k) for m, c in right)
                          for k in ks(n)}}
