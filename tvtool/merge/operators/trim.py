"""trim: keep the top `density` of |Δ_i| per tensor (exact streamed top-k, ties in index order), then sum."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tvtool.merge.gta import Magnitude
from tvtool.merge.registry import register


@register
@dataclass(frozen=True)
class Trim(Magnitude):
    """Magnitude trim without sign election (Long-to-Short's top-k Δ)."""

    name: ClassVar[str] = "trim"
    summary: ClassVar[str] = "keep the top --density of |Δ_i| per tensor"
