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

from tvtool.io.layout import PARTIAL
from tvtool.io.lock import output_lock

RESUME_KEY = ".resume-key"  # in a resumable partial folder: the settings it was started with


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

    Holds `final`'s output lock throughout (`tvtool.io.lock`), so a `.partial` found at the start is a
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
        commit_dir(tmp, final)


def commit_dir(tmp: Path, final: str | os.PathLike) -> Path:
    """Put a finished `<final>.partial/` folder in place of `final` (a resume key in it is dropped)."""
    final = Path(final)
    (Path(tmp) / RESUME_KEY).unlink(missing_ok=True)
    discard(final)
    os.replace(tmp, final)
    return final


def resumable_dir(final: str | os.PathLike, *, key: str) -> Path:
    """`<final>.partial/` for long work that checkpoints into it and resumes: kept when an earlier run
    started it with the same `key` (its settings), else made afresh. `commit_dir` puts it in place.

    Unlike `atomic_dir`, an interrupt leaves it (that is the point); a partial folder never looks
    complete, as its name says. The caller holds `final`'s output lock (`tvtool.io.lock.output_lock`)
    for the whole work, so a partial folder found here is a killed run's, never a live writer's."""
    tmp = partial_path(final)
    f = tmp / RESUME_KEY
    if f.is_file() and f.read_text(encoding="utf-8") == key:
        return tmp
    discard(tmp)
    tmp.mkdir(parents=True)
    write_text(f, key)
    return tmp


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
