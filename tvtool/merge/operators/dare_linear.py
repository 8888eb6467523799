"""dare_linear: DARE (drop each element with probability p, rescale by 1/(1 − p)), then sum."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tvtool.merge.gta import Random
from tvtool.merge.registry import register


@register
@dataclass(frozen=True)
class DareLinear(Random):
    """DARE without sign election (mergekit `dare_linear`)."""

    name: ClassVar[str] = "dare_linear"
    summary: ClassVar[str] = "drop each Δ element with probability --drop-p, rescale by 1/(1 − p)"
