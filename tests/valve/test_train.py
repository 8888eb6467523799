"""`tvtool train`: per-sample β (eq. 3), progressive order, presets, resume, bad input, 2-process DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_one_line_error, cli
from valve_data import mixchain_rows, write_jsonl

from tvtool import toy
from tvtool.errors import OptionsError
from tvtool.valve.train import train
from tvtool.valve.options import PRESETS, TrainOptions, resolve
from tvtool.valve.train_data import Encoded, collate, load_train_data, stages_for

pytest.importorskip("peft")
TOY = toy.REASONER_DIR
ROOT = Path(__file__).resolve().parents[2]
FAST = dict(rank=8, lora_alpha=16, lr=2e-3, batch_size=4, threads=1, progress=False)


def _opts(**kw) -> TrainOptions:
    return TrainOptions(**{**FAST, **kw})


# --- β scaling --------------------------------------------------------------------------------


def _randomized_lora(seed: int = 0):
    from tvtool.valve.train_loop import build_peft_model

    net = build_peft_model(str(TOY), rank=8, lora_alpha=16, target_modules="all-linear", dropout=0.0,
                           rslora=False, seed=0, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net.eval()


def test_a_mixed_beta_batch_gives_each_sample_its_own_scale():
    """Per-sample losses of one batch with β = (0, 0.3, 1, 0.7, 2) equal each sample run alone with
    PEFT's own branch scale set to its β (and β = 0 equals the model with the adapter disabled)."""
    from peft.tuners.lora import LoraLayer

    from tvtool.valve.train_loop import BetaScale, forward_nll

    net = _randomized_lora()
    tok = toy.build_tokenizer()
    rows = mixchain_rows(5, holes=False)
    betas = [0.0, 0.3, 1.0, 0.7, 2.0]
    enc = []
    for r, b, k in zip(rows, betas, (0, 4, 1, 3, 2)):  # different lengths in one batch
        p = tok.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                    add_generation_prompt=True)
        pi = tok(p, add_special_tokens=False)["input_ids"]
        ti = tok(r[f"solution_{k}"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        enc.append(Encoded(tuple(pi + ti), len(pi), b))
    hooks = BetaScale(net)
    with torch.no_grad():
        s, n = forward_nll(net, collate(enc, pad_id=tok.pad_token_id), hooks)
    mixed = s / n
    layers = [m for m in net.modules() if isinstance(m, LoraLayer)]
    hooks.remove()
    for i, (e, b) in enumerate(zip(enc, betas)):
        alone = collate([e], pad_id=tok.pad_token_id)
        with torch.no_grad():
            for m in layers:
                m.scale_layer(b) if b != 0 else None
            if b == 0:
                with net.disable_adapter():
                    s1, n1 = forward_nll(net, alone, None)
            else:
                s1, n1 = forward_nll(net, alone, None)
            for m in layers:
                m.unscale_layer()
        torch.testing.assert_close(mixed[i], (s1 / n1)[0], rtol=1e-5, atol=1e-6)
    assert len({round(float(x), 3) for x in mixed}) == 5


def test_beta_hooks_refuse_dora():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tvtool.valve.train_loop import BetaScale

    net = get_peft_model(AutoModelForCausalLM.from_pretrained(str(TOY)),
                         LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(OptionsError) as e:
        BetaScale(net)
    assert str(e.value) == ("per-sample β needs plain LoRA on linear layers; base_model.model.model.layers.0.self_attn"
                            ".q_proj is DoRA (valve++). Train plain LoRA (no DoRA) on linear layers")


# --- data, stages, presets --------------------------------------------------------------------


def test_progressive_stages_go_from_the_longest_column_to_solution_0(tmp_path):
    data = load_train_data(write_jsonl(tmp_path / "mc.jsonl", mixchain_rows(9)))
    assert data.layout == "mixchain" and data.columns == [f"solution_{k}" for k in range(5)]
    stages = stages_for(mode="progressive", data=data, tokenizer=toy.build_tokenizer())
    assert [n for n, _ in stages] == ["solution_4", "solution_3", "solution_2", "solution_1", "solution_0"]
    assert [len(s) for _, s in stages] == [9, 9, 6, 9, 9]  # the missing solution_2 are skipped
    pp = stages_for(mode="valve++", data=data, tokenizer=toy.build_tokenizer())
    (_, samples), = pp
    assert len(samples) == 42
    by_q = {}
    for s in samples:
        by_q.setdefault(s.question, {})[s.column] = s.beta
    for q, b in by_q.items():  # eq. 4 per question: the shortest (solution_0) 1, the longest (solution_4) 0
        assert b["solution_0"] == 1.0 and b["solution_4"] == 0.0
        assert b["solution_1"] > b["solution_3"]


def test_presets_follow_the_paper_and_explicit_options_win():
    q = resolve(TrainOptions(preset="qwq"), mode="valve++")
    assert (q.rank, q.lora_alpha, q.lr, q.batch_size, q.epochs) == (2, 8.0, 1e-5, 64, 5)
    ll = resolve(TrainOptions(preset="llama", lr=1e-4), mode="valve")
    assert (ll.rank, ll.lora_alpha, ll.scheduler, ll.weight_decay, ll.lr) == (32, 64.0, "cosine", 0.01, 1e-4)
    assert resolve(TrainOptions(), mode="progressive").epochs == 2 and set(PRESETS) == {"qwq", "llama"}


def test_progressive_trains_each_stage_for_its_epochs_and_keeps_every_stage(tmp_path):
    data = write_jsonl(tmp_path / "mc.jsonl", mixchain_rows(6))
    res = train(mode="progressive", model=TOY, data=data, output=tmp_path / "p", prompt=_prompt(),
                options=_opts(epochs=2))
    # 6 questions (4 with solution_2), batch 4: 2 steps per epoch (solution_2: 1), 2 epochs per stage
    assert [x["stage"] for x in res.losses] == [c for c, n in (("solution_4", 4), ("solution_3", 4), ("solution_2", 2),
                                                                ("solution_1", 4), ("solution_0", 4)) for _ in range(n)]
    assert [x["epoch"] for x in res.losses[8:10]] == [1.0, 2.0]
    assert [x["epoch"] for x in res.losses[:4]] == [0.5, 1.0, 1.5, 2.0]
    assert [p.name for p in res.stages] == ["1-solution_4", "2-solution_3", "3-solution_2", "4-solution_1",
                                            "5-solution_0"]
    from safetensors.torch import load_file

    weights = [load_file(p / "adapter_model.safetensors") for p in res.stages]
    final = load_file(res.folder / "adapter_model.safetensors")
    assert all(torch.equal(final[k], weights[-1][k]) for k in final)
    assert not all(torch.equal(weights[0][k], weights[1][k]) for k in final)
    card = (res.folder / "README.md").read_text()
    for want in ("progressive", str(data), "lora_alpha", "| lr | 0.002 |", f"{res.final_loss:.4f}"):
        assert want in card, want
    assert (res.folder / "loss.png").stat().st_size > 1000
    assert not Path(str(res.folder) + ".partial").exists()
    again = train(mode="progressive", model=TOY, data=data, output=tmp_path / "p", prompt=_prompt(),
                  options=_opts(epochs=2))
    assert again.skipped  # finished with the same settings: nothing to do


def _prompt():
    from tvtool.engine.prompting import PromptOptions

    return PromptOptions(instruction="")


# --- resume -----------------------------------------------------------------------------------


class _Killed(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_same_adapter(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import tvtool.valve.train_loop as tl

    data = write_jsonl(tmp_path / "mc.jsonl", mixchain_rows(10))
    kw = dict(mode="valve++", model=TOY, data=data, prompt=_prompt())
    ref = train(output=tmp_path / "ref", options=_opts(epochs=2, save_steps=2), **kw)
    real, calls = tl.forward_nll, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 6:
            raise _Killed
        return real(*a, **k)

    monkeypatch.setattr(tl, "forward_nll", dying)
    with pytest.raises(_Killed):
        train(output=tmp_path / "run", options=_opts(epochs=2, save_steps=2), **kw)
    assert not (tmp_path / "run").exists()  # nothing that looks like a finished adapter
    assert (tmp_path / "run.partial" / "checkpoint.pt").is_file()
    assert not (tmp_path / "run.partial" / "adapter_model.safetensors").exists()
    monkeypatch.setattr(tl, "forward_nll", real)
    res = train(output=tmp_path / "run", options=_opts(epochs=2, save_steps=2), **kw)
    assert [x["loss"] for x in res.losses] == [x["loss"] for x in ref.losses]
    a, b = load_file(ref.folder / "adapter_model.safetensors"), load_file(res.folder / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- bad input ----------------------------------------------------------------------------------


def _train_cli(tmp_path, data, *extra):
    return cli("train", "valve++", "--model", TOY, "--data", data, "-o", tmp_path / "out", "--threads", "1",
               "--no-progress", *extra)


def test_bad_input_gets_one_clear_line(tmp_path):
    pairs = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    assert_one_line_error(_train_cli(tmp_path, pairs),
                          f"the training data has no solution columns (solution_0..K, or solution) ({pairs}). "
                          "Pass a MixChain dataset, or .jsonl rows with question and solution")
    empty = write_jsonl(tmp_path / "empty.jsonl", [{**r, **{f"solution_{k}": None for k in range(5)}}
                                                   for r in mixchain_rows(3)])
    assert_one_line_error(_train_cli(tmp_path, empty),
                          f"the training data has no kept solutions (every solution is empty) ({empty}). "
                          "Rebuild the MixChain with a looser --min-correct, or check its generations")
    good = write_jsonl(tmp_path / "mc.jsonl", mixchain_rows(3))
    assert_one_line_error(_train_cli(tmp_path, good, "--rank", "0"), "LoRA rank must be ≥ 1, got 0 (--rank)")
    assert_one_line_error(_train_cli(tmp_path, good, "--target-modules", "qkv"),
                          "target modules qkv match no linear layer of the model (--target-modules). Use all-linear, "
                          "or module names such as down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj")
    assert not (tmp_path / "out.partial").exists()
    assert_one_line_error(cli("train", "valve", "--model", TOY, "--data", good, "--column", "solution_9",
                              "-o", tmp_path / "out"),
                          f"the training data has no column 'solution_9' ({good}). Pick --column from "
                          "solution_0, solution_1, solution_2, solution_3, solution_4")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert_one_line_error(_train_cli(tmp_path, good),
                          f"the output already exists, with no tvtool record of how it was made "
                          f"({tmp_path / 'out'}). Pass --overwrite to redo it, or choose another output")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


# --- several processes --------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_train_the_same_adapter(tmp_path):
    """`accelerate launch` with 2 CPU processes (DDP, gloo): the same steps as one process."""
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "mc.jsonl", mixchain_rows(8))
    args = ["train", "valve++", "--model", str(TOY), "--data", str(data), "--instruction", "", "--batch-size", "8",
            "--epochs", "2", "--lr", "0.002", "--threads", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    one = subprocess.run([sys.executable, "-m", "tvtool", *args, "-o", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    # accelerate's --cpu launcher starts several processes only through MPI; --multi_gpu is its torchrun
    # launcher, and with no CUDA tvtool's Accelerator runs DDP over gloo (accelerate's MULTI_CPU)
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "-m", "tvtool", *args, "-o", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    rec = json.loads((tmp_path / "two" / "train.json").read_text())
    ref = json.loads((tmp_path / "one" / "train.json").read_text())
    assert rec["steps"] == ref["steps"] == 8 and rec["processes"] == 2 and ref["processes"] == 1
    assert [x["loss"] for x in rec["losses"]] == pytest.approx([x["loss"] for x in ref["losses"]], rel=1e-5)
    a, b = load_file(tmp_path / "one" / "adapter_model.safetensors"), load_file(tmp_path / "two" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert sum(float(a[k].abs().sum()) for k in a if "lora_B" in k) > 0


def test_finished_adapter_is_recognised_by_content_and_redone_when_an_input_changes(tmp_path):
    """The one finished-work rule (tvtool.io.finished): moved data is still finished; edited data or options redo."""
    import shutil

    (tmp_path / "a").mkdir()
    data = write_jsonl(tmp_path / "a" / "mc.jsonl", mixchain_rows(6))
    kw = dict(mode="valve++", model=TOY, prompt=_prompt(), output=tmp_path / "out")
    first = train(data=data, options=_opts(epochs=1), **kw)
    assert not first.skipped
    moved = tmp_path / "b" / "mc.jsonl"
    moved.parent.mkdir()
    shutil.move(data, moved)
    assert train(data=moved, options=_opts(epochs=1), **kw).skipped  # same content, another path
    with pytest.raises(Exception) as e:  # other options without --overwrite: refused, nothing replaced
        train(data=moved, options=_opts(epochs=2), **kw)
    assert "epochs" in str(e.value) and "--overwrite" in str(e.value)
    redone = train(data=moved, options=_opts(epochs=2, overwrite=True), **kw)
    assert not redone.skipped and redone.record["options"]["epochs"] == 2
