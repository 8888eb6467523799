"""Engine faults: what is checked before vLLM starts, Ctrl-C while it starts or while tvtool loads, and the
lines a user sees when the disk fills during an evaluation.

Every error is one exact line and exit code, the inputs keep their bytes, and no process is left behind.
Tests that start vLLM are marked `vllm` and `slow`; run them under `flock /tmp/tvtool-engine.lock`.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from multiprocessing import resource_tracker
from pathlib import Path

import pytest

import tvtool
from helpers import assert_one_line_error, cli
from tiny import edited_copy
from tvtool.engine.reaper import descendants

TOY = Path(tvtool.__file__).parent / "assets" / "toy"
ROOT = Path(__file__).resolve().parents[1]
NAN_AT = "model.layers.0.mlp.up_proj.weight"
INTERRUPTED = "tvtool: interrupted; partial outputs were removed, re-run to finish"
LOADING = "tvtool: interrupted while starting; nothing was written"


def hashes(*paths: Path) -> dict[str, str]:
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for p in paths
            for f in sorted([p] if p.is_file() else p.rglob("*")) if f.is_file()}


@pytest.fixture
def no_engine_start(monkeypatch):
    """The test fails if a vLLM engine is started (the check must come before it)."""
    import tvtool.engine.engine

    monkeypatch.setattr(tvtool.engine.engine.Engine, "_start", lambda self: pytest.fail("the engine was started"))


def _alive(pid: int, start: int) -> bool:
    from tvtool.engine.reaper import _stat

    st = _stat(pid)
    return st is not None and st[1] == start and st[2] != "Z"


# --- checked before the engine starts ---------------------------------------------------------------------

def test_prompts_longer_than_max_model_len_are_refused_before_the_engine_starts(tmp_path, no_engine_start):
    before = hashes(TOY)
    r = cli("eval", "--model", TOY / "base", "--dataset", "toy", "--limit", "3", "--max-model-len", "8",
            "-o", tmp_path / "ev")
    assert_one_line_error(r, "3 of 3 prompts do not fit the engine's context of 8 tokens (the longest has 43 tokens; "
                             "a prompt must leave room for one generated token) (--max-model-len 8). Raise "
                             "--max-model-len to at least 44 (the model allows 256), or shorten the prompts: "
                             "--instruction, --system-prompt, or the dataset's questions")
    assert r.exit_code == 2 and hashes(TOY) == before
    assert not (tmp_path / "ev" / "samples.jsonl").exists()


def test_only_the_prompts_that_do_not_fit_are_counted(tmp_path, no_engine_start):
    r = cli("eval", "--model", TOY / "base", "--dataset", "toy", "--limit", "20", "--max-model-len", "43",
            "-o", tmp_path / "ev")
    assert r.exit_code == 2
    n = int(r.stderr.split("tvtool: error: ")[1].split(" of ")[0])
    assert 0 < n < 20  # toy prompts have 40-43 tokens: some fit a 43-token context, some do not


@pytest.fixture
def nan_reasoner(tmp_path):
    def poison(sd):
        t = sd[NAN_AT].clone()
        t[3, 5] = float("nan")
        return {**sd, NAN_AT: t}

    return edited_copy(TOY / "reasoner", tmp_path / "nan-reasoner", poison)


def test_nan_in_a_sweep_is_found_before_the_engine_starts(tmp_path, nan_reasoner, no_engine_start):
    fix = "Fix or re-download the checkpoint (an engine cannot generate from NaN or Inf weights)"
    before = hashes(TOY, nan_reasoner)
    r = cli("eval", "--base", TOY / "base", "--reasoner", nan_reasoner, "-a", "0.5", "--dataset", "toy", "--limit", "2",
            "-o", tmp_path / "ev")
    assert_one_line_error(r, f"non-finite value nan in Δ of tensor {NAN_AT!r} at index (3, 5) "
                             f"({TOY / 'base'} → {nan_reasoner}). {fix}")
    d = tmp_path / "d.safetensors"  # the same Δ as a delta file, NaN kept
    assert cli("delta", TOY / "base", nan_reasoner, "-o", d, "--allow-nonfinite", "--no-progress").exit_code == 0
    before |= hashes(d)
    r = cli("eval", "--base", TOY / "base", "--delta", d, "-a", "0.5", "--dataset", "toy", "--limit", "2",
            "-o", tmp_path / "ev2")
    assert_one_line_error(r, f"non-finite value nan in Δ of tensor {NAN_AT!r} at index (3, 5) ({d}). {fix}")
    assert r.exit_code == 2 and hashes(TOY, nan_reasoner, d) == before
    assert not (tmp_path / "ev" / "alpha-0.5").exists() and not (tmp_path / "ev2" / "alpha-0.5").exists()


def test_a_zero_cpu_kv_cache_is_refused_before_the_engine_starts(tmp_path, no_engine_start):
    r = cli("eval", "--model", TOY / "base", "--dataset", "toy", "--limit", "2", "--cpu-kv-cache-gb", "0",
            "-o", tmp_path / "ev")
    assert_one_line_error(r, "the CPU KV cache must be at least 1 GiB, got 0 (--cpu-kv-cache-gb 0). Give its size in "
                             "whole GiB, e.g. --cpu-kv-cache-gb 4, or leave it unset (VLLM_CPU_KVCACHE_SPACE, else "
                             "vLLM's own choice)")
    assert r.exit_code == 2


def test_a_corrupt_config_json_is_reported_as_such(tmp_path, no_engine_start):
    model = tmp_path / "model"
    shutil.copytree(TOY / "base", model)
    (model / "config.json").write_text('{"model_type": "llama",, }')
    before = hashes(model)
    expected = (f"config.json is not valid JSON (Expecting property name enclosed in double quotes at line 1, "
                f"column 24) ({model / 'config.json'}). Restore the file (re-download the model's config.json)")
    for args in (["eval", "--model", model, "--dataset", "toy", "--limit", "2", "-o", tmp_path / "ev"],
                 ["eval", "--base", TOY / "base", "--reasoner", model, "-a", "0.5", "--dataset", "toy", "--limit", "2",
                  "-o", tmp_path / "ev2"],
                 ["materialize", TOY / "base", "--reasoner", model, "-a", "0.5", "-o", tmp_path / "m", "--no-progress"],
                 ["delta", TOY / "base", model, "-o", tmp_path / "d.safetensors", "--no-progress"]):
        r = cli(*args)
        assert_one_line_error(r, expected)
        assert r.exit_code == 2
    assert hashes(model) == before
    assert not (tmp_path / "m" / "alpha-0.5").exists() and not (tmp_path / "d.safetensors").exists()


def test_vllm_log_lines_that_cannot_be_written_are_dropped_not_printed(tmp_path, capfd):
    """A full disk: vllm.log cannot take vLLM's shutdown lines; logging would print a traceback per line on the
    terminal before tvtool's own error. They are dropped instead."""
    from tvtool.engine.logs import vllm_logs

    (tmp_path / "vllm.log").symlink_to("/dev/full")  # every write fails with ENOSPC, as on a full disk
    vllm, client = logging.getLogger("vllm"), logging.getLogger("vllm.v1.engine.core_client")
    level = vllm.level
    vllm.setLevel(logging.DEBUG)  # the lines are emitted, whatever vLLM's import configured
    try:
        with vllm_logs(folder=tmp_path):
            for i in range(20):
                assert client.isEnabledFor(logging.INFO)
                client.info("[shutdown] MPClient: step %d", i)
    finally:
        vllm.setLevel(level)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


