"""The sweep's stages, one module each, found here at import.

Adding a stage is adding ONE file to this folder: a `tvtool.sweep.stage.Stage` subclass decorated with
`@register` (its name, place, recipe section, inputs, run, commands, report). Nothing else names it: the
recipe schema, `sweep --overwrite`, the run order and REPORT.md all read the registry.
"""

from __future__ import annotations

import importlib
import pkgutil

from tvtool.sweep.stage import Stage, registered

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

STAGES: tuple[Stage, ...] = registered()  # every stage, in pipeline order

__all__ = ["STAGES"]
