"""One writer per output: an exclusive advisory lock held for the whole run.

Two runs writing the same output at once would interleave their partial files (the
second run's `atomic_dir` removes the first's `.partial` folder as stale), so every stage
that writes an output holds `output_lock(output)` while it works, and `atomic_dir` holds
the lock of the folder it writes (re-entrant: a verb already holding it goes on).
The lock is `fcntl.flock` on a small file next to the output's resolved path (`.<name>.tvtool-lock`,
outside it, since atomic outputs are replaced as a whole; resolved, so a symlinked `-o` locks the folder it
leads to) that records the holder's pid; a second writer fails at once with one line naming that pid.
The kernel drops the lock when the holder dies, so a killed run never
leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path
from typing import Iterator

from tvtool.errors import OutputError

# Locks this process holds: lock file → (pid, depth). Re-entrant within one process, so a verb that
# holds its output's lock can write that output through `atomic.atomic_dir`, which takes it too.
_held: dict[Path, tuple[int, int]] = {}
_guard = threading.Lock()


def lock_path(output: str | os.PathLike) -> Path:
    """The lock file of `output`: a hidden sibling of the output's resolved path (symlinks followed, at every
    level), so replacing the output keeps it and two runs writing one folder through different links share it."""
    p = Path(output).resolve()
    return p.with_name(f".{p.name}.tvtool-lock")


@contextlib.contextmanager
def output_lock(output: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive lock of `output` (a file or folder, existing or not) for the block.

    Raises OutputError naming the holder's pid when another process holds it; within one
    process the lock is re-entrant. The lock file is removed on release.
    """
    path = lock_path(output)
    with _guard:
        pid, depth = _held.get(path, (None, 0))
        mine = pid == os.getpid()  # (a forked child does not hold its parent's lock)
        if mine:
            _held[path] = (pid, depth + 1)
    if mine:
        try:
            yield path
        finally:
            with _guard:
                _held[path] = (pid, _held[path][1] - 1)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise OutputError(f"another tvtool run (pid {holder}) is writing this output", where=str(output),
                              fix="wait for it to finish (or stop it), or choose another output") from None
        try:  # the file may have been unlinked by a holder that released it meanwhile: lock the live one
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        with _guard:
            _held[path] = (os.getpid(), 1)
        yield path
    finally:
        with _guard:
            _held.pop(path, None)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"
