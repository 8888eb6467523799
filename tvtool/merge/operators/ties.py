"""ties: TIES-merging (mergekit `ties`): magnitude trim, sign election by summed mass, disjoint mean."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tvtool.merge.gta import Magnitude
from tvtool.merge.registry import register


@register
@dataclass(frozen=True)
class Ties(Magnitude):
    """Trim, then keep each Δ_i only where its sign is the majority's; normalized by default."""

    name: ClassVar[str] = "ties"
    summary: ClassVar[str] = "trim, sign election, mean of the agreeing Δ_i"
    consensus: ClassVar[bool] = True
    normalize_default: ClassVar[bool] = True
