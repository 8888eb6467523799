"""`tvtool sweep RECIPE --plan`: per stage its commands, disk, memory and status, by the records a run checks;
nothing run, written or downloaded, no engine; shapes from config.json alone where the weights are absent."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

import tvtool
from helpers import assert_one_line_error, cli, hub_cache_config
from tvtool.engine import engine as engine_module
from tvtool.sweep.planning import SweepPlanOptions, plan_model
from tvtool.sweep.run import SweepOptions, plan, prepare
from tvtool.valve.plan import Arch, plan_training
from tvtool.valve.options import TrainOptions

TOY = Path(tvtool.__file__).parent / "assets" / "toy"
CONFIGS = Path(__file__).resolve().parents[1] / "fixtures" / "configs"


def _recipe(tmp_path: Path, **extra) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "t", "base": str(TOY / "base"), "reasoner": str(TOY / "reasoner"), "alphas": [0.0, 0.5],
        "apply": "materialize", "keep": {"delta": True}, "datasets": [{"name": "toy", "limit": 4}],
        "prompt": {"instruction": ""}, "sampling": {"max_tokens": 8},
        "engine": {"dtype": "float32", "max_model_len": 256, "cpu_kv_cache_gb": 1},
        "output": str(tmp_path / "out"), **extra}))
    return path


def _tree(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def _numel_bytes(folder: Path, item: int) -> int:
    """Σ numel × `item` over the safetensors tensors of `folder` (read with the safetensors library)."""
    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            total += sum(math.prod(h.get_slice(n).get_shape()) for n in h.keys())
    return total * item


@pytest.fixture
def no_engine(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("--plan started an engine")
    monkeypatch.setattr(engine_module.Engine, "__init__", refuse)


def test_plan_prints_each_stage_command_disk_memory_and_status(tmp_path, no_engine):
    r = _recipe(tmp_path)
    res = cli("sweep", r, "--plan")
    assert res.exit_code == 0, res.output
    out = res.output
    blocks = out.split("\n\n")
    assert [b.splitlines()[0] for b in blocks[1:]] == ["[1] delta: to do", "[2] models: to do", "[3] eval: to do"]
    delta, models, ev = blocks[1:]
    base, reasoner = os.path.relpath(TOY / "base"), os.path.relpath(TOY / "reasoner")  # from the working folder
    assert delta.splitlines()[1] == f"  $ tvtool delta {base} {reasoner} -o {tmp_path / 'out'}/delta"
    assert "$ tvtool materialize" in models and "$ tvtool eval" in ev
    assert "memory: Δ = θ2 − θ1: streamed in row chunks" in delta
    assert "engine (float32, CPU), in RAM:" in ev and "KV cache (cpu_kv_cache_gb)" in ev

    d = json.loads(cli("sweep", r, "--plan", "--json").output)
    by = {s["name"]: s for s in d["stages"]}
    # the toy pair is bf16: Δ is written in bf16, one element per parameter of the base
    assert by["delta"]["disk"][0]["bytes"] == _numel_bytes(TOY / "base", 2)
    assert by["models"]["disk"][0]["bytes"] == 2 * _numel_bytes(TOY / "base", 2)  # two α folders
    eng = by["eval"]["memory"][0]["data"]
    assert eng["components"]["weights"] == _numel_bytes(TOY / "base", 4)  # --dtype float32
    assert eng["kv"] == 2**30 and eng["fits"] is True
    assert not (tmp_path / "out").exists()


def test_status_flips_to_finished_after_a_stage_runs_and_back_after_an_edit(tmp_path):
    r = _recipe(tmp_path)
    state, todo = prepare(recipe=r, options=SweepOptions(progress=False))
    for s in todo:
        if s.name in ("delta", "models"):
            s.run(state)  # the sweep's own stage runs (no engine)
    status = {s.name: s.status.text() for s in plan(recipe=r).stages}
    assert status == {"delta": "finished", "models": "finished", "eval": "to do"}
    before = _tree(tmp_path)

    r.write_text(r.read_text().replace("- 0.5\n", "- 0.5\n- 1.0\n"))  # one α more: one more folder
    status = {s.name: s.status.text() for s in plan(recipe=r).stages}
    assert status["delta"] == "finished" and status["models"] == "partly finished: 2 of 3 finished"

    r.write_text(r.read_text().replace("source:\n  allow_missing: false\n", "") + "source: {vocab: intersect}\n")
    status = {s.name: s.status.text() for s in plan(recipe=r).stages}
    assert status["delta"] == "redo: other settings or inputs: vocab error → intersect"
    assert status["models"].startswith("redo: 0 of 3 finished; other settings or inputs: vocab error → intersect")
    assert [x for x in _tree(tmp_path) if x[0] != "recipe.yaml"] == [x for x in before if x[0] != "recipe.yaml"]


def test_plan_writes_nothing_and_starts_no_engine(tmp_path, no_engine):
    r = _recipe(tmp_path, low_rank={"rank": 4}, apply="lora", keep={"delta": False})
    before = _tree(tmp_path)
    res = cli("sweep", r, "--plan")
    assert res.exit_code == 0, res.output
    assert "[2] low_rank: to do" in res.output and "LoRA slots (1 × rank 8)" in res.output  # vLLM's rank 8
    assert _tree(tmp_path) == before


def test_a_bad_recipe_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "t", "base": str(TOY / "base"), "reasoner": str(TOY / "reasoner"),
                                   "alphas": [0.5], "datasets": [{"name": "toy"}], "apply": "sideways"}))
    assert_one_line_error(cli("sweep", bad, "--plan"),
                          f"field apply must be one of swap, materialize, lora, got 'sideways' ({bad})")


def test_shapes_from_config_json_equal_the_checkpoint_headers(tmp_path):
    """A model planned from its config.json alone has the names, shapes and bytes of its real checkpoint."""
    real = plan_model(str(TOY / "base"))
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(TOY / "base" / "config.json", folder / "config.json")
    derived = plan_model(str(folder))
    assert derived.from_config and not real.from_config
    assert {n: tuple(real.checkpoint.info(n).shape) for n in real.checkpoint.names()} == \
        {n: tuple(derived.checkpoint.info(n).shape) for n in derived.checkpoint.names()}


def _hub_cache(repos: dict[str, Path]) -> None:
    """config.json alone per Hub id, in the real HF cache layout (conftest's throwaway HF_HOME)."""
    for repo, cfg in repos.items():
        hub_cache_config(repo, cfg.read_bytes())


def test_a_gpu_recipe_plans_from_config_json_in_the_hf_cache(tmp_path, monkeypatch, no_engine):
    """The Llama recipe with config.json alone for both Hub ids: the training plan is `train --plan`'s, the
    engine holds the bf16 weights per GPU, and a Hub id that is not cached is that stage's status."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    llama = CONFIGS / "llama-3.1-8b.json"
    _hub_cache({"meta-llama/Llama-3.1-8B": llama, "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": llama})
    recipe = Path(tvtool.__file__).parents[1] / "recipes" / "r1-distill-llama-8b.yaml"
    out = tmp_path / "run"
    p = plan(recipe=recipe, options=SweepOptions(output=str(out)),
             plan_options=SweepPlanOptions(gpus=8, gpu_memory="24GB"))
    by = {s.name: s for s in p.stages}
    assert all("config.json only" in w for w in p.inputs.values())
    arch = Arch.from_config(json.loads(llama.read_text()), where="llama")
    assert by["delta"].disk[0].bytes == arch.params() * 2  # Δ in bf16
    spec = yaml.safe_load(recipe.read_text())["train"][0]
    want = plan_training(model=json.loads(llama.read_text()), mode="valve++", gpus=8, gpu_memory="24GB",
                         options=TrainOptions(**spec["options"]))
    assert by["train"].memory[0].peak == want.peak and by["train"].memory[0].fits is want.fits
    eng = by["eval"].memory[0].data
    assert eng["components"]["weights"] == arch.params() * 2 and eng["device"] == "GPU"
    assert not out.exists()

    (Path(constants.HF_HUB_CACHE) / "models--meta-llama--Llama-3.1-8B").rename(tmp_path / "gone")
    p = plan(recipe=recipe, options=SweepOptions(output=str(out)))
    assert {s.status.state for s in p.stages if s.name in ("delta", "low_rank", "eval")} == {"cannot plan"}
    assert "not in the local Hugging Face cache, and --plan downloads nothing" in p.stages[0].status.detail


def test_the_resident_swap_copies_are_planned_from_the_engine_options(tmp_path):
    """apply: swap keeps θ1 and θ2 as stored per worker (bf16 toy pair: 4 bytes per parameter) where
    `--resident` allows; off plans none; gpu on a CPU engine is refused as the engine refuses it."""
    per_param = _numel_bytes(TOY / "base", 4)  # θ1 (bf16) + θ2 (bf16)
    engine = {"dtype": "float32", "max_model_len": 256, "cpu_kv_cache_gb": 1}

    def eval_memory(resident: str) -> dict:
        r = _recipe(tmp_path, apply="swap", keep={}, engine={**engine, "resident": resident})
        return {s.name: s for s in plan(recipe=r).stages}["eval"].memory[0].data

    cpu = eval_memory("cpu")
    assert cpu["resident"]["need"] == per_param and cpu["resident"]["placement"] == "cpu"
    assert cpu["components"]["resident θ1 and Δ"] == per_param and cpu["fits"] is True
    assert eval_memory("off")["resident"] is None
    gpu = eval_memory("gpu")
    assert gpu["fits"] is False and gpu["resident"]["message"] == \
        "--resident gpu needs a GPU engine; this engine runs on the CPU"
