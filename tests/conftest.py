"""Session-wide test setup.

Hub settings must be in the environment before huggingface_hub is first
imported: the tests talk to a local Hub-protocol server (tests/hubserver.py)
on a free loopback port, with a throwaway HF_HOME, and never to the network.
"""

import os
import socket
import tempfile


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_port = _free_port()
os.environ["TVTOOL_TEST_HUB_PORT"] = str(_port)
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{_port}"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="tvtool-hf-home-")
os.environ["TVTOOL_CACHE"] = tempfile.mkdtemp(prefix="tvtool-cache-")  # α adapters: never the user's cache
os.environ.pop("HF_TOKEN", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

pytest_plugins = ["engine_setup", "hub_fixture"]


@pytest.fixture(scope="session")
def pairs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Tiny (base, reasoner) folders for llama, qwen2 (q/k/v biases) and a tied-embedding llama."""
    root = tmp_path_factory.mktemp("pairs")
    return {arch: tiny.make_pair(root, arch) for arch in ("llama", "qwen2", "tied")}


@pytest.fixture(scope="session")
def llama(pairs):
    return pairs["llama"]


@pytest.fixture(scope="session")
def f32_deltas(pairs, tmp_path_factory) -> dict[str, Path]:
    """A float32 delta file per architecture of `pairs` (θ2 − θ1 computed by `tvtool delta`)."""
    import tvtool

    root = tmp_path_factory.mktemp("deltas")
    return {a: tvtool.delta(base=b, reasoner=r, output=root / f"{a}.safetensors",
                            options=tvtool.DeltaOptions(dtype="float32", progress=False)).output
            for a, (b, r) in pairs.items()}


@pytest.fixture(scope="session")
def trio(pairs, tmp_path_factory):
    """(base, reasoner 1, reasoner 2): a second fine-tune of the same llama base."""
    base, r1 = pairs["llama"]
    r2 = tmp_path_factory.mktemp("r2") / "reasoner2"
    shutil.copytree(r1, r2)
    sd = tiny.finetune_like(tiny.state_dict(base), seed=7, scale=0.08)
    for f in r2.glob("*.safetensors"):
        save_file({n: sd[n].contiguous() for n in load_file(f)}, f, metadata={"format": "pt"})
    return base, r1, r2
