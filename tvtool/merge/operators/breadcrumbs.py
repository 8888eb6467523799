"""breadcrumbs: Model Breadcrumbs (mergekit `breadcrumbs`): drop the largest and the smallest |Δ_i| per tensor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tvtool.merge.gta import Breadcrumbs as BreadcrumbsFamily
from tvtool.merge.registry import register


@register
@dataclass(frozen=True)
class Breadcrumbs(BreadcrumbsFamily):
    """Drop the top --beta and the bottom --gamma fractions of |Δ_i|, then sum."""

    name: ClassVar[str] = "breadcrumbs"
    summary: ClassVar[str] = "drop the largest --beta and smallest --gamma of |Δ_i| per tensor"
