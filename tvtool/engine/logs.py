"""What a user sees during evaluation: tvtool's own lines; vLLM's logs go to a file.

By default (`verbose=False`) everything vLLM writes goes to `<output>/vllm.log`:
- this process: the handlers of the `vllm` logger (which vLLM sets up at import, see
  `vllm.logger`: VLLM_CONFIGURE_LOGGING, VLLM_LOGGING_LEVEL, VLLM_LOGGING_CONFIG_PATH) are
  replaced by one file handler while the evaluation runs, and put back afterwards;
- the engine processes (EngineCore, workers): they are started while file descriptors 1 and 2
  (and sys.stdout/sys.stderr, which vLLM's handlers bind to when it re-configures logging at
  start) point at the log file (`engine_start`), so whatever they print, logging or not, lands there.
  Our own descriptors are restored right after the start, so progress bars stay on the terminal.
With `verbose=True` nothing is redirected.

`RunProgress` is the one progress bar per run: run name (α, dataset), samples done,
tokens/s and running accuracy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

from tvtool.errors import os_error

LOG_NAME = "vllm.log"
_target: list[Path] = []  # the log file of the innermost active `vllm_logs`, if any


def _vllm_logger() -> logging.Logger:
    with contextlib.suppress(ImportError):
        import vllm.logger  # noqa: F401  (vLLM configures its logger on import; do that first)
    return logging.getLogger("vllm")


class _LogFile(logging.FileHandler):
    """vllm.log: a line that cannot be written (the disk is full) is dropped, silently. logging's default
    prints a "--- Logging error ---" traceback per record on the terminal (300 lines for an engine shutdown),
    before tvtool's own one-line error says what happened to the disk."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass

    def flush(self) -> None:
        with contextlib.suppress(OSError):  # the disk is full: what is buffered is dropped, as a record is
            super().flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):  # closing flushes the stream's buffer once more (ENOSPC again)
            super().close()


def _route(logger: logging.Logger, path: Path) -> None:
    if any(getattr(h, "_tvtool", None) == str(path) for h in logger.handlers):
        return
    fmt = next((h.formatter for h in logger.handlers if h.formatter), None)
    for h in list(logger.handlers):
        logger.removeHandler(h)
    fh = _LogFile(path, mode="a", encoding="utf-8")
    fh._tvtool = str(path)
    fh.setFormatter(fmt or logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s"))
    logger.addHandler(fh)
    logger.propagate = False


@contextlib.contextmanager
def vllm_logs(*, folder: str | os.PathLike, verbose: bool = False) -> Iterator[Path | None]:
    """Send vLLM's logs to `folder/vllm.log` for the duration (nothing changes when `verbose`)."""
    if verbose:
        yield None
        return
    path = Path(folder) / LOG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = _vllm_logger()
    saved = (list(logger.handlers), logger.propagate)
    _route(logger, path)
    _target.append(path)
    try:
        yield path
    finally:
        _target.pop()
        for h in list(logger.handlers):
            logger.removeHandler(h)
            if getattr(h, "_tvtool", None):
                h.close()
        for h in saved[0]:
            logger.addHandler(h)
        logger.propagate = saved[1]
        if _target:  # an outer evaluation is still running
            _route(logger, _target[-1])


@contextlib.contextmanager
def engine_start() -> Iterator[None]:
    """Around starting vLLM: engine processes inherit stdout/stderr pointing at the active log file."""
    if not _target:
        yield
        return
    path = _target[-1]
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved, streams = [os.dup(1), os.dup(2)], (sys.stdout, sys.stderr)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    text = open(path, "a", encoding="utf-8", buffering=1)  # for handlers vLLM binds to sys.stdout meanwhile
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = text
        yield
    except Exception as e:
        # vLLM fails to start when it cannot print (its processes write to the log): say it is the disk
        if (full := _unwritable(fd)) is not None:
            raise os_error(full) from e
        raise
    finally:
        sys.stdout, sys.stderr = streams
        with contextlib.suppress(OSError):  # closing flushes a partial line (ENOSPC again on a full disk)
            text.close()
        for stream in streams:
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for x in (fd, *saved):
            os.close(x)
        _route(_vllm_logger(), path)  # vLLM may have re-configured its logger while starting


def _unwritable(fd: int) -> OSError | None:
    """The error a one-byte write to the log gives (a full disk: ENOSPC), or None when it can be written."""
    try:
        os.write(fd, b"\n")
    except OSError as e:
        return e
    return None


class RunProgress:
    """One tqdm bar per run: `<run> <dataset>: done/total [tok/s, acc %]`."""

    def __init__(self, *, desc: str, total: int, done: int, records: Sequence[dict] = (), disable: bool = False):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=done, desc=desc, unit="sample", disable=disable, dynamic_ncols=True)
        self.t0, self.tokens = time.monotonic(), 0
        self.right = sum(bool(r.get("correct")) for r in records)
        self.scored = sum(r.get("correct") is not None for r in records)

    def update(self, records: Sequence[dict], *, n: int | None = None) -> None:
        """Count freshly written records (`n` samples done, default len(records)): tokens, answers right."""
        self.tokens += sum(r["num_tokens"] for r in records)
        self.right += sum(bool(r.get("correct")) for r in records)
        self.scored += sum(r.get("correct") is not None for r in records)
        post = f"{self.tokens / max(time.monotonic() - self.t0, 1e-9):.0f} tok/s"
        if self.scored:
            post += f", acc {100.0 * self.right / self.scored:.1f}%"
        self.bar.set_postfix_str(post, refresh=False)
        self.bar.update(len(records) if n is None else n)

    def __enter__(self) -> "RunProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
