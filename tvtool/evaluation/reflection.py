"""Reflection statistics: how often a response second-guesses itself ("wait", "let me check", ...).

Long-to-Short work reports the mean count of such phrases per response next to the length; a
shorter chain that keeps its accuracy usually drops reflection rounds first (CoT-Valve Fig. 4:
the long QwQ chain has "Wait a minute, let me double-check that ... Alternatively, ...", the
short ones none).

Counting rule: case-insensitive, whole words, non-overlapping, leftmost-longest, so
"But wait" counts once (as "but wait", not also as "wait"). The list is `REFLECTION_PHRASES`: every
phrase the Long-to-Short merging evaluation counts (`LONG_TO_SHORT_PHRASES`: wait, re-examine,
double-check, let me check, recap, let me just verify, let me just check; Wu et al. 2025), plus
tvtool's own (hmm, alternatively, let me verify, on second thought, …), so it is a superset and a count
over `LONG_TO_SHORT_PHRASES` alone is `count_reflections(text, phrases=LONG_TO_SHORT_PHRASES)`.
A response is *reflective* when it holds at least one phrase (the share is reported per difficulty level).
"""

from __future__ import annotations

import functools
import re
from typing import Iterable

LONG_TO_SHORT_PHRASES = ("wait", "re-examine", "double-check", "let me check", "recap", "let me just verify",
                         "let me just check")
REFLECTION_PHRASES = (
    *LONG_TO_SHORT_PHRASES,  # tvtool's own below
    "but wait", "hmm", "alternatively", "double check", "re-check", "recheck", "reexamine", "re-evaluate",
    "reconsider", "let me verify", "let me confirm",
    "let me think again", "let me re-read", "let me reread", "let's check", "let's verify", "let's double-check",
    "on second thought", "another way", "verify this", "to verify", "i made a mistake", "that's not right",
)


@functools.lru_cache(maxsize=8)
def _pattern(phrases: tuple[str, ...]) -> re.Pattern:
    alternatives = "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))  # leftmost-longest
    return re.compile(r"(?<![\w-])(?:" + alternatives + r")(?![\w-])", re.IGNORECASE)


def count_reflections(text: str, *, phrases: tuple[str, ...] = REFLECTION_PHRASES) -> int:
    """Number of reflection phrases in `text` (see the module docstring for the rule)."""
    return len(_pattern(phrases).findall(text.replace("’", "'")))


def mean_reflections(texts: Iterable[str]) -> float | None:
    """Mean count per response; None for no responses."""
    counts = [count_reflections(t) for t in texts]
    return sum(counts) / len(counts) if counts else None


def reflective_share(texts: Iterable[str]) -> float | None:
    """% of responses holding at least one reflection phrase; None for no responses."""
    counts = [count_reflections(t) > 0 for t in texts]
    return 100.0 * sum(counts) / len(counts) if counts else None
