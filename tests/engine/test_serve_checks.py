"""`tvtool serve` before anything starts: options, the port, the valve, the plan given to vLLM (no engine)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from helpers import assert_one_line_error, cli

from tvtool.engine.options import EngineOptions
from tvtool.engine.serve_plan import ServeOptions, parse_range, plan_serve, requested_alpha, served_name
from tvtool.errors import OptionsError
from tvtool.toy import ASSET_DIR, BASE_DIR, REASONER_DIR

VALVE = ASSET_DIR / "valves" / "plusplus"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_names_and_alpha_requests():
    assert [served_name("valve", a) for a in (0.0, 0.5, 1.0, 0.37)] == ["valve@0", "valve@0.5", "valve@1", "valve@0.37"]
    rng = parse_range("0:1.25")
    assert rng == (0.0, 1.25)
    assert requested_alpha("valve@0.37", name="valve", alpha_range=rng) == 0.37
    assert requested_alpha("valve@.5", name="valve", alpha_range=rng) == 0.5
    assert requested_alpha("other@0.5", name="valve", alpha_range=rng) is None  # not ours: vLLM's own 404
    with pytest.raises(OptionsError) as e:
        requested_alpha("valve@1.5", name="valve", alpha_range=rng)
    assert str(e.value) == "α 1.5 is outside the served range [0, 1.25] (model 'valve@1.5'). Ask for α in [0, 1.25]"
    for bad in ("valve@", "valve@abc", "valve@nan", "valve@inf", "valve@0x1", "valve@1_0"):
        with pytest.raises(OptionsError, match="does not name an α"):
            requested_alpha(bad, name="valve", alpha_range=rng)


def test_plan_gives_vllm_one_static_adapter_per_alpha(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    o = ServeOptions(alphas=(0.0, 0.5, 1.0), any_alpha=True, cache=str(tmp_path), api_key="secret", port=8123)
    plan = plan_serve(base=REASONER_DIR, valve=VALVE, options=o, engine_options=EngineOptions(dtype="float32"),
                      progress=False)
    assert list(plan.names) == ["valve@0", "valve@0.5", "valve@1"]  # α = 0 too: an adapter with B = 0
    a = plan.argv
    assert a[0] == str(REASONER_DIR) and a[a.index("--served-model-name") + 1] == "valve@base"
    assert a[a.index("--host") + 1] == "127.0.0.1" and a[a.index("--max-loras") + 1] == "7"  # 3 served + 4 for any α
    assert a[a.index("--max-lora-rank") + 1] == "8" and a[a.index("--generation-config") + 1] == "vllm"
    modules = [json.loads(x) for x in a[a.index("--lora-modules") + 1:]]
    assert [m["name"] for m in modules] == ["valve@0", "valve@0.5", "valve@1"]
    assert all(m["base_model_name"] == "valve@base" and tmp_path / "alpha-adapters" in Path(m["path"]).parents
               for m in modules)
    assert "secret" not in " ".join(a) and plan.env["VLLM_API_KEY"] == "secret"
    assert plan.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1" and plan.spec["alpha_range"] == [0.0, 1.25]
    plain = plan_serve(base=REASONER_DIR, valve=VALVE, options=ServeOptions(alphas=(0.0, 1.0), cache=str(tmp_path)),
                       progress=False)
    assert plain.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] is None  # no resolver, no runtime adapter loading
    assert plain.argv[plain.argv.index("--max-loras") + 1] == "2"


def test_a_port_in_use_is_one_line_before_anything_starts(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = cli("serve", "--base", REASONER_DIR, "--delta", VALVE, "--port", port, "--cache", tmp_path)
    assert_one_line_error(r, f"port {port} on 127.0.0.1 is already in use (--port {port}). Stop what listens "
                             "there, or pass another --port")
    assert not (tmp_path / "alpha-adapters").exists()  # nothing was built


def test_a_valve_that_is_not_an_adapter_is_one_line(tmp_path, pairs):
    port = _free_port()
    r = cli("serve", "--base", REASONER_DIR, "--delta", BASE_DIR, "--port", port, "--cache", tmp_path)
    assert_one_line_error(r, f"the valve is a model (a reasoner: Δ = it − base), not a LoRA adapter or a factored "
                             f"delta ({BASE_DIR}). Factor it first: `tvtool svd-rank --base BASE --reasoner "
                             f"{BASE_DIR} --energy 0.9 -o valve.safetensors` and serve that, or pass --rank R to "
                             f"factor it here (cached)")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    r = cli("serve", "--base", REASONER_DIR, "--delta", tmp_path / "notes", "--port", port, "--cache", tmp_path)
    assert r.exit_code != 0 and "not a LoRA adapter, a factored delta or a model" in r.stderr
    base, _ = pairs["llama"]  # the toy valve on another model
    r = cli("serve", "--base", base, "--delta", VALVE, "--port", port, "--cache", tmp_path)
    assert r.exit_code != 0 and r.stderr.startswith("tvtool: error: the valve does not fit the base: ")


@pytest.mark.parametrize("args, message", [
    (["--any-alpha", "--alpha-range", "1:0"], "bad α range '1:0' (--alpha-range). Need finite LO ≤ HI, e.g. 0:1.25"),
    (["--alpha-range", "0:1"], "--alpha-range needs --any-alpha (--alpha-range). Add --any-alpha, or remove "
                               "--alpha-range"),
    (["--any-alpha", "--alpha", "0,2"], "α 2 is outside the served range [0, 1.25] (--alpha). Ask for α in [0, 1.25]"),
    (["--name", "my@valve"], "bad model name 'my@valve' (--name). Use letters, digits, '.', '_' or '-' (the α goes "
                             "after an '@')"),
])
def test_bad_options_are_one_line(tmp_path, args, message):
    r = cli("serve", "--base", REASONER_DIR, "--delta", VALVE, "--port", _free_port(), "--cache", tmp_path, *args)
    assert_one_line_error(r, message)
