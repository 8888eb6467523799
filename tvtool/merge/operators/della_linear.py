"""della_linear: DELLA's MagPrune without sign election (mergekit `della_linear`: not normalized by default)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tvtool.merge.operators.della import Della
from tvtool.merge.registry import register


@register
@dataclass(frozen=True)
class DellaLinear(Della):
    """MagPrune (magnitude-ranked DARE with L1 rescale) of each Δ_i, then the weighted sum."""

    name: ClassVar[str] = "della_linear"
    summary: ClassVar[str] = "della without sign election: the weighted sum of the pruned, rescaled Δ_i"
    consensus: ClassVar[bool] = False
    normalize_default: ClassVar[bool] = False
