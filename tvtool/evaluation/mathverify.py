"""math-verify comparisons that never hang evaluation (MATH-500 scoring, `tvtool.evaluation.scoring`).

math-verify's timeouts use `signal.alarm`, which works only in the main thread, so:
- in the main thread we call math-verify directly with its signal timeouts;
- in any other thread we send the comparison to one persistent child Python process
  (its own main thread, so the signal timeouts work there) and kill it if it does not
  answer within a hard deadline. A pathological expression then costs at most
  `HARD_DEADLINE_FACTOR * timeout` seconds and scores False; it never hangs evaluation.
  (In the main thread, a signal cannot interrupt one long call inside C code; math-verify's
  own timeouts have that limit too.)
The child process needs POSIX pipes (select); it is started lazily, on first use.
"""

from __future__ import annotations

import atexit
import json
import select
import subprocess
import sys
import threading

from tvtool.errors import ScoringError

VERIFY_TIMEOUT_S = 5  # math-verify timeout per parse / per comparison, in seconds
HARD_DEADLINE_FACTOR = 4  # worker is killed after this many timeouts without an answer
WORKER_START_TIMEOUT_S = 120  # importing sympy + math-verify in the child


def _mv_verify(gold: str, pred: str, timeout: int | None) -> bool:
    """math-verify on `\\boxed{gold}` vs `\\boxed{pred}` (gold first, as verify expects)."""
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise ScoringError("math-verify is not installed", where="tvtool.evaluation.mathverify",
                           fix="pip install 'tvtool[eval]' (or math-verify>=0.7)") from e
    g = parse("\\boxed{" + gold + "}", parsing_timeout=timeout)
    p = parse("\\boxed{" + pred + "}", parsing_timeout=timeout)
    return bool(g and p and verify(g, p, timeout_seconds=timeout))


# The child runs this standalone script (it does not import tvtool, whose package
# imports torch): one JSON request [gold, pred, timeout] per line, one JSON bool back.
# It mirrors _mv_verify; the child's main thread makes math-verify's signal timeouts work.
_WORKER_SRC = r"""
import json, logging, sys
logging.disable(logging.WARNING)
from math_verify import parse, verify
print("ready", flush=True)
for line in sys.stdin:
    gold, pred, timeout = json.loads(line)
    try:
        g = parse("\\boxed{" + gold + "}", parsing_timeout=timeout)
        p = parse("\\boxed{" + pred + "}", parsing_timeout=timeout)
        ok = bool(g and p and verify(g, p, timeout_seconds=timeout))
    except Exception:
        ok = False
    print(json.dumps(ok), flush=True)
"""


class VerifyWorker:
    """A persistent child Python process that runs math-verify; killed past a deadline."""

    def __init__(self, *, argv: list[str] | None = None):
        self._argv = argv or [sys.executable, "-c", _WORKER_SRC]
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        proc = subprocess.Popen(self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        if self._readline(proc, WORKER_START_TIMEOUT_S) != "ready":
            self._kill(proc)
            raise ScoringError("the math-verify worker process did not start",
                               where=self._argv[0],
                               fix="Check that `python -c 'import math_verify'` works in this environment")
        return proc

    @staticmethod
    def _readline(proc: subprocess.Popen, timeout: float) -> str | None:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        return proc.stdout.readline().strip() if ready else None

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        proc.kill()
        proc.wait()

    def verify(self, *, gold: str, pred: str, timeout: int) -> bool | None:
        """True/False from math-verify, or None if the worker had to be killed (deadline)."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            try:
                self._proc.stdin.write(json.dumps([gold, pred, timeout]) + "\n")
                self._proc.stdin.flush()
            except BrokenPipeError:  # the child died between calls
                self._kill(self._proc)
                self._proc = None
                return None
            answer = self._readline(self._proc, HARD_DEADLINE_FACTOR * timeout)
            if answer not in ("true", "false"):
                self._kill(self._proc)
                self._proc = None
                return None
            return answer == "true"

    def close(self) -> None:
        """Stop the child process (also done at interpreter exit)."""
        with self._lock:
            if self._proc is not None:
                self._kill(self._proc)
                self._proc = None


_WORKER = VerifyWorker()
atexit.register(_WORKER.close)


def verify_equal(*, pred: str, gold: str, timeout: int = VERIFY_TIMEOUT_S) -> bool:
    """Whether two LaTeX answers are equal (same text up to spaces, or math-verify says so):
    directly in the main thread, else through the worker process (False past its deadline)."""
    if " ".join(pred.split()) == " ".join(gold.split()):
        return True
    if threading.current_thread() is threading.main_thread():
        return _mv_verify(gold, pred, timeout)
    return bool(_WORKER.verify(gold=gold, pred=pred, timeout=timeout))
