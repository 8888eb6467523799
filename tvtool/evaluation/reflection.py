"""Reflection statistics: how often a response second-guesses itself ("wait", "let me check", ...).

Long-to-Short work reports the mean count of such phrases per response next to the length; a
shorter chain that keeps its accuracy usually drops reflection rounds first (CoT-Valve Fig. 4:
the long QwQ chain has "Wait a minute, let me double-check that ... Alternatively, ...", the
short ones none).

Counting rule: case-insensitive, whole words, non-overlapping, leftmost-longest, so
"But wait" counts once (as "but wait", not also as "wait"). The list is `REFLECTION_PHRASES`.
"""

from __future__ import annotations

import re
from typing import Iterable

REFLECTION_PHRASES = (
    "but wait", "wait", "hmm", "alternatively", "double-check", "double check", "re-check", "recheck",
    "re-examine", "reexamine", "re-evaluate", "reconsider", "let me check", "let me verify", "let me confirm",
    "let me think again", "let me re-read", "let me reread", "let's check", "let's verify", "let's double-check",
    "on second thought", "another way", "verify this", "to verify", "i made a mistake", "that's not right",
)
_RE = re.compile(r"(?<![\w-])(?:" + "|".join(re.escape(p) for p in sorted(REFLECTION_PHRASES, key=len, reverse=True))
                 + r")(?![\w-])", re.IGNORECASE)


def count_reflections(text: str) -> int:
    """Number of reflection phrases in `text` (see the module docstring for the rule)."""
    return len(_RE.findall(text.replace("’", "'")))


def mean_reflections(texts: Iterable[str]) -> float | None:
    """Mean count per response; None for no responses."""
    counts = [count_reflections(t) for t in texts]
    return sum(counts) / len(counts) if counts else None
