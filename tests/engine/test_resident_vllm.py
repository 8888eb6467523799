"""The resident α swap in a real vLLM engine (CPU build).

For each source kind and operator, one α at a time: the streaming load (`--resident off`) and the
resident load of the same configuration put the same bytes into every region of every worker's
parameters (per-worker digests of what was written before vLLM's processing: the layout found by
baking vLLM's own loaders, so fused q/k/v and gate/up with their biases included) and generate the
same greedy token ids. After the first capture a resident α reads no input. One engine per module:
the session's LoRA-enabled llama engine (`vengine`), and a qwen2 engine (q/k/v biases) for the rest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine_setup import MAX_TOKENS, engine_options
from tiny import edited_copy, finetune_like, state_dict
from tvtool.engine.options import SamplingOptions
from tvtool.merge.config import MergeConfig
from tvtool.vectors.source import DeltaSource

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[2]


def compare(engine, source: DeltaSource, configs, prompts) -> list[dict]:
    """Each configuration streamed, then resident: equal digests and ids; returns the resident loads."""
    engine.record_digests(source=source)
    s, loads, digests = SamplingOptions(max_tokens=MAX_TOKENS), [], set()
    for c in configs:
        ref = engine.load_alpha(source=source, config=c, force=True, resident="off")
        want = [o[0].token_ids for o in engine.generate(prompts=prompts, sampling=s, add_special_tokens=False)]
        got = engine.load_alpha(source=source, config=c, force=True, resident="cpu")
        ids = [o[0].token_ids for o in engine.generate(prompts=prompts, sampling=s, add_special_tokens=False)]
        assert (ref["path"], got["path"]) == ("streaming", "resident"), c
        assert got["digests"] == ref["digests"] and None not in got["digests"], c
        assert ids == want, c
        loads.append(got)
        digests.add(tuple(ref["digests"]))
    assert len(digests) == len(configs)  # each configuration loaded other bytes: the comparison can fail
    return loads


def test_a_pair_at_every_alpha_reads_nothing_after_the_capture(vengine):
    src = DeltaSource(base=str(vengine.base), reasoner=str(vengine.reasoner))
    loads = compare(vengine.engine, src, [MergeConfig(a) for a in (0.5, 0.0, 1.0, -0.4, 1.3)], vengine.prompts)
    assert loads[0]["captured"] and loads[0]["bytes_read"] > 0
    assert [x["captured"] for x in loads[1:]] == [False] * 4
    # /proc/self/io counts every read of the worker process: vLLM's threads read eventfds (8 bytes) now and then
    assert all(x["bytes_read"] < 1024 for x in loads[1:]) and [x["storage_bytes"] for x in loads[1:]] == [0] * 4


def test_delta_files_factored_deltas_and_peft_adapters(vengine, f32_deltas, lora_pair, tmp_path):
    from tvtool.lowrank.svd import LowRankOptions, svd_rank

    e, base = vengine.engine, str(vengine.base)
    compare(e, DeltaSource(base=base, delta=str(f32_deltas["llama"])), [MergeConfig(0.5), MergeConfig(1.0)],
            vengine.prompts)
    f = svd_rank(base=vengine.base, reasoner=vengine.reasoner, output=tmp_path / "f.safetensors",
                 options=LowRankOptions(rank=4, method="exact", dtype="float32", progress=False)).output
    compare(e, DeltaSource(base=base, delta=str(f)), [MergeConfig(0.6), MergeConfig(1.0)], vengine.prompts)
    compare(e, DeltaSource(base=base, delta=str(lora_pair.adapters[0])), [MergeConfig(1.0), MergeConfig(-0.5)],
            vengine.prompts)


def test_include_exclude_alpha_rules_and_layer_schedules(vengine):
    src = DeltaSource(base=str(vengine.base), reasoner=str(vengine.reasoner))
    compare(vengine.engine, src, [MergeConfig(1.0, include="mlp"), MergeConfig(0.6, exclude="embed|lm_head"),
                                  MergeConfig(0.8, rules=(("q_proj", 0.0), ("mlp", 1.5))),
                                  MergeConfig(0.9, schedule=(0.0, 1.0))], vengine.prompts)


def test_several_vectors_and_every_operator(vengine, trio):
    base, r1, r2 = trio
    src = DeltaSource(base=str(base), reasoner=str(r1), more=(str(r2),))
    w = (1.0, 0.7)
    compare(vengine.engine, src, [
        MergeConfig(0.8, weights=(0.7, -0.4)), MergeConfig(1.0, method="trim", density=0.3, weights=w),
        MergeConfig(0.9, method="ties", density=0.3, weights=w), MergeConfig(0.6, method="dare_linear", p=0.3, weights=w),
        MergeConfig(0.6, method="dare_ties", p=0.2, weights=w),
        MergeConfig(0.5, method="breadcrumbs", beta=0.05, gamma=0.1, weights=w),
        MergeConfig(0.5, method="breadcrumbs_ties", beta=0.05, gamma=0.1, weights=w)], vengine.prompts)


def test_vocab_intersect(vengine, tmp_path):
    sd = finetune_like(state_dict(vengine.base), seed=11, scale=0.08)
    vocab = {n for n in sd if "embed_tokens" in n or "lm_head" in n}
    r2 = edited_copy(vengine.reasoner, tmp_path / "r2", lambda _: {k: (v[:248] if k in vocab else v).contiguous()
                                                                   for k, v in sd.items()})
    cfg = json.loads((r2 / "config.json").read_text())
    (r2 / "config.json").write_text(json.dumps({**cfg, "vocab_size": 248}))
    compare(vengine.engine, DeltaSource(base=str(vengine.base), reasoner=str(r2), vocab="intersect"),
            [MergeConfig(0.5), MergeConfig(1.0)], vengine.prompts)


# --- a plain engine (no LoRA) of another architecture, tensor parallel -----------------------------------


@pytest.fixture(scope="module")
def qwen(pairs):
    from tvtool.engine.engine import Engine
    from tvtool.engine.prompting import PromptOptions

    base, reasoner = pairs["qwen2"]
    src = DeltaSource(base=str(base), reasoner=str(reasoner))
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"  # one core per rank: vLLM's CPU build will not bind 2 ranks
    try:                                             # to one NUMA node by itself
        e = Engine.for_source(source=src, options=engine_options(tensor_parallel_size=2))
    finally:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND") if bind is None else os.environ.update(
            VLLM_CPU_OMP_THREADS_BIND=bind)
    yield e, src, e.prompts(questions=["what is 7 + 5", "tom has 3 apples"], options=PromptOptions())
    e.close()


def test_tensor_parallel_each_worker_holds_its_shards(qwen):
    e, src, prompts = qwen
    loads = compare(e, src, [MergeConfig(0.5), MergeConfig(1.0), MergeConfig(0.7, method="ties", density=0.4)],
                    prompts)
    assert loads[0]["workers"] == 2
    whole = 4 * sum(t.numel() for t in state_dict(Path(src.base)).values())  # θ1 + θ2 of the whole model, bf16
    # each worker holds its shards: half of q, o, MLP and vocab rows; the norms and the one KV head in full
    assert 0.5 * whole <= loads[0]["resident_bytes"] < 0.6 * whole


# --- a killed sweep resumes and leaves no engine ------------------------------------------------------------


@pytest.mark.slow
def test_a_resident_sweep_killed_resumes_redoing_nothing_finished(llama, tmp_path):
    from tvtool.engine.reaper import descendants

    out = tmp_path / "ev"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, "-m", "tvtool", "eval", "--base", str(llama[0]), "--reasoner", str(llama[1]),
           "--alpha", "1,0.5,0", "--dataset", "toy", "--limit", "40", "--dtype", "float32", "--enforce-eager",
           "--max-tokens", "24", "--instruction", "", "--batch-size", "2", "--resident", "cpu", "-o", str(out)]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen: dict[int, int] = {}
    done = lambda a: (out / f"alpha-{a}" / "toy" / "run.json").is_file() and \
        "finished" in json.loads((out / f"alpha-{a}" / "toy" / "run.json").read_text())  # noqa: E731
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not (done(1) and (out / "alpha-0.5" / "toy" / "samples.jsonl").is_file()):
            seen.update(descendants(p.pid))
            assert p.poll() is None, p.stderr.read()
            time.sleep(0.2)
        seen.update(descendants(p.pid))
        p.send_signal(signal.SIGKILL)
        p.wait()
        first = (out / "alpha-1" / "toy" / "run.json").read_text()
        samples = (out / "alpha-1" / "toy" / "samples.jsonl").read_bytes()
        assert json.loads(first)["load"]["path"] == "resident" and json.loads(first)["load"]["captured"]
        deadline = time.monotonic() + 30
        while any(_alive(pid, s) for pid, s in seen.items()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [pid for pid, s in seen.items() if _alive(pid, s)], "orphaned engine processes"
    finally:
        for pid, s in seen.items():  # only processes this test started
            if _alive(pid, s):
                os.kill(pid, signal.SIGKILL)
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    now = json.loads((out / "alpha-1" / "toy" / "run.json").read_text())  # finished: re-summarised only
    assert (now["record"], now["load"]) == (json.loads(first)["record"], json.loads(first)["load"])
    assert (out / "alpha-1" / "toy" / "samples.jsonl").read_bytes() == samples
    loads = [json.loads((out / f"alpha-{a}" / "toy" / "run.json").read_text())["load"] for a in ("0.5", "0")]
    assert [x["path"] for x in loads] == ["resident", "resident"]
    assert loads[0]["captured"] and not loads[1]["captured"] and loads[1]["bytes_read"] < 1024
    assert all(len((out / f"alpha-{a}" / "toy" / "samples.jsonl").read_text().splitlines()) == 40
               for a in ("1", "0.5", "0"))


def _alive(pid: int, start: int) -> bool:
    from tvtool.engine.reaper import _stat

    st = _stat(pid)
    return st is not None and st[1] == start and st[2] != "Z"
