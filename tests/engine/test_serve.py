"""`tvtool serve` end to end: vLLM's own server on the toy reasoner with the bundled ++ valve, asked with the
real `openai` client; the greedy token ids compared with `tvtool eval` (the same α adapters, float32).

One server per module (started as `python -m tvtool serve`, loopback only); the last test stops it with
SIGTERM and starts a second one (fixed α 0.5) to compare with the first one's --any-alpha answers, and
stops that one with SIGINT (Ctrl-C). Both stops must leave no process behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tvtool.engine.reaper import descendants, running
from tvtool.toy import ASSET_DIR, REASONER_DIR

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

VALVE = ASSET_DIR / "valves" / "plusplus"
N_QUESTIONS = 16
ENGINE = ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager", "--cpu-kv-cache-gb", "1"]
KEY = "test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    cache: Path
    banner: list[str]
    seen: dict[int, int] = field(default_factory=dict)  # every process under the server, recorded while it ran

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self):
        import openai  # the real client (test extra)

        return openai.OpenAI(base_url=self.url, api_key=KEY, max_retries=0, timeout=300)

    def stop(self, sig=signal.SIGTERM) -> str:
        """Stop it as a user would; its stderr afterwards. Nothing it started may still run."""
        if self.proc.poll() is None:
            self.seen.update(descendants(self.proc.pid))
            self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=120)
        deadline = time.monotonic() + 10
        while running(self.seen) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert running(self.seen) == [], f"left running: {running(self.seen)}"
        return err


def start(tmp: Path, *args: str) -> Server:
    port = _free_port()
    cmd = [sys.executable, "-m", "tvtool", "serve", "--base", str(REASONER_DIR), "--delta", str(VALVE),
           "--port", str(port), "--cache", str(tmp / "cache"), "--api-key", KEY, *ENGINE, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    banner = []
    for line in proc.stderr:  # the banner comes once /health answers
        banner.append(line.rstrip("\n"))
        if line.strip().startswith("stop:"):
            break
    if proc.poll() is not None or not banner or not banner[-1].strip().startswith("stop:"):
        proc.kill()
        raise AssertionError("server did not start:\n" + "\n".join(banner) + proc.stderr.read())
    server = Server(proc, port, tmp / "cache", banner)
    server.seen.update(descendants(proc.pid))
    return server


def _problems():
    from tvtool.evaluation.data import load_problems

    return list(load_problems(dataset="toy", limit=N_QUESTIONS))


def _questions() -> list[str]:
    return [p.question for p in _problems()]


def _ask(client, model: str, question: str) -> list[int]:
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                       temperature=0, max_tokens=200, extra_body={"return_token_ids": True})
    return list(r.choices[0].token_ids)


@pytest.fixture(scope="module")
def eval_ids(tmp_path_factory) -> dict[float, list[list[int]]]:
    """`tvtool eval --apply lora` at α 0, 0.5, 1 on the same questions: α → token ids per question."""
    out = tmp_path_factory.mktemp("eval")
    from helpers import cli

    r = cli("eval", "--base", REASONER_DIR, "--delta", VALVE, "--alpha", "0,0.5,1", "--apply", "lora",
            "--dataset", "toy", "--limit", N_QUESTIONS, "--max-tokens", 200, "--instruction", "", "--no-progress",
            *ENGINE, "-o", out)
    assert r.exit_code == 0, r.output
    ids = {}
    for a in (0.0, 0.5, 1.0):
        rows = [json.loads(x) for x in (out / f"alpha-{a:g}" / "toy" / "samples.jsonl").read_text().splitlines()]
        by_id = {r["id"]: r["token_ids"] for r in rows}
        ids[a] = [by_id[p.id] for p in _problems()]
    return ids


@pytest.fixture(scope="module")
def server(eval_ids, tmp_path_factory):
    s = start(tmp_path_factory.mktemp("serve"), "--alpha", "0,1", "--any-alpha", "--alpha-range", "0:1.25")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def any_half(server):
    """valve@0.5 through --any-alpha (not served from the start): built on the first request."""
    client, qs = server.client(), _questions()
    t0 = time.perf_counter()
    first = _ask(client, "valve@0.5", qs[0])
    first_s = time.perf_counter() - t0
    ids = [first] + [_ask(client, "valve@0.5", q) for q in qs[1:]]
    return ids, first_s


def test_banner_names_url_models_and_a_curl_line(server):
    text = "\n".join(server.banner)
    assert f"at {server.url} (vLLM" in text and "models: valve@0, valve@1; valve@base is the base without adapter" in text
    assert "any α: valve@α for α in [0, 1.25], built on its first request" in text
    assert f"curl {server.url}/chat/completions -H 'Authorization: Bearer <key>'" in text
    assert KEY not in text and all(KEY not in " ".join(p) for p in _cmdlines(server))  # the key is not shown


def _cmdlines(server):
    out = []
    for pid in [server.proc.pid, *descendants(server.proc.pid)]:
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0"))
        except OSError:
            pass
    return out[1:]  # the test passed the key to `tvtool serve` itself


def test_models_lists_every_served_alpha(server):
    ids = {m.id for m in server.client().models.list().data}
    assert {"valve@0", "valve@1"} <= ids


def test_concurrent_alpha_0_and_1_equal_eval_and_the_valve_shortens(server, eval_ids):
    client, qs = server.client(), _questions()
    jobs = [(a, i) for i in range(len(qs)) for a in (0.0, 1.0)]  # interleaved: both α in flight together
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda j: _ask(client, f"valve@{j[0]:g}", qs[j[1]]), jobs))
    by = {a: [ids for (b, _), ids in zip(jobs, got) if b == a] for a in (0.0, 1.0)}
    assert by[0.0] == eval_ids[0.0] and by[1.0] == eval_ids[1.0]  # greedy, float32: token for token
    long, short = statistics.mean(map(len, by[0.0])), statistics.mean(map(len, by[1.0]))
    assert short < 0.5 * long  # the report: 91.3 tokens at α = 0, 16.4 at α = 1


def test_any_alpha_builds_on_first_use_and_equals_eval(server, any_half, eval_ids):
    ids, first_s = any_half
    assert ids == eval_ids[0.5]
    built = list((server.cache / "alpha-adapters").glob("*/alpha-0.5/alpha_adapter.json"))
    assert len(built) == 1 and "valve@0.5" in {m.id for m in server.client().models.list().data}


def test_bad_names_get_clear_answers(server):
    import openai

    client, q = server.client(), _questions()[0]
    with pytest.raises(openai.NotFoundError, match="The model `gpt-4` does not exist"):
        _ask(client, "gpt-4", q)
    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, "valve@2", q)
    assert str(e.value) == ("Error code: 400 - α 2 is outside the served range [0, 1.25] (model 'valve@2'). "
                            "Ask for α in [0, 1.25]")
    with pytest.raises(openai.BadRequestError, match="'valve@abc' does not name an α"):
        _ask(client, "valve@abc", q)
    with pytest.raises(openai.AuthenticationError):
        server.client().with_options(api_key="wrong").models.list()
    for route, body in (("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(VALVE)}),
                        ("/adapters", {"name": "x", "src": str(VALVE)})):  # loading any folder stays closed
        req = urllib.request.Request(server.url.removesuffix("/v1") + route, method="POST",
                                     data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 404, route
    assert "x" not in {m.id for m in client.models.list().data}
    assert _ask(client, "valve@1", q)  # still serving


def test_any_alpha_equals_a_served_alpha_and_stops_leave_nothing(server, any_half, tmp_path):
    ids, _ = any_half
    err = server.stop(signal.SIGTERM)
    assert "tvtool: server stopped after" in err and "Traceback" not in err
    second = start(tmp_path, "--alpha", "0,0.5,1")  # 0.5 served from the start, a fresh cache
    try:
        client = second.client()
        assert "valve@0.5" in {m.id for m in client.models.list().data}
        assert [_ask(client, "valve@0.5", q) for q in _questions()] == ids  # token for token
    finally:
        err = second.stop(signal.SIGINT)  # Ctrl-C
    assert "tvtool: server stopped after" in err and "Traceback" not in err
