"""dare_ties: DARE, then TIES' sign election (mergekit `dare_ties`; not normalized by default)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tvtool.merge.gta import Random
from tvtool.merge.registry import register


@register
@dataclass(frozen=True)
class DareTies(Random):
    """DARE with sign election."""

    name: ClassVar[str] = "dare_ties"
    summary: ClassVar[str] = "DARE, then sign election"
    consensus: ClassVar[bool] = True
