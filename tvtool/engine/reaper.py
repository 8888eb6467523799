"""Engine processes die with tvtool: a watchdog that kills what tvtool started when tvtool dies.

vLLM runs its EngineCore and workers in child processes (spawned on CPU, so fork hooks do
not run in them and a parent-death signal cannot be set from here). When tvtool is killed
(SIGKILL, OOM killer) they are orphaned, holding GBs of RAM or a GPU. `reap_on_death()`
starts a small watchdog process (stdlib only, its own session) that, while tvtool lives,
records every descendant process tvtool starts, and, when tvtool dies (its pipe closes),
SIGKILLs the recorded ones still running (checked by start time, so a reused pid is never
hit). The watchdog only touches processes started under tvtool after it began.
`reap_actor(pid)` does the same for a Ray actor's engine (`tvtool.evaluation.cluster`), by polling.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

POLL_S = 0.5
STOP = b"q"


@contextlib.contextmanager
def reap_on_death() -> Iterator[subprocess.Popen | None]:
    """While the block runs, processes this process starts are killed if it dies. Linux only (/proc)."""
    if not Path("/proc/self/stat").exists():
        yield None
        return
    dog = subprocess.Popen([sys.executable, "-S", "-I", __file__, str(os.getpid())], stdin=subprocess.PIPE,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                           close_fds=True)
    try:
        yield dog
    finally:
        with contextlib.suppress(OSError):
            dog.stdin.write(STOP)  # a normal end: the watchdog leaves without killing anything
            dog.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            dog.wait(timeout=10)


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time in clock ticks, state) of `pid`, None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2:].split()  # fields after "pid (comm) "
    return int(rest[1]), int(rest[19]), rest[0]


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every live descendant of `root`."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit() and (st := _stat(int(d))) is not None and st[2] != "Z":
            children.setdefault(st[0], []).append(int(d))
            starts[int(d)] = st[1]
    out, todo = {}, [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out[c] = starts[c]
            todo.append(c)
    return out


def _watch(parent: int) -> None:
    me = os.getpid()
    since = _stat(me)[1]
    seen: dict[int, int] = {}
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if _stat(parent) is not None:
            seen.update({p: s for p, s in descendants(parent).items() if p != me and s >= since})
        if ready:
            data = os.read(sys.stdin.fileno(), 4096)
            if STOP in data:
                return
            if not data:
                break  # the pipe closed without a word: tvtool died
    kill_recorded(seen)


def kill_recorded(seen: dict[int, int]) -> int:
    """SIGKILL every recorded process ({pid: start time}, from `descendants`) that still runs: the same
    process, checked by start time, so a reused pid is never hit. Returns how many were killed."""
    n = 0
    for pid, start in seen.items():
        st = _stat(pid)
        if st is not None and st[1] == start and st[2] != "Z":
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                n += 1
    return n


def running(seen: dict[int, int]) -> list[int]:
    """The recorded processes ({pid: start time}) that still run (zombies count as gone)."""
    return [pid for pid, start in seen.items() if (st := _stat(pid)) is not None and st[1] == start and st[2] != "Z"]


# --- Ctrl-C while vLLM starts stops the start --------------------------------------------------------------
# vLLM 0.32 loses a Ctrl-C that lands while its engine loads: `launch_core_engines` waits for the EngineCore
# handshake inside `vllm.utils.network_utils.zmq_socket_ctx`, which catches KeyboardInterrupt (logged at debug
# level) and returns as if the handshake were done. The client then blocks in one 600 s zmq poll for a READY
# message (`MPClient.__init__`, VLLM_ENGINE_READY_TIMEOUT_S) that may never come, and fails with "Timed out ...
# slow weight loading"; or, when the handshake did finish, the start completes as if no Ctrl-C had come. The
# EngineCore itself only records a SIGINT or SIGTERM received while it loads (vllm/v1/engine/core.py), so it
# keeps loading. `interruptible_start` makes the first Ctrl-C final: it SIGKILLs the processes the start has
# made (they would not stop), and keeps interrupting the main thread until the start is left, so that vLLM's
# waits end at once; the start then ends in KeyboardInterrupt, however vLLM handled the first one.

RESEND_S = 0.3


@contextlib.contextmanager
def interruptible_start() -> Iterator[threading.Event]:
    """Around starting a vLLM engine in the main thread: a Ctrl-C kills the processes started in the block and
    ends it with KeyboardInterrupt (see above). Elsewhere (another thread, no /proc) it changes nothing."""
    if threading.current_thread() is not threading.main_thread() or not Path("/proc/self/stat").exists():
        yield threading.Event()
        return
    me, before = os.getpid(), descendants(os.getpid())
    hit, inside, lock = threading.Event(), [True], threading.Lock()

    def kill_started() -> None:
        for pid, start in descendants(me).items():  # not multiprocessing's resource tracker: shared, it ends with us
            if before.get(pid) != start and not _is_resource_tracker(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    def interrupt_again() -> None:  # until the block is left: vLLM may swallow one KeyboardInterrupt
        while True:
            time.sleep(RESEND_S)
            with lock:
                if not inside[0]:
                    return
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    own = sys._getframe().f_code  # this generator's code: on the stack only while it sets up or cleans up

    def on_sigint(signum, frame):
        if not hit.is_set():
            hit.set()
            threading.Thread(target=interrupt_again, name="tvtool-interrupt", daemon=True).start()
        kill_started()
        while frame is not None:  # never in the middle of this block's own clean-up: it raises at its end
            if frame.f_code is own:
                return
            frame = frame.f_back
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)  # (signal.signal runs pending handlers first: ours)
    try:
        yield hit
    except BaseException:
        if hit.is_set():  # whatever vLLM made of the interrupt (e.g. "Engine core initialization failed")
            raise KeyboardInterrupt from None
        raise
    finally:
        with lock:
            inside[0] = False
        signal.signal(signal.SIGINT, previous)
        if hit.is_set():
            kill_started()
    if hit.is_set():  # the start finished although interrupted (vLLM swallowed it): the caller closes the engine
        raise KeyboardInterrupt


def _is_resource_tracker(pid: int) -> bool:
    try:
        return b"multiprocessing.resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


# --- a Ray actor's vLLM processes die with the actor (tvtool.evaluation.cluster) ---------------------------
# This watcher polls: it records the actor's descendants each second and SIGKILLs them once the actor
# is gone (checked by start time, as above).

_ACTOR_WATCH = r"""
import os, signal, sys, time
parent, me = int(sys.argv[1]), os.getpid()
def stat(pid):
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return int(f[1]), f[19]
    except (OSError, IndexError, ValueError):
        return None
born = stat(parent)[1]
known = {}
while (s := stat(parent)) is not None and s[1] == born:  # a SIGKILLed actor cannot tell us: poll
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit() and (x := stat(int(d))):
            kids.setdefault(x[0], []).append((int(d), x[1]))
    todo = [parent]
    while todo:
        for pid, st in kids.get(todo.pop(), []):
            if pid != me:
                known[pid] = st
                todo.append(pid)
    time.sleep(1.0)
for pid, st in known.items():
    if (x := stat(pid)) is not None and x[1] == st:  # the same process, not a reused pid
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
"""


def reap_actor(parent: int) -> subprocess.Popen | None:
    """A process in its own session that watches `parent`'s descendants (each second) and SIGKILLs
    them once `parent` is gone, however it died (Linux /proc; elsewhere nothing is started)."""
    if not Path("/proc").is_dir():
        return None
    return subprocess.Popen([sys.executable, "-c", _ACTOR_WATCH, str(parent)], start_new_session=True,
                            stdin=subprocess.DEVNULL)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is tvtool's to handle (it shuts the engine down)
    _watch(int(sys.argv[1]))
