"""What `tvtool serve` costs: first-use latency of --any-alpha, and memory per served α.

Starts `tvtool serve` on the toy reasoner with its bundled ++ valve (--alpha 0,1 --any-alpha, float32,
loopback), then asks with the `openai` client, one token per request (max_tokens 1), so the time is the
request's overhead rather than decoding:
  first use   valve@α for an α never asked before: the adapter is built (alpha_adapter: read the valve,
              B scaled in float32, written atomically to the cache) and loaded by vLLM, then answered;
  second use  the same name again (held by vLLM);
  static      valve@1, served from the start.
Memory per served α: vLLM's LoRA slot buffers (`lora_a_stacked`/`lora_b_stacked` of every LoRA layer,
[max_loras, 1, r, in] and [max_loras, 1, out, r]), summed in the worker of an offline engine through
`collective_rpc`, for max_loras 1 and 8; and the adapter's size on disk.
Writes bench/results/serve.md. Run: python bench/bench_serve.py
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
NEW = (0.11, 0.23, 0.37, 0.61, 0.89)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lora_buffer_bytes(worker) -> tuple[int, int]:
    """(bytes of every LoRA slot buffer, max_loras) in one vLLM worker (sent by collective_rpc)."""
    total, slots = 0, 0
    for m in worker.model_runner.model.modules():
        for name in ("lora_a_stacked", "lora_b_stacked"):
            held = getattr(m, name, None)
            for t in () if held is None else held if isinstance(held, (tuple, list)) else (held,):
                total += t.numel() * t.element_size()
                slots = t.shape[0]
    return total, slots


def slot_memory(valve, reasoner) -> dict[int, int]:
    from tvtool.engine.engine import Engine
    from tvtool.engine.options import EngineOptions

    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc of a function (bench only)
    out = {}
    for k in (1, 8):
        eo = EngineOptions(dtype="float32", max_model_len=256, enforce_eager=True, cpu_kv_cache_gb=1,
                           enable_lora=True, max_lora_rank=8, max_loras=k)
        with Engine(model=reasoner, options=eo) as e:
            total, slots = e.llm.collective_rpc(_lora_buffer_bytes)[0]
            assert slots == k, (slots, k)
            out[k] = total
    return out


def first_use(valve, reasoner, cache: Path) -> dict[str, list[float]]:
    import openai

    port = _free_port()
    cmd = [sys.executable, "-m", "tvtool", "serve", "--base", str(reasoner), "--delta", str(valve), "--alpha", "0,1",
           "--any-alpha", "--port", str(port), "--cache", str(cache), "--dtype", "float32", "--max-model-len", "256",
           "--enforce-eager", "--cpu-kv-cache-gb", "1"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    banner = []
    for line in proc.stderr:
        banner.append(line)
        if line.strip().startswith("stop:"):
            break
    if proc.poll() is not None:
        sys.exit("tvtool serve did not start:\n" + "".join(banner))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)

    def ask(model: str) -> float:
        t0 = time.perf_counter()
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tom has 3 apples ."}],
                                       max_tokens=1, temperature=0)
        return time.perf_counter() - t0

    try:
        ask("valve@1")  # warm-up
        times = {"static": [ask("valve@1") for _ in NEW], "first use": [], "second use": []}
        for a in NEW:
            times["first use"].append(ask(f"valve@{a:g}"))
            times["second use"].append(ask(f"valve@{a:g}"))
        return times
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)


def main() -> None:
    from tvtool.engine.options import vllm_version
    from tvtool.lowrank.alpha_adapter import alpha_adapter, open_valve
    from tvtool.toy import ASSET_DIR, REASONER_DIR

    valve = ASSET_DIR / "valves" / "plusplus"
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        v = open_valve(valve)
        t0 = time.perf_counter()
        folder = alpha_adapter(v, 0.5, cache=tmp)
        build = time.perf_counter() - t0
        disk = sum(f.stat().st_size for f in folder.iterdir())
        times = first_use(valve, REASONER_DIR, Path(tmp) / "served")
    slots = slot_memory(valve, REASONER_DIR)
    med = {k: statistics.median(v) for k, v in times.items()}
    per_slot = (slots[8] - slots[1]) / 7
    lines = ["# What `tvtool serve` costs: first use of --any-alpha, memory per served α", "",
             f"Toy reasoner + bundled ++ valve (rank 8, 28 LoRA modules), float32, CPU build of vLLM {vllm_version()}, "
             f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs).", "",
             "## First-use latency (`--any-alpha`, one-token requests, medians of 5 α)", "",
             "| request | median s | all (s) |", "|---|---|---|"]
    lines += [f"| {k} | {med[k]:.3f} | {', '.join(f'{x:.3f}' for x in times[k])} |" for k in times]
    lines += ["", f"First use costs **{med['first use'] - med['second use']:.3f} s** more than a request to a "
                  f"loaded α (building the adapter alone: {build:.3f} s in-process).", "",
              "## Memory per served α", "",
              f"vLLM's LoRA slot buffers: {slots[1]} bytes with max_loras 1, {slots[8]} bytes with max_loras 8: "
              f"**{per_slot / 1024:.0f} KiB per served α** (r × Σ(in + out) × 4 bytes over the adapted "
              f"modules); the adapter on disk: {disk / 1024:.0f} KiB.", ""]
    out = HERE / "results" / "serve.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
