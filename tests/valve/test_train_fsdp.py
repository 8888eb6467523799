"""`train --fsdp` on CPU over gloo: two launched processes (torchrun, accelerate launch with the shipped config)
train what one process trains, each holding half of the base; a SIGKILLed sharded run resumes, in another
process count, to the same adapters."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from valve_data import mixchain_rows, write_jsonl

from tvtool import toy
from tvtool.engine.prompting import PromptOptions
from tvtool.valve.options import TrainOptions
from tvtool.valve.train import train

pytest.importorskip("peft")
TOY = toy.REASONER_DIR  # Llama-shaped, 4 decoder layers, loaded in fp32
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
       "TOKENIZERS_PARALLELISM": "false"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _accelerate() -> list[str]:
    """accelerate launch with the shipped 2-process config (its MULTI_GPU launcher runs CPU processes over gloo
    on a machine without CUDA), on a free port: other test runs may share the machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "recipes" / "accelerate" / "2-gpus.yaml"), "--main_process_port", str(port)]
LAUNCHED = Path(__file__).with_name("launched_run.py")  # tvtool train, instrumented (see there)
FAST = dict(rank=8, lora_alpha=16, lr=2e-3, batch_size=8, epochs=2, threads=1, progress=False)


def _args(mode: str, data: Path, **kw) -> list[str]:
    o = TrainOptions(**{**FAST, **kw})
    return ["train", mode, "--model", str(TOY), "--data", str(data), "--instruction", "", *o.to_cli_args()]


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def _same_adapter(a: Path, b: Path) -> None:
    """fp32, the same steps in another summation order (shards, processes): 1e-5 on LoRA weights of ~0.1."""
    x, y = _adapter(a), _adapter(b)
    assert x.keys() == y.keys() and len(x) == 56  # 7 projections × 4 layers × (A, B)
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_two_sharded_processes_train_what_one_process_trains(tmp_path):
    """torchrun, 2 processes, --fsdp with checkpointing and length groups, valve++ with β mixed in each micro-batch
    (β = 0 kept), against one plain process: per-step losses within rel 1e-5, adapters within 1e-5; each process
    holds half of the base's parameter bytes; the only tensors ever gathered whole are LoRA-shaped."""
    data = write_jsonl(tmp_path / "mc.jsonl", mixchain_rows(8))
    opts = dict(grad_accum=2, skip_zero_beta=False)
    one = train(mode="valve++", model=TOY, data=data, output=tmp_path / "one", prompt=PromptOptions(instruction=""),
                options=TrainOptions(**FAST, **opts))
    two = subprocess.run([*TORCHRUN, str(LAUNCHED), *_args("valve++", data, **opts, fsdp=True, grad_checkpointing=True,
                                                            group_by_length=True), "-o", str(tmp_path / "two")],
                         env={**ENV, "TVTOOL_TEST_GATHERS": str(tmp_path / "gathers")}, capture_output=True, text=True,
                         timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    rec = json.loads((tmp_path / "two" / "train.json").read_text())
    ex, ref = rec["execution"], one.record["execution"]
    assert ex["processes"] == 2 and ex["fsdp"] and ex["grad_checkpointing"] and ref["processes"] == 1
    assert ex["dtypes"] == {"base": ["float32"], "lora": ["float32"]}
    assert [x["loss"] for x in rec["losses"]] == pytest.approx([x["loss"] for x in one.losses], rel=1e-5)
    _same_adapter(one.folder, tmp_path / "two")
    lora = {(tuple(v.shape), "torch.float32") for v in _adapter(one.folder).values()}
    for rank in (0, 1):  # checkpoints and the adapter gathered LoRA weights and their AdamW moments, nothing else
        gathered = {(tuple(s), d) for s, d in json.loads((tmp_path / f"gathers.{rank}.json").read_text())}
        assert gathered == lora, gathered - lora
    whole, halves = ref["base_bytes"][0], ex["base_bytes"]
    assert whole == 4_505_088 and all(abs(h - whole / 2) <= 0.001 * whole for h in halves), halves  # fp32 toy base
    rss = [round(b / 2**20) for b in ex["peak_rss_bytes"]]
    print(f"base bytes: 1 process {whole}, 2 sharded processes {halves}; peak RSS: 1 process "
          f"{ref['peak_rss_bytes'][0] / 2**20:.0f} MiB (the pytest process), 2 processes {rss} MiB")


@pytest.mark.slow
def test_a_killed_sharded_run_resumes_in_another_process_count_to_the_same_adapters(tmp_path):
    """progressive (its stages) under `accelerate launch` with recipes/accelerate/2-gpus.yaml and --fsdp: the main
    process SIGKILLs itself after its 4th checkpoint (1 step into the 2nd stage); the partial folder then resumes in one
    process (no --fsdp) and ends with the adapters, every stage's and the final one, of an uninterrupted run."""
    data = write_jsonl(tmp_path / "mc.jsonl", mixchain_rows(8, holes=False))  # 5 stages × 2 epochs × 1 step
    opts = dict(save_steps=1)
    ref = train(mode="progressive", model=TOY, data=data, output=tmp_path / "ref", prompt=PromptOptions(instruction=""),
                options=TrainOptions(**FAST, **opts))
    out = tmp_path / "run"
    killed = subprocess.run([*_accelerate(), str(LAUNCHED),
                             *_args("progressive", data, **opts, fsdp=True), "-o", str(out)],
                            env={**ENV, "TVTOOL_TEST_KILL_AFTER": "4"}, capture_output=True, text=True, timeout=900,
                            start_new_session=True)
    assert killed.returncode != 0, killed.stderr[-3000:]
    partial = Path(str(out) + ".partial")
    assert not out.exists() and (partial / "checkpoint.pt").is_file()
    ck = torch.load(partial / "checkpoint.pt", weights_only=True)
    assert (ck["stage"], ck["step"], len(ck["losses"])) == (1, 1, 3)  # stage 1 done, 1 step of stage 2
    assert (partial / "stages" / "1-solution_4" / "adapter_model.safetensors").is_file()
    res = train(mode="progressive", model=TOY, data=data, output=out, prompt=PromptOptions(instruction=""),
                options=TrainOptions(**FAST, **opts))
    assert res.record["processes"] == 1 and len(res.losses) == len(ref.losses) == 10
    assert [x["loss"] for x in res.losses] == pytest.approx([x["loss"] for x in ref.losses], rel=1e-5)
    for a, b in zip(ref.stages, res.stages):
        _same_adapter(a, b)
    _same_adapter(ref.folder, res.folder)
