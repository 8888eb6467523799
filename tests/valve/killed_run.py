"""`python tests/valve/killed_run.py train …` (under torchrun or accelerate launch): `tvtool train` whose main
process SIGKILLs itself right after writing its Nth checkpoint (TVTOOL_TEST_KILL_AFTER), as an out-of-memory kill
or a preempted node would end it. The launcher then stops the other processes."""

from __future__ import annotations

import os
import signal

import tvtool.valve.train_loop as tl
from tvtool.cli import main

_real, _written = tl.save_checkpoint, []


def _save_then_die(tmp, state) -> None:
    _real(tmp, state)
    _written.append(state["step"])
    if len(_written) == int(os.environ["TVTOOL_TEST_KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)


tl.save_checkpoint = _save_then_die

if __name__ == "__main__":
    main(prog_name="tvtool")
