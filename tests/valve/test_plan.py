"""`tvtool train --plan`: the memory plan from config.json alone — its counts against transformers and PEFT, the
paper's two training setups (appendix A.2), Hub ids through the HF cache, the refusal of a run that cannot fit,
and bad input. (Plan against measured memory: tests/valve/test_train_memory.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import assert_one_line_error, cli, hub_cache_config
from valve_data import mixchain_rows, write_jsonl

from tvtool import toy
from tvtool.valve.options import TrainOptions
from tvtool.valve.plan import GiB, Arch, parse_memory, plan_training, targets_of

pytest.importorskip("peft")
CONFIGS = Path(__file__).resolve().parents[1] / "fixtures" / "configs"  # public config.json values, no weights
QWQ, LLAMA = CONFIGS / "qwq-32b-preview.json", CONFIGS / "llama-3.1-8b.json"
TOY = toy.REASONER_DIR


def _folder(tmp_path: Path, cfg: Path) -> Path:
    """A model folder holding only config.json (no weights, no tokenizer)."""
    d = tmp_path / cfg.stem
    d.mkdir()
    shutil.copy(cfg, d / "config.json")
    return d


# --- counts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg, rank, targets", [(QWQ, 2, "all-linear"), (LLAMA, 32, "all-linear"),
                                                (LLAMA, 8, "q_proj,v_proj")])
def test_parameter_counts_are_those_of_transformers_and_peft(cfg, rank, targets):
    """The base and LoRA parameter counts equal those of the real modules (built on the meta device, no memory),
    and the base matches the published checkpoints (safetensors index total_size / 2 bytes)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    d = json.loads(cfg.read_text())
    with torch.device("meta"):
        net = get_peft_model(AutoModelForCausalLM.from_config(AutoConfig.for_model(**d)),
                             LoraConfig(r=rank, target_modules=targets if targets == "all-linear"
                                        else targets.split(",")))
    arch = Arch.from_config(d, where=str(cfg))
    assert arch.params() == sum(p.numel() for p in net.parameters() if not p.requires_grad)
    assert arch.lora_params(rank=rank, targets=targets_of(targets)) == \
        sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert arch.params() == {QWQ: 65_527_752_704 // 2, LLAMA: 16_060_522_496 // 2}[cfg]


def test_tiny_qwen2_with_biases_and_a_tied_llama_count_as_transformers_does():
    from transformers import AutoModelForCausalLM

    import tiny

    for arch in ("qwen2", "tied"):
        cfg = tiny.config(arch)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        assert Arch.from_config(cfg.to_dict(), where=arch).params() == sum(p.numel() for p in model.parameters())


def test_memory_sizes_parse_in_both_units():
    assert parse_memory("80GiB") == 80 * GiB and parse_memory("24GB") == 24 * 10**9
    assert parse_memory("81559MiB") == 81559 * 2**20 and parse_memory(1000) == 1000


# --- the paper's setups (A.2) ------------------------------------------------------------------


def test_qwq_32b_preview_r2_on_two_h100_80g_needs_the_sharded_base():
    """A.2: QwQ-32B-Preview, LoRA r 2, batch 64, on 2×H100-80G; GSM8K chains up to 4192 tokens plus the prompt
    (--max-seq-len 4608). Replicated (DDP), the bf16 base alone is 61 GiB of the 74.5 GiB: even with
    checkpointing and micro-batch 1 it does not fit. Sharded with checkpointing at micro-batch 1 it does."""
    qwq = dict(preset="qwq", precision="bf16", max_seq_len=4608)
    d = json.loads(QWQ.read_text())
    plain = plan_training(model=d, mode="valve++", options=TrainOptions(**qwq), gpus=2, gpu_memory="80GB")
    assert plain.fits is False and plain.micro_batch == 32 and plain.fix.changes["fsdp"] \
        and plain.fix.changes["grad_checkpointing"]
    ddp = plan_training(model=d, mode="valve++", options=TrainOptions(**qwq, grad_checkpointing=True, grad_accum=32),
                        gpus=2, gpu_memory="80GB")
    assert ddp.fits is False and ddp.micro_batch == 1 and ddp.fix.changes == {"fsdp": True}
    assert ddp.components["base weights"] == 32_763_876_352 * 2
    p = plan_training(model=d, mode="valve++", gpus=2, gpu_memory="80GB",
                      options=TrainOptions(**qwq, fsdp=True, grad_checkpointing=True, grad_accum=32))
    assert p.fits and p.fix is None and p.micro_batch == 1 and p.lora_params == 16_777_216
    assert p.components["base weights (1/2 shard)"] == 32_763_876_352  # bytes: half of 2 bytes per parameter
    assert p.components["AdamW state (fp32)"] == 2 * 4 * 16_777_216 // 2
    assert 40 * GiB < p.peak < 60 * GiB < p.device_memory
    assert p.activations["full"] > 15 * p.activations["checkpointed"]


def test_llama_31_8b_r32_on_eight_a5000_24g_shards_and_checkpoints():
    """A.2: Llama-3.1-8B, r 32, batch 64, on 8×A5000-24G; chains up to 2048 tokens (--max-seq-len 2304). DDP with
    checkpointing at micro-batch 1 misses by a little (16 GB of weights per process); sharding without
    checkpointing too; both fit with room. The R1-Distill-Llama-8B recipe (same shapes, 8K chains) fits too."""
    d = json.loads(LLAMA.read_text())
    llama = dict(preset="llama", precision="bf16", max_seq_len=2304, grad_accum=8)

    def plan(**kw):
        return plan_training(model=d, mode="valve++", gpus=8, gpu_memory="24GB",
                             options=TrainOptions(**{**llama, **kw}))

    assert plan(grad_checkpointing=True).fits is False and plan(grad_checkpointing=True).fix.changes == {"fsdp": True}
    assert plan(fsdp=True).fits is False and plan(fsdp=True).fix.changes == {"grad_checkpointing": True}
    p = plan(fsdp=True, grad_checkpointing=True)
    assert p.fits and p.micro_batch == 1 and p.lora_params == 83_886_080 and p.peak < 12 * GiB
    assert p.components["base weights (1/8 shard)"] == 8_030_261_248 * 2 // 8
    long = plan(fsdp=True, grad_checkpointing=True, max_seq_len=8704)  # recipes/r1-distill-llama-8b.yaml
    assert long.fits and long.components["logits (fp32 log-softmax + grads)"] == 12 * 8704 * 128256


def test_a_plan_that_does_not_fit_names_the_smallest_change_that_does():
    d = json.loads(LLAMA.read_text())
    whole = plan_training(model=d, mode="valve", gpus=8, gpu_memory="24GB",
                          options=TrainOptions(preset="llama", precision="bf16"))  # 131072-token context
    assert whole.seq_len == 131072 and whole.seq_len_from == "max_position_embeddings" and not whole.fits
    ch = whole.fix.changes
    assert ch["fsdp"] and ch["grad_checkpointing"] and ch["micro_batch"] == 1 and 4096 < ch["max_seq_len"] < 131072
    edge = plan_training(model=d, mode="valve", gpus=8, gpu_memory="24GB", options=TrainOptions(
        preset="llama", precision="bf16", fsdp=True, grad_checkpointing=True, grad_accum=8,
        max_seq_len=ch["max_seq_len"] + 64))
    assert not edge.fits  # the longest length that fits, to 64 tokens
    one = plan_training(model=d, mode="valve", gpus=1, gpu_memory="16GB",  # < the 16.06 GB of weights: shard
                        options=TrainOptions(preset="llama", precision="bf16", max_seq_len=2048))
    assert one.fix.changes == {"fsdp": True, "grad_checkpointing": True, "gpus": 3, "grad_accum": 22, "micro_batch": 1}
    assert one.lines()[-1].endswith("smallest change that fits: --fsdp --grad-checkpointing --grad-accum 22 "
                                    f"(micro-batch 1) on 3 processes → {one.fix.peak / GiB:.2f} GiB")
    two = plan_training(model=d, mode="valve", gpus=2, gpu_memory="16GB", options=TrainOptions(
        preset="llama", precision="bf16", max_seq_len=2048, fsdp=True, grad_checkpointing=True, grad_accum=32))
    assert not two.fits


# --- the command ---------------------------------------------------------------------------------


def test_plan_command_prints_the_plan_and_its_json(tmp_path):
    folder = _folder(tmp_path, QWQ)  # config.json only: no weights, no tokenizer
    args = ["train", "valve++", "--model", folder, "--preset", "qwq", "--precision", "bf16", "--max-seq-len", "4608",
            "--gpus", "2", "--gpu-memory", "80GB", "--plan"]
    r = cli(*args)
    assert r.exit_code == 1, r.output  # does not fit
    lines = r.output.splitlines()
    assert lines[0] == (f"memory plan: valve++ on {folder}, 2 processes, bf16, micro-batch 32 × 4608 tokens "
                        "(--max-seq-len), no activation checkpointing")
    assert lines[-1].startswith("  does not fit: ") and "--fsdp --grad-checkpointing" in lines[-1]
    ok = cli(*args, "--fsdp", "--grad-checkpointing", "--grad-accum", "32", "--json")
    assert ok.exit_code == 0, ok.output
    d = json.loads(ok.output)
    assert d["fits"] is True and d["processes"] == 2 and d["micro_batch"] == 1 and d["seq_len"] == 4608
    assert d["peak"] == sum(d["components"].values()) and d["device_memory"] == 80 * 10**9
    same = cli(*[QWQ if a == folder else a for a in args], "--fsdp", "--grad-checkpointing", "--grad-accum", "32",
               "--json")  # the config file itself
    assert {**json.loads(same.output), "model": str(folder)} == d
    assert not list(tmp_path.glob("*.partial"))  # trains nothing


def test_plan_of_a_hub_id_reads_config_json_from_the_hf_cache(tmp_path, monkeypatch):
    """The real cache layout: snapshots/<sha>/config.json is a symlink into ../../blobs; no network."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_cache_config("Qwen/QwQ-32B-Preview", QWQ.read_bytes())
    p = plan_training(model="Qwen/QwQ-32B-Preview", mode="valve", gpus=2, gpu_memory="80GB",
                      options=TrainOptions(preset="qwq", precision="bf16", max_seq_len=4608, fsdp=True))
    assert p.model == "Qwen/QwQ-32B-Preview" and p.params == 32_763_876_352
    assert_one_line_error(cli("train", "valve", "--model", "nobody/absent-model", "--plan"),
                          "config.json is not in the Hugging Face cache and could not be fetched "
                          "(LocalEntryNotFoundError) (nobody/absent-model). Download it on a machine with a network, or pass a folder holding "
                          "config.json")


def test_plan_with_data_plans_for_the_longest_sample(tmp_path):
    data = write_jsonl(tmp_path / "mc.jsonl", mixchain_rows(6))
    r = cli("train", "progressive", "--model", TOY, "--data", data, "--instruction", "", "--plan", "--json")
    assert r.exit_code == 0, r.output
    tok = toy.build_tokenizer()
    longest = 0
    for row in mixchain_rows(6):
        prompt = tok.apply_chat_template([{"role": "user", "content": row["question"]}], tokenize=False,
                                         add_generation_prompt=True)
        p = len(tok(prompt, add_special_tokens=False)["input_ids"])
        for k in range(5):
            if row[f"solution_{k}"]:
                longest = max(longest, p + len(tok(row[f"solution_{k}"], add_special_tokens=False)["input_ids"]) + 1)
    d = json.loads(r.output)
    assert d["seq_len"] == longest and d["seq_len_from"] == "the longest sample"


# --- bad input ------------------------------------------------------------------------------------


def test_bad_input_gets_one_clear_line(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(cli("train", "valve", "--model", empty, "--plan"),
                          f"no config.json ({empty}). The memory plan needs the model's config.json (the weights are "
                          "not needed)")
    gemma = tmp_path / "gemma"
    gemma.mkdir()
    (gemma / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    assert_one_line_error(cli("train", "valve", "--model", gemma, "--plan"),
                          f"no memory plan for model type 'gemma3' ({gemma}). The plan knows llama, mistral, qwen2 "
                          "decoders; pass --no-check-memory to train without one")
    assert_one_line_error(cli("train", "valve", "--model", TOY, "--plan", "--fsdp"),
                          "--fsdp in a single process shards nothing (--fsdp). Launch several processes (torchrun "
                          "--nproc_per_node N -m tvtool train …, or --gpus N for a plan), or drop --fsdp")
    assert_one_line_error(cli("train", "valve", "--model", TOY, "--plan", "--gpu-memory", "lots"),
                          "bad memory size 'lots' (--gpu-memory). Use e.g. 80GiB, 24GB or 81559MiB")
    data = write_jsonl(tmp_path / "mc.jsonl", mixchain_rows(3))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    run = ["train", "valve++", "--model", TOY, "--data", data, "-o", tmp_path / "out", "--no-progress"]
    assert_one_line_error(cli(*run, "--fsdp"),
                          "--fsdp in a single process shards nothing (--fsdp). Launch several processes (torchrun "
                          "--nproc_per_node N -m tvtool train …), or drop --fsdp")

    import tvtool.valve.train_loop as tl

    def never(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(tl, "build_peft_model", never)
    r = cli(*run, "--gpu-memory", "800MiB")  # 11 samples (3 with β = 0 skipped) of at most 114 tokens
    err = r.stderr.strip()
    assert r.exit_code == 2 and err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("tvtool: error: the memory plan needs ") and "more than the 800.0 MiB available " \
        "(1 process, micro-batch 11 × 114 tokens, base 4.3 MiB). Use --grad-checkpointing (" in err, err
    assert err.endswith("see `tvtool train valve++ --model … --plan`, or pass --no-check-memory"), err
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out").exists()
    assert cli("train", "valve++", "--model", TOY, "-o", tmp_path / "x").exit_code == 2  # --data needed to train


# --- the shipped launch lines (recipes/launch) ------------------------------------------------------


def _launch_lines(script: Path) -> list[list[str]]:
    """The `tvtool train …` arguments of each torchrun line of a launch script, its variables filled in."""
    import re
    import shlex

    text = script.read_text().replace("\\\n", " ")
    env = {k: v for k, v in re.findall(r"^(\w+)=(?:\$\{\w+:-)?([^}\n]*)\}?$", text, re.M)}
    lines = []
    for line in text.splitlines():
        if line.startswith("torchrun "):
            for k in ("OPTS", "PROMPT"):
                line = line.replace(f'"${{{k}[@]}}"', env.get(k, "()")[1:-1])
            for k in ("MODEL", "OUT"):
                line = line.replace(f"${k}", env[k])
            words = shlex.split(line)
            lines.append(words[words.index("tvtool") + 1:])
    return lines


@pytest.mark.parametrize("script, recipe, gpus, memory, config", [
    ("qwq-32b-preview.sh", "qwq-32b-preview.yaml", 2, "80GB", QWQ),
    ("r1-distill-llama-8b.sh", "r1-distill-llama-8b.yaml", 8, "24GB", LLAMA)])
def test_launch_lines_fit_their_gpus_and_train_what_the_recipe_records(tmp_path, script, recipe, gpus, memory, config):
    """Each torchrun line of recipes/launch/: its plan fits the paper's GPUs, it shards (--fsdp), and its options
    and prompt are the recipe's `train:` entry's but for how it executes (so the sweep finds the adapter finished)."""
    from dataclasses import asdict

    from tvtool.cli.valve import train_cmd
    from tvtool.engine.prompting import PromptOptions
    from tvtool.options import from_cli
    from tvtool.sweep.recipe import load_recipe
    from tvtool.valve.options import EXECUTION, resolve

    root = Path(__file__).resolve().parents[2] / "recipes"
    r = load_recipe(root / recipe)
    lines = _launch_lines(root / "launch" / script)
    assert [w[1] for w in lines] == [t.mode for t in r.train]
    folder = _folder(tmp_path, config)
    for words, entry in zip(lines, r.train):
        assert words[words.index("--model") + 1] == {"reasoner": r.reasoner, "base": r.base}[entry.model]
        assert words[words.index("-o") + 1].endswith(f"/train/{entry.name}") and "--fsdp" in words
        kw = train_cmd.make_context("train", list(words[1:])).params
        opts, prompt = from_cli(TrainOptions, kw), from_cli(PromptOptions, kw)
        mine = {k: v for k, v in asdict(resolve(opts, mode=entry.mode)).items() if k not in EXECUTION}
        theirs = {k: v for k, v in asdict(resolve(entry.options, mode=entry.mode)).items() if k not in EXECUTION}
        assert mine == theirs and prompt == r.prompt
        p = plan_training(model=folder, mode=entry.mode, options=opts, gpus=gpus, gpu_memory=memory)
        assert p.fits and p.fsdp and p.grad_checkpointing and p.micro_batch == 1, "\n".join(p.lines())
