"""`python tests/valve/launched_run.py train …` under torchrun or accelerate launch: `tvtool train`, instrumented.

- TVTOOL_TEST_KILL_AFTER=N: the main process SIGKILLs itself right after writing its Nth checkpoint, as an
  out-of-memory kill or a preempted node would end it; the launcher then stops the other processes.
- TVTOOL_TEST_GATHERS=PATH: every DTensor.full_tensor() (a gather of a sharded tensor) is logged with its name's
  shape and dtype to PATH.<rank>.json at exit, so a test can see that saving gathers LoRA tensors only.
"""

from __future__ import annotations

import atexit
import json
import os
import signal

from torch.distributed.tensor import DTensor

import tvtool.valve.train_loop as tl
from tvtool.cli import main

_real_save, _written = tl.save_checkpoint, []


def _save_then_die(tmp, state) -> None:
    _real_save(tmp, state)
    _written.append(state["step"])
    if len(_written) == int(os.environ["TVTOOL_TEST_KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)


if os.environ.get("TVTOOL_TEST_KILL_AFTER"):
    tl.save_checkpoint = _save_then_die

if os.environ.get("TVTOOL_TEST_GATHERS"):
    _gathered: list = []
    _real_full = DTensor.full_tensor

    def _logged_full(self, *a, **k):
        _gathered.append([list(self.shape), str(self.dtype)])
        return _real_full(self, *a, **k)

    DTensor.full_tensor = _logged_full
    atexit.register(lambda: open(f"{os.environ['TVTOOL_TEST_GATHERS']}.{os.environ.get('RANK', '0')}.json", "w")
                    .write(json.dumps(_gathered)))

if __name__ == "__main__":
    main(prog_name="tvtool")
