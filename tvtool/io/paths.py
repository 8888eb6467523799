"""Outputs never overlap inputs: an output that is, contains or sits inside an input is refused.

Writing an output replaces it as a whole (`--overwrite`), so `delta B R -o B` would
destroy the base, and `-o B/delta.safetensors` would add a stray shard to an unindexed
base folder. Paths are compared resolved (symlinks followed, Hub ids as their cache folder).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from tvtool.errors import OptionsError, OutputError


def check_output_apart(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], *,
                       flag: str = "-o") -> None:
    """Raise OutputError when `output` is an input, contains one, or lies inside an input folder."""
    out = Path(output).resolve()
    for inp in inputs:
        if inp is None or not os.path.exists(inp):  # a Hub id not resolved here cannot be written over
            continue
        src = Path(inp).resolve()
        if out == src:
            rel = "is"
        elif src in out.parents and src.is_dir():
            rel = "is inside"
        elif out in src.parents:
            rel = "contains"
        else:
            continue
        raise OutputError(f"the output {rel} the input {inp}", where=f"{flag} {output}",
                          fix="write the output somewhere outside every input")


def check_inside(folder: Path, root: Path, *, flag: str) -> None:
    """Raise OptionsError when `folder` (made from a name template) is not strictly inside `root`."""
    f, r = Path(os.path.abspath(folder)), Path(os.path.abspath(root))
    if r not in f.parents:
        raise OptionsError(f"the folder name leaves the output folder: {folder}", where=flag,
                           fix="use a plain folder name such as alpha-{alpha} (no '..' or absolute paths)")


def check_writable(folder: str | os.PathLike, *, flag: str = "-o") -> None:
    """Create `folder` and a probe file in it, now, rather than after a long engine start."""
    f = Path(folder)
    if f.exists() and not f.is_dir():
        raise OutputError("the output path is a file, not a folder", where=f"{flag} {folder}",
                          fix="give a folder path (or remove the file)")
    try:
        f.mkdir(parents=True, exist_ok=True)
        probe = f / f".tvtool-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"cannot write to the output folder: {e.strerror or e}", where=f"{flag} {folder}",
                          fix="choose a folder you can write to (check permissions, free space, read-only mounts)"
                          ) from None


def cache_dir(given: str | os.PathLike | None = None) -> Path:
    """tvtool's cache folder (derived files that can be rebuilt: α-scaled adapters, factored valves):
    `given`, else $TVTOOL_CACHE, else $XDG_CACHE_HOME/tvtool, else ~/.cache/tvtool."""
    if given:
        return Path(given)
    if os.environ.get("TVTOOL_CACHE"):
        return Path(os.environ["TVTOOL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tvtool"
