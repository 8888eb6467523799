"""`tvtool serve`: a valve behind vLLM's own OpenAI-compatible server, α chosen per request by model name.

    tvtool serve --base M --delta VALVE --alpha 0,0.5,1 [--any-alpha]   →   http://127.0.0.1:8000/v1

Every α is the model `NAME@α`: one LoRA adapter with α baked into its factors
(`tvtool.lowrank.alpha_adapter`, cached by the valve's content), given to vLLM as a static LoRA module,
so requests at different α are decoded in the same batches (`max_loras` covers the served α). NAME@0
is the adapter with B = 0, whose outputs are the base model's exactly; it is an adapter so that no
batch mixes requests with and without one (vLLM's CPU build applies its last adapter slot to those
without). The base without adapter is vLLM's served model name, NAME@base. With `any_alpha` a vLLM
LoRA resolver (`tvtool.engine.serve_process`) builds NAME@α for any α in `alpha_range` on first request.

Processes. This one checks what can fail early (options, the port, the valve against the base) and
builds the adapters (`tvtool.engine.serve_plan`), then runs vLLM's API server (`run_server`, what `vllm serve` runs for one API
server) in a child process in its own session, its output going to a log file; waits for /health;
announces the URL, the names and a curl line; and on Ctrl-C or SIGTERM stops the server (SIGTERM,
then SIGKILL of every process it started that still runs). While it lives, a watchdog
(`tvtool.engine.reaper.reap_on_death`) kills them if this process is killed outright.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tvtool.engine.options import EngineOptions, vllm_module
from tvtool.engine.reaper import descendants, kill_recorded, reap_on_death, running
from tvtool.engine.serve_plan import ServeOptions, ServePlan, banner, check_port, plan_serve
from tvtool.errors import EngineError

SERVER_MODULE = "tvtool.engine.serve_process"  # the child's entry point
STOP_GRACE_S = 30.0  # after SIGTERM, how long the server may take to shut down before it is killed


@dataclass
class ServeResult:
    url: str
    names: list[str]
    log: Path
    returncode: int | None
    seconds: float
    left_running: list[int] = field(default_factory=list)  # processes that needed SIGKILL

    def summary(self) -> str:
        killed = f"; {len(self.left_running)} process(es) killed after {STOP_GRACE_S:.0f} s" \
            if self.left_running else ""
        return f"tvtool: server stopped after {self.seconds:.0f} s{killed} (log: {self.log})"


# --- running ----------------------------------------------------------------------------------


class _Stop(Exception):
    """SIGTERM arrived: stop the server."""


def serve(*, base: str | os.PathLike, valve: str | os.PathLike, options: ServeOptions = ServeOptions(),
          engine_options: EngineOptions = EngineOptions(), announce: Callable[[str], None] = print) -> ServeResult:
    """Serve `valve` on `base` until Ctrl-C or SIGTERM (or the server fails: an EngineError). `announce` gets
    the banner (URL, names, a curl line) once the server answers."""
    vllm_module()  # one line if vLLM is missing, before anything else
    check_port(options.host, options.port)  # first: a port in use is one line before anything starts
    plan = plan_serve(base=base, valve=valve, options=options, engine_options=engine_options)
    t0 = time.monotonic()
    plan.log.parent.mkdir(parents=True, exist_ok=True)
    with _sigterm_raises(), reap_on_death(), open(plan.log, "w", encoding="utf-8") as log:
        proc = subprocess.Popen([sys.executable, "-m", SERVER_MODULE, json.dumps(plan.spec)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, env=_child_env(plan.env),
                                start_new_session=True)  # a terminal's Ctrl-C reaches tvtool, which stops it
        seen: dict[int, int] = {}
        try:
            _wait_ready(proc, plan, options.ready_timeout, seen)
            announce(banner(plan, api_key=bool(options.api_key or os.environ.get("VLLM_API_KEY"))))
            while proc.poll() is None:
                seen.update(descendants(proc.pid))
                time.sleep(1.0)
            raise EngineError(f"the vLLM server stopped (exit code {proc.returncode}): {_last_error(plan.log)}",
                              where=str(plan.log), fix="see the server log")
        except (KeyboardInterrupt, _Stop):
            pass
        finally:
            killed = _stop(proc, seen)
    return ServeResult(plan.url, list(plan.names), plan.log, proc.returncode, time.monotonic() - t0, killed)


def _child_env(changes: dict[str, str | None]) -> dict[str, str]:
    env = dict(os.environ)
    for k, v in changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def _wait_ready(proc: subprocess.Popen, plan: ServePlan, timeout: float, seen: dict[int, int]) -> None:
    """Until GET /health answers 200; an EngineError when the server exits or `timeout` passes first."""
    health = plan.url.removesuffix("/v1") + "/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.update(descendants(proc.pid))
        if proc.poll() is not None:
            raise EngineError(f"the vLLM server stopped while starting (exit code {proc.returncode}): "
                              f"{_last_error(plan.log)}", where=str(plan.log), fix="see the server log")
        with contextlib.suppress(OSError, urllib.error.URLError):
            with urllib.request.urlopen(health, timeout=2) as r:
                if r.status == 200:
                    return
        time.sleep(0.5)
    raise EngineError(f"the vLLM server did not answer within {timeout:.0f} s", where=str(plan.log),
                      fix="see the server log; raise --ready-timeout for a large model")


def _stop(proc: subprocess.Popen, seen: dict[int, int]) -> list[int]:
    """SIGTERM the server, wait for it and every process it started (recorded in `seen`), then SIGKILL what
    still runs after `STOP_GRACE_S`. Returns the pids that had to be killed."""
    if proc.poll() is None:
        seen.update(descendants(proc.pid))
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline:
        if proc.poll() is None:
            seen.update(descendants(proc.pid))
        elif not running(seen):
            return []
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.2)
    left = running(seen)
    kill_recorded(seen)
    proc.kill()
    proc.wait()
    return left


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM stops the server like Ctrl-C does (only the main thread can set signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Stop

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _last_error(log: Path) -> str:
    """The last line of the log that names an error (else its last line), shortened."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 65536))
            lines = [x.strip() for x in f.read().decode(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "no log"
    errors = [x for x in lines if re.search(r"Error|Exception|error:", x)]
    line = (errors or lines or ["no output"])[-1]
    return line[:300]


__all__ = ["ServeOptions", "ServeResult", "serve"]