# --- Ctrl-C while tvtool loads, while vLLM starts --------------------------------------------------------

def _run_tvtool(args, *, env=None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "tvtool", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.parametrize("delay", [0.3, 1.0, 2.0])
def test_ctrl_c_while_materialize_starts_is_one_line(tmp_path, delay):
    """Ctrl-C while Python imports (0.3 s: always, the imports take longer), while tvtool loads, or once the
    merge runs. The toy's whole run can end in ~1 s on an idle machine: a run the signal finds finished must
    then be complete, never half-written."""
    out = tmp_path / "m"
    p = _run_tvtool(["materialize", TOY / "base", "--reasoner", TOY / "reasoner", "-a", "0.5", "-o", out,
                     "--no-progress"])
    time.sleep(delay)
    finished = p.poll() is not None
    os.killpg(p.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    _, err = p.communicate(timeout=120)
    if finished or p.returncode == 0:  # over before the signal (or in its last instant, after the rename)
        assert delay > 0.3 and p.returncode == 0, err
        assert sorted(os.listdir(out)) == ["alpha-0.5"] and (out / "alpha-0.5" / "tvtool.json").is_file()
    else:  # 130; rarely the interpreter ends by SIGINT after the line (−2): a shell shows both as $? = 130
        assert p.returncode in (130, -signal.SIGINT), err
        assert err.strip() in (LOADING, INTERRUPTED), err  # while importing, or once the merge runs
        assert not out.exists() or sorted(os.listdir(out)) == []  # nothing half-written (no alpha-0.5(.partial))
    assert not list(tmp_path.glob(".*tvtool-lock"))


def test_interruptible_start_survives_a_swallowed_interrupt_and_kills_what_it_started():
    """The mechanism, without vLLM: the block starts a process and swallows the first KeyboardInterrupt (as
    vLLM's handshake does), then blocks; the Ctrl-C still ends it within a second, and the process is dead."""
    import threading

    from tvtool.engine.reaper import interruptible_start

    child = None
    t0 = time.monotonic()
    threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        with interruptible_start():
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            try:
                time.sleep(30)
            except KeyboardInterrupt:  # swallowed, as vllm.utils.network_utils.zmq_socket_ctx does
                pass
            time.sleep(30)  # vLLM's 600 s wait for an engine that will never answer
    assert time.monotonic() - t0 < 10
    assert child.wait(timeout=10) == -signal.SIGKILL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_interruptible_start_ends_an_interrupted_start_that_completed():
    import threading

    from tvtool.engine.reaper import interruptible_start

    threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        with interruptible_start():
            try:
                time.sleep(5)
            except KeyboardInterrupt:  # swallowed, and the "start" then completes normally
                pass


def _wait_for_engine_core(p: subprocess.Popen, seen: dict, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.update(descendants(p.pid))
        for pid in list(seen):
            try:
                if b"EngineCore" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return
            except OSError:
                pass
        assert p.poll() is None, p.communicate()[1]
        time.sleep(0.2)
    pytest.fail("vLLM's EngineCore did not start")


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("to", ["process-group", "process"])
def test_ctrl_c_while_vllm_starts_stops_it_within_seconds(tmp_path, to):
    """vLLM 0.32 swallows a KeyboardInterrupt during its EngineCore handshake (its zmq_socket_ctx) and then
    waited 600 s for an engine that never answers; tvtool's start kills the engine and ends at once."""
    pytest.importorskip("vllm")
    p = _run_tvtool(["eval", "--model", TOY / "base", "--dataset", "toy", "--limit", "2", "--dtype", "float32",
                     "--enforce-eager", "--max-model-len", "256", "--max-tokens", "8", "--no-progress",
                     "-o", tmp_path / "ev"])
    seen: dict[int, int] = {}
    try:
        _wait_for_engine_core(p, seen)
        time.sleep(2)  # the engine is loading: the handshake is under way
        seen.update(descendants(p.pid))
        t0 = time.monotonic()
        if to == "process-group":
            os.killpg(p.pid, signal.SIGINT)
        else:
            os.kill(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=120)
        took = time.monotonic() - t0
        assert p.returncode == 130, err
        assert err.strip() == INTERRUPTED
        assert took < 60, took  # seconds (a loaded 2-core machine), not vLLM's 600 s timeout
        deadline = time.monotonic() + 15
        while any(_alive(pid, s) for pid, s in seen.items()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid, s in seen.items() if _alive(pid, s)], "engine processes left behind"
        assert not (tmp_path / "ev" / "summary.json").exists()
    finally:
        for pid, s in seen.items():  # only processes this test started
            if _alive(pid, s):
                os.kill(pid, signal.SIGKILL)
        if p.poll() is None:
            p.kill()


# --- with a running engine -----------------------------------------------------------------------------

@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_validation_errors_are_one_line(vengine, monkeypatch):
    """If a prompt gets past the length check, vLLM's own validation error class is caught where requests are
    sent (`Engine.generate`, which the Ray actors call too)."""
    from tvtool.engine.engine import Engine
    from tvtool.engine.options import SamplingOptions
    from tvtool.errors import EngineError

    monkeypatch.setattr(Engine, "check_prompts", lambda self, **kw: None)
    eng = vengine.engine
    eng.load_weights(path=vengine.materialized)
    long = " ".join(["a"] * 300)  # 300 tokens
    with pytest.raises(EngineError) as e:
        eng.generate(prompts=[long], sampling=SamplingOptions(max_tokens=4), add_special_tokens=False)
    msg = str(e.value)
    assert msg.startswith("vLLM refused the request: This model's maximum context length is 256 tokens. However, "
                          "your prompt contains at least 257 input tokens"), msg
    assert msg.endswith(f"({vengine.materialized}). Raise --max-model-len (within the model's limit) or shorten the "
                        "prompts") and "\n" not in msg
    from vllm.exceptions import VLLMValidationError

    assert isinstance(e.value.__cause__, VLLMValidationError) and not isinstance(e.value.__cause__, ValueError)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("full", ["log", "samples"])
def test_a_full_disk_during_eval_is_one_line(tmp_path, monkeypatch, full):
    """A full disk, met by vllm.log as the engine starts (vLLM cannot print) or by samples.jsonl's sync
    mid-run: tvtool's one line, not vLLM's start-up error or its shutdown logging, and no engine left."""
    pytest.importorskip("vllm")
    import tvtool.evaluation.runs as runs

    class FullDisk:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def fsync(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runs, "os", FullDisk())
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    out = tmp_path / "ev"
    out.mkdir()
    if full == "log":
        (out / "vllm.log").symlink_to("/dev/full")
    resource_tracker.ensure_running()  # Python's own, one per process for its lifetime (vLLM starts it)
    before = set(descendants(os.getpid()))
    r = cli("eval", "--model", TOY / "base", "--dataset", "toy", "--limit", "2", "--dtype", "float32",
            "--enforce-eager", "--max-model-len", "256", "--max-tokens", "4", "--no-progress", "-o", out)
    assert_one_line_error(r, "no space left on the device [ENOSPC]. Free some space or write the output elsewhere, "
                             "then re-run (partial outputs were removed; finished ones are kept)")
    deadline = time.monotonic() + 15
    while (left := set(descendants(os.getpid())) - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, left
    assert not (out / "summary.json").exists()
