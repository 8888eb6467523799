"""Inputs are never destroyed, links never lead out, adapters load as one model, data rows are checked.

Each test gives the exact one-line error and exit code, checks that no input byte changed (sha256 of every
input file before and after) and that the run left no process behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tvtool
from helpers import assert_one_line_error, cli, hold_lock
from tvtool.engine.reaper import descendants

TOY = Path(tvtool.__file__).parent / "assets" / "toy"
ROOT = Path(__file__).resolve().parents[1]
APART = "Write the output somewhere outside every input"


def hashes(*paths: Path) -> dict[str, str]:
    """sha256 of every file under `paths` (a file or a folder), by path."""
    out = {}
    for p in paths:
        for f in sorted([p] if p.is_file() else p.rglob("*")):
            if f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@pytest.fixture
def no_new_processes():
    """Fails the test when a process it started is still alive at its end."""
    before = set(descendants(os.getpid()))
    yield
    deadline = time.monotonic() + 10
    while (left := set(descendants(os.getpid())) - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes left behind: {left}"


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PAIRS = [{"question": "what is 1 + 1", "solution": "2"}, {"question": "what is 2 + 2", "solution": "4"}]


# --- train never writes over its model or data ----------------------------------------------------------

@pytest.fixture
def train_inputs(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(TOY / "base", model)
    data = tmp_path / "data"
    data.mkdir()
    _jsonl(data / "pairs.jsonl", PAIRS)
    return model, data


@pytest.mark.parametrize("where", ["model", "model+overwrite", "inside-model", "data-file", "data-folder",
                                   "resume-folder"])
def test_train_refuses_an_output_over_its_inputs(train_inputs, tmp_path, no_new_processes, where):
    model, data = train_inputs
    jsonl = data / "pairs.jsonl"
    data_arg, out, extra = jsonl, model, []
    expected = f"the output is the input {model} (-o {model}). {APART}"
    if where == "model+overwrite":
        extra = ["--overwrite"]
    elif where == "inside-model":
        out = model / "adapter"
        expected = f"the output is inside the input {model} (-o {out}). {APART}"
    elif where == "data-file":
        out = jsonl
        expected = f"the output is the input {jsonl} (-o {jsonl}). {APART}"
    elif where == "data-folder":
        data_arg = out = data
        expected = f"the output is the input {data} (-o {data}). {APART}"
    elif where == "resume-folder":  # the data sits in what would be the run's resumable <output>.partial/
        out = tmp_path / "adapter"
        data_arg = tmp_path / "adapter.partial" / "pairs.jsonl"
        data_arg.parent.mkdir()
        shutil.copy(jsonl, data_arg)
        expected = (f"the output contains the input {data_arg} (-o (resume folder) {tmp_path / 'adapter.partial'})"
                    f". {APART}")
    before = hashes(model, data, data_arg)
    r = cli("train", "valve", "--model", model, "--data", data_arg, "-o", out, "--no-progress", *extra)
    assert_one_line_error(r, expected)
    assert r.exit_code == 2
    assert hashes(model, data, data_arg) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no lock left over


# --- push: links at every level, the top one included ---------------------------------------------------

def _alpha_folder(path: Path, alpha: float = 0.5) -> Path:
    path.mkdir(parents=True)
    save_file({"a": torch.ones(4, 4)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / "tvtool.json").write_text(json.dumps({"settings": {"alpha": alpha}}))
    return path


def test_push_refuses_an_alpha_folder_that_is_a_link_out_of_the_sweep(hub, tmp_path, monkeypatch, no_new_processes):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    from hub_fixture import ALICE, ENDPOINT

    sweep = tmp_path / "linked-sweep"
    _alpha_folder(sweep / "alpha-0.2", 0.2)
    private = _alpha_folder(tmp_path / "private" / "alpha-0.5")
    (private / "secret.txt").write_text("not for the Hub")
    (sweep / "alpha-0.5").symlink_to(private, target_is_directory=True)
    before, stats = hashes(sweep, private), hub.stats()
    monkeypatch.setenv("HF_TOKEN", ALICE)  # a real push, not a dry run
    r = cli("push", sweep, "--endpoint", ENDPOINT)
    assert_one_line_error(r, f"the folder to push has a link that leads out of it: alpha-0.5 -> {private} "
                             f"({sweep}). Replace the link by the file itself, or remove it")
    assert r.exit_code == 2
    assert hub.stats() == stats  # nothing was sent, not even a whoami
    for name in ("alice/linked-sweep-alpha0.2", "alice/linked-sweep-alpha0.5"):
        with pytest.raises(RepositoryNotFoundError):
            HfApi(endpoint=ENDPOINT, token=ALICE).repo_info(name)
    assert hashes(sweep, private) == before


def test_push_still_follows_a_link_inside_the_sweep_and_the_given_folder_itself(tmp_path):
    from hub_fixture import ENDPOINT

    real = tmp_path / "real-sweep"
    _alpha_folder(real / "alpha-0.2", 0.2)
    _alpha_folder(real / "store" / "half")
    (real / "alpha-0.5").symlink_to(real / "store" / "half", target_is_directory=True)  # inside: allowed
    top = tmp_path / "top-link"
    top.symlink_to(real, target_is_directory=True)  # the folder given is a link: what the user chose
    r = cli("push", top, "--repo", "alice/linkok-{alpha}", "--dry-run", "--endpoint", ENDPOINT)
    assert r.exit_code == 0, r.stderr
    assert [line.split(" -> ")[1].split("@")[0] for line in r.stdout.splitlines() if line.startswith("would")] == \
        ["model alice/linkok-0.2", "model alice/linkok-0.5"]


# --- the output lock follows links ----------------------------------------------------------------------


@pytest.mark.parametrize("held", ["real", "link"])
def test_two_evals_through_a_symlinked_output_cannot_both_run(tmp_path, monkeypatch, no_new_processes, held):
    import tvtool.engine.engine

    monkeypatch.setattr(tvtool.engine.engine, "vllm_module", lambda: pytest.fail("the engine was started"))
    real = tmp_path / "runs" / "ev"
    real.mkdir(parents=True)
    link = tmp_path / "ev-link"
    link.symlink_to(real, target_is_directory=True)
    holder = hold_lock(real if held == "real" else link)
    other = link if held == "real" else real
    try:
        r = cli("eval", "--model", TOY / "base", "--dataset", "toy", "--limit", "2", "-o", other)
        assert_one_line_error(r, f"another tvtool run (pid {holder.pid}) is writing this output ({other}). "
                                 "Wait for it to finish (or stop it), or choose another output")
        assert not (real / "samples.jsonl").exists()
    finally:
        holder.stdin.close()
        holder.wait()
    from tvtool.io.lock import lock_path

    assert lock_path(link) == lock_path(real) == real.parent / ".ev.tvtool-lock"


# --- an adapter config that disagrees with its tensors ----------------------------------------------------

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def _adapter(path: Path, *, rank: int = 8, config: dict | None = None, modules=MODULES) -> Path:
    """A PEFT-layout LoRA adapter on the toy base, written by hand: rank-`rank` factors, `config` over the
    config PEFT's save_pretrained writes for it."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for m in modules:
        sd[f"base_model.model.{m}.lora_A.weight"] = torch.randn(rank, 128, generator=g) * 0.1
        sd[f"base_model.model.{m}.lora_B.weight"] = torch.randn(128, rank, generator=g) * 0.1
    save_file(sd, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    c = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(TOY / "base"), "r": rank,
         "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0, "bias": "none",
         "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
         "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None}
    (path / "adapter_config.json").write_text(json.dumps({**c, **(config or {})}, indent=2))
    return path


Q = MODULES[0]
BAD = [
    ({"r": 4}, f"adapter_config.json gives {Q} rank 4 but its tensors have lora_A [8, 128], lora_B [128, 8] (CFG). "
               "Set r (and rank_pattern) as the adapter was trained, or re-save it with peft's save_pretrained"),
    ({"rank_pattern": {"v_proj": 16}}, f"adapter_config.json gives {MODULES[1]} rank 16 (rank_pattern) but its "
                                       "tensors have lora_A [8, 128], lora_B [128, 8] (CFG). Set r (and rank_pattern) "
                                       "as the adapter was trained, or re-save it with peft's save_pretrained"),
    ({"target_modules": ["q_proj"]}, f"the adapter has tensors for {MODULES[1]}, which adapter_config.json does not "
                                     "adapt (target_modules ['q_proj']) (CFG). Set target_modules as the adapter was "
                                     "trained (PEFT would drop these tensors, vLLM would apply them), or re-save the "
                                     "adapter"),
    ({"layers_to_transform": [0]}, f"the adapter has tensors for {MODULES[1]}, which adapter_config.json does not "
                                   "adapt (target_modules ['q_proj', 'v_proj'], layers_to_transform [0]) (CFG). Set "
                                   "target_modules as the adapter was trained (PEFT would drop these tensors, vLLM "
                                   "would apply them), or re-save the adapter"),
    ({"lora_alpha": None}, "lora_alpha is None, not a positive number: the scale lora_alpha / r is undefined (CFG). "
                           "Set r (a positive integer) and lora_alpha in adapter_config.json as the adapter was "
                           "trained, or re-save it with peft's save_pretrained"),
]


def _paths(adapter: Path, tmp_path: Path) -> dict[str, list]:
    """Every command that loads an adapter, as CLI arguments."""
    return {
        "eval --lora (vLLM)": ["eval", "--model", TOY / "base", "--lora", adapter, "--dataset", "toy", "--limit", "2",
                               "-o", tmp_path / "ev-lora"],
        "eval --delta (task vector)": ["eval", "--base", TOY / "base", "--delta", adapter, "-a", "0.5", "--dataset",
                                       "toy", "--limit", "2", "-o", tmp_path / "ev-delta"],
        "materialize": ["materialize", TOY / "base", "--delta", adapter, "-a", "0.5", "-o", tmp_path / "m",
                        "--no-progress"],
        "svd-rank": ["svd-rank", adapter, "-r", "2", "-o", tmp_path / "f.safetensors", "--no-progress"],
        "mixchain": ["mixchain", TOY / "base", "--delta", adapter, "--dataset", "toy", "--split", "train",
                     "--limit", "2", "-o", tmp_path / "mc", "--no-progress"],
    }


@pytest.mark.parametrize("change, expected", BAD, ids=["r", "rank_pattern", "target_modules", "layers", "lora_alpha"])
def test_an_adapter_config_that_disagrees_with_its_tensors_is_refused_on_every_path(
        tmp_path, monkeypatch, no_new_processes, change, expected):
    import tvtool.engine.engine

    monkeypatch.setattr(tvtool.engine.engine, "vllm_module", lambda: pytest.fail("the engine was started"))
    adapter = _adapter(tmp_path / "adapter", config=change)
    before = hashes(adapter, TOY)
    for name, args in _paths(adapter, tmp_path).items():
        r = cli(*args)
        assert r.exit_code == 2, name
        assert_one_line_error(r, expected.replace("CFG", str(adapter / "adapter_config.json")))
    assert hashes(adapter, TOY) == before
    assert not any((tmp_path / n).exists() for n in ("m", "f.safetensors", "mc"))


def test_an_adapter_that_agrees_loads_as_one_model_on_both_paths(tmp_path):
    """The same adapter, once its config agrees: the task vector's Δ is vLLM's (and PEFT's) s·B·A,
    s = lora_alpha/r per module (alpha_pattern applied)."""
    from safetensors.torch import load_file

    from tvtool.vectors.adapter import check_adapter

    adapter = _adapter(tmp_path / "ok", config={"alpha_pattern": {"v_proj": 4.0}})
    assert check_adapter(adapter)["r"] == 8
    tv = tvtool.TaskVector.load(adapter)
    sd = load_file(adapter / "adapter_model.safetensors")
    for m, s in ((MODULES[0], 16 / 8), (MODULES[1], 4.0 / 8)):
        ref = (sd[f"base_model.model.{m}.lora_B.weight"].double() @ sd[f"base_model.model.{m}.lora_A.weight"].double()
               * s)
        assert torch.allclose(tv.get(m + ".weight").double(), ref, rtol=1e-5, atol=1e-7)


def test_a_peft_saved_adapter_passes_the_check(lora_pair):
    from tvtool.vectors.adapter import check_adapter

    for path in lora_pair.adapters:
        c = check_adapter(path)
        assert c["r"] == 8 and sorted(c["target_modules"]) == sorted(
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


# --- MixChain with a missing solution column; progressive skipping a stage ----------------------------------

def _mixchain_rows(n=4, *, k=3, drop=None, empty=None):
    rows = []
    for i in range(n):
        row = {"question": f"what is {i} + {i}"}
        for j in range(k + 1):
            if j != drop:
                row[f"solution_{j}"] = None if j == empty else f"{i} + {i} = {2 * i} " + "so " * j
        rows.append(row)
    return rows


def test_a_mixchain_missing_a_solution_column_is_refused(tmp_path, no_new_processes):
    data = _jsonl(tmp_path / "mc.jsonl", _mixchain_rows(drop=2))
    before = hashes(data, TOY)
    r = cli("train", "progressive", "--model", TOY / "base", "--data", data, "-o", tmp_path / "a", "--no-progress")
    assert_one_line_error(r, f"the MixChain data has solution_3 but no solution_2 ({data}). Pass the complete "
                             "MixChain (columns solution_0..K), or rebuild it with tvtool mixchain")
    assert hashes(data, TOY) == before and not (tmp_path / "a").exists()


def test_progressive_says_when_it_skips_an_empty_stage(tmp_path):
    from tvtool.engine.prompting import load_tokenizer
    from tvtool.valve.train_data import load_train_data, stages_for

    data = _jsonl(tmp_path / "mc.jsonl", _mixchain_rows(empty=2))
    with pytest.warns(UserWarning) as w:
        stages = stages_for(mode="progressive", data=load_train_data(data), tokenizer=load_tokenizer(TOY / "base"))
    assert [name for name, _ in stages] == ["solution_3", "solution_1", "solution_0"]
    assert [str(x.message) for x in w] == [f"progressive training skips stage solution_2: no row has a solution there "
                                           f"({data})"]


# --- data rows that are not JSON objects: train, mixchain, eval ------------------------------------------

@pytest.mark.parametrize("line, kind", [([1, 2], "list"), ("text", "string"), (3, "number")])
def test_data_rows_that_are_not_objects_name_file_line_and_expectation(tmp_path, monkeypatch, no_new_processes,
                                                                      line, kind):
    import tvtool.engine.engine

    monkeypatch.setattr(tvtool.engine.engine, "vllm_module", lambda: pytest.fail("the engine was started"))
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(PAIRS[0]) + "\n\n" + json.dumps(line) + "\n")
    before = hashes(data, TOY)
    r = cli("train", "valve", "--model", TOY / "base", "--data", data, "-o", tmp_path / "a", "--no-progress")
    assert_one_line_error(r, f"a JSON {kind}, not an object ({data}, line 3). Each row must be one JSON object with "
                             "question text and solution_0..K (MixChain) or solution (question/solution pairs)")
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "1 + 1", "answer": "2\n#### 2"}) + "\n" + json.dumps(line) + "\n")
    expected = (f"a JSON {kind}, not an object ({gsm}, line 2). Each line must be one JSON object, e.g. "
                '{"question": ..., "answer": ...}')
    for args in (["eval", "--model", TOY / "base", "--dataset", gsm, "-o", tmp_path / "ev"],
                 ["mixchain", TOY / "base", "--reasoner", TOY / "reasoner", "--dataset", gsm, "-o", tmp_path / "mc",
                  "--no-progress"]):
        r = cli(*args)
        assert_one_line_error(r, expected)
    assert hashes(data, TOY) == before and not (tmp_path / "a").exists() and not (tmp_path / "mc").exists()


def test_a_training_row_without_question_text_names_its_line(tmp_path):
    data = _jsonl(tmp_path / "rows.jsonl", [PAIRS[0], {"question": 5, "solution": "5"}])
    r = cli("train", "valve", "--model", TOY / "base", "--data", data, "-o", tmp_path / "a", "--no-progress")
    assert_one_line_error(r, f"'question' is a JSON number, not text ({data}, line 2). Each row must be one JSON "
                             "object with question text and solution_0..K (MixChain) or solution (question/solution "
                             "pairs)")
