"""`python -m tvtool` and the `tvtool` command.

Loading the CLI takes seconds (torch, transformers; more on a busy machine). A Ctrl-C in that time ends the
process at once with one line and exit code 130: nothing has been written and no process started yet, so
there is nothing to clean up. KeyboardInterrupt is not raised in the middle of an import: some libraries
catch it there and go on half-imported (numpy, typing_extensions), which ends later in an unrelated traceback.
`import tvtool` itself is light (tvtool/__init__.py), so this guard covers the heavy imports. Once the CLI
runs, `tvtool.cli` handles Ctrl-C (partial outputs removed).
"""

import os
import signal
import sys


def _stop_loading(signum, frame) -> None:
    sys.stderr.write("tvtool: interrupted while starting; nothing was written\n")
    sys.stderr.flush()
    os._exit(130)


_previous = signal.signal(signal.SIGINT, _stop_loading)
try:
    from tvtool.cli import main
finally:
    signal.signal(signal.SIGINT, _previous)

if __name__ == "__main__":
    main()
