"""breadcrumbs_ties: Model Breadcrumbs, then TIES' sign election (mergekit `breadcrumbs_ties`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tvtool.merge.gta import Breadcrumbs
from tvtool.merge.registry import register


@register
@dataclass(frozen=True)
class BreadcrumbsTies(Breadcrumbs):
    """Breadcrumbs with sign election."""

    name: ClassVar[str] = "breadcrumbs_ties"
    summary: ClassVar[str] = "breadcrumbs, then sign election"
    consensus: ClassVar[bool] = True
