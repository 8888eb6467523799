"""The Hub-protocol test server (tests/hubserver.py) as a session fixture (a pytest plugin), and its handle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ALICE, BOB = "hf_alice_secret", "hf_bob_secret"
WRONG = "hf_wrong_token_0123456789"
PORT = int(os.environ["TVTOOL_TEST_HUB_PORT"])
ENDPOINT = f"http://127.0.0.1:{PORT}"
RETRY = "Re-run the same push: files already uploaded are not sent again"


class Hub:
    """Handle on the test server: its endpoint and its test-only routes."""

    endpoint = ENDPOINT

    def _call(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        with urllib.request.urlopen(urllib.request.Request(ENDPOINT + path, data=data), timeout=5) as r:
            return json.loads(r.read())

    def stats(self) -> dict[str, int]:
        return self._call("/_test/stats")

    def fault(self, *, method: str, path_contains: str, times: int = 1, status: int | None = None) -> None:
        """The next `times` matching requests get HTTP `status`, or (None) a dropped connection."""
        self._call("/_test/fault", {"method": method, "path_contains": path_contains, "times": times,
                                    "status": status})


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """The Hub-protocol server in a subprocess, for the whole session; its log goes to a file."""
    server = Path(__file__).with_name("hubserver.py")
    cmd = [sys.executable, str(server), "--port", str(PORT), "--token", f"alice={ALICE}", "--token", f"bob={BOB}"]
    log_path = tmp_path_factory.mktemp("hubserver") / "server.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    handle, deadline = Hub(), time.monotonic() + 20
    while True:
        try:
            handle.stats()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"hub server did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.1)
    yield handle
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
