"""The merge operators, one module each, found by discovery.

Adding an operator is adding ONE file to this folder: a frozen dataclass subclassing
`tvtool.merge.registry.Operator` (or a `tvtool.merge.gta` family class), its settings as `Setting`
fields with help text, its per-chunk math, decorated with `@register` (della.py and slerp.py are
examples). Importing this package imports every module in it (pkgutil), which registers them;
`tvtool.merge.registry.operators()` does that on the first lookup. The CLI flags, `--help`, recipes
and records read the registry, so nothing else changes.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
