"""Shared assertions and runners for the tests."""

from __future__ import annotations

import subprocess
import sys

import json

import torch
from click.testing import CliRunner

from tvtool.cli import main
from tvtool.engine.worker import WorkerExtension


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern, so that equality is bit for bit (−0.0 ≠ 0.0, NaN payloads count)."""
    t = t.contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bit_equal(a: dict, b: dict, names=None) -> None:
    names = names if names is not None else sorted(b)
    assert set(names) <= set(a), sorted(set(names) - set(a))
    for n in names:
        assert a[n].dtype == b[n].dtype and a[n].shape == b[n].shape, n
        assert torch.equal(bits(a[n]), bits(b[n])), f"{n}: {(bits(a[n]) != bits(b[n])).sum()} elements differ"


def cli(*args: str):
    """Run the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def cli_subprocess(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tvtool", *map(str, args)], capture_output=True, text=True)


def assert_one_line_error(result, expected: str) -> None:
    """Non-zero exit, exactly one line on stderr equal to `tvtool: error: <expected>`, no traceback."""
    err = result.stderr.strip()
    assert result.exit_code != 0 if hasattr(result, "exit_code") else result.returncode != 0
    assert "Traceback" not in err
    assert err == f"tvtool: error: {expected}", err


class _Worker(WorkerExtension):
    """A vLLM worker stand-in: keeps what `reload_weights` is given."""

    def reload_weights(self, *, weights_iterator):
        self.received = {}
        for name, t in weights_iterator:
            assert name not in self.received
            self.received[name] = t.clone()


def engine_loaded(source, config) -> dict[str, torch.Tensor]:
    w = _Worker()
    # what Engine.load_alpha sends through collective_rpc: plain data only
    report = w.tvtool_load_alpha(source=json.loads(json.dumps(source.to_dict())), config=config.to_dict())
    assert report["path"] == "streaming" and report["tensors"] == len(w.received)
    return w.received


def hub_cache_config(repo: str, data: bytes) -> None:
    """`repo`'s config.json alone in the HF hub cache, in its real layout (snapshots/<sha>/config.json →
    ../../blobs/<hash>), under conftest's throwaway HF_HOME: a Hub id that resolves without network."""
    import hashlib
    from pathlib import Path

    from huggingface_hub import constants

    d = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))
    blob, sha = hashlib.sha256(data).hexdigest(), hashlib.sha1(repo.encode()).hexdigest()
    (d / "blobs").mkdir(parents=True)
    (d / "blobs" / blob).write_bytes(data)
    (d / "snapshots" / sha).mkdir(parents=True)
    (d / "snapshots" / sha / "config.json").symlink_to(f"../../blobs/{blob}")
    (d / "refs").mkdir()
    (d / "refs" / "main").write_text(sha)


def hold_lock(path) -> "subprocess.Popen":
    """Another process holding the output lock of `path` until its stdin closes."""
    import os
    import textwrap
    from pathlib import Path

    code = textwrap.dedent(f"""
        import sys
        from tvtool.io.lock import output_lock
        with output_lock({str(path)!r}):
            print("locked", flush=True)
            sys.stdin.read()
    """)
    root = Path(__file__).resolve().parents[1]
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert p.stdout.readline().strip() == "locked"
    return p
