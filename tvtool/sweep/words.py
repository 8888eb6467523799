"""How a sweep names things in its commands and report: paths relative to the recipe, shell words, and
an operator run's method and settings."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from tvtool.merge.options import config_name
from tvtool.options import cli_number


def short(p, start: str | os.PathLike | None = None) -> str:
    """A local path relative to `start` (default: the working folder); Hub ids and names unchanged."""
    try:
        return os.path.relpath(p, start) if Path(p).exists() else str(p)
    except ValueError:  # another drive
        return str(p)


def rel(p) -> str:
    """A local path relative to the working folder when it lies below it; otherwise as given."""
    try:
        r = os.path.relpath(p)
        return r if Path(p).exists() and not r.startswith("..") else str(p)
    except ValueError:
        return str(p)


class Glob(str):
    """A command word left unquoted so that the shell expands it (e.g. `models/alpha-*`)."""


def sh(words: list[str]) -> str:
    """One shell command line: every word quoted, except `Glob`s."""
    return " ".join(w if isinstance(w, Glob) else shlex.quote(str(w)) for w in words)


def vector_words(recipe) -> list[str]:
    """The recipe's task vectors as `--vector MODEL:WEIGHT` flags (none without `vectors:`)."""
    return [w for v in recipe.vectors for w in ("--vector", f"{short(v.model)}:{cli_number(v.weight)}")]


def source_words(recipe, out: Path) -> list[str]:
    """Where the commands after svd-rank take Δ from: the factored delta with `low_rank:`, else the reasoner."""
    return ["--delta", f"{out}/lowrank/delta.safetensors"] if recipe.low_rank else ["--reasoner", recipe.reasoner]


def operator_rows(*, tables: dict[str, list[dict]], configs) -> dict[str, list[dict]]:
    """Each row of an operator run with its `method` and `params` (the report's table and plot series);
    rows of other runs (budget rows) unchanged."""
    by_name = {config_name(c): c for c in configs}
    return {name: [{**row, **describe(by_name[row["label"]])} if row["label"] in by_name else row
                   for row in rows] for name, rows in tables.items()}


def describe(c) -> dict:
    """`method` and `params` ("density=0.2", "p=0.5 seed=0", …: the non-default operator settings; None: none)."""
    skip = ("alpha", "include", "exclude", "method")
    d = {k: v for k, v in c.to_dict().items() if k not in skip}
    if c.method.startswith("dare"):
        d["seed"] = c.seed  # the mask seed matters to every DARE run
    params = " ".join(f"{k}={_fmt(v)}" for k, v in d.items())
    return {"method": c.method, "params": params or None}


def _fmt(v) -> str:
    return ",".join(map(_fmt, v)) if isinstance(v, tuple) else f"{v:g}" if isinstance(v, float) else str(v)


__all__ = ["Glob", "describe", "operator_rows", "rel", "sh", "short", "source_words", "vector_words"]
