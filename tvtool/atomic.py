"""Atomic outputs: a file or a folder is either complete under its final name, or absent.

Everything is first written under `<final>.partial`, then renamed into place with
`os.replace` (atomic on one filesystem). An error or an interrupt removes the partial
output; a stale one from a killed run is removed when the next run starts. So no
half-written output ever looks complete, and re-running finishes the job.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from .layout import PARTIAL
from .lock import output_lock


def partial_path(final: str | os.PathLike) -> Path:
    """Where `final` is written before it is complete."""
    final = Path(final)
    return final.with_name(final.name + PARTIAL)


def discard(path: Path) -> None:
    """Remove a file or a folder tree, if present."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh `<final>.partial/` folder; on success it replaces `final`, on any error it is removed.

    Holds `final`'s output lock throughout (`tvtool.lock`), so a `.partial` found at the start is a
    killed run's leftover, never another live writer's work in progress."""
    final = Path(final)
    tmp = partial_path(final)
    with output_lock(final):
        discard(tmp)
        tmp.mkdir(parents=True)
        try:
            yield tmp
        except BaseException:
            discard(tmp)
            raise
        discard(final)
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it replaces `path`, on error it is removed.

    The temporary name ends in `.partial`, so writers that pick a format from the suffix
    (matplotlib) must be given the format explicitly."""
    path = Path(path)
    tmp = partial_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    discard(tmp)
    try:
        yield tmp
    except BaseException:
        discard(tmp)
        raise
    if path.is_dir():
        discard(path)
    os.replace(tmp, path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`path.write_text(text)`, atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """`path.write_bytes(data)`, atomically."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = True) -> Path:
    """Indented JSON (non-JSON values as str), atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")
