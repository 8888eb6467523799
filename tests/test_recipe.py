"""Recipes validate at load, and a bad one gets an error naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import assert_one_line_error, cli
from tvtool.errors import RecipeError
from tvtool.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("name", ["qwq-32b-preview.yaml", "r1-distill-llama-8b.yaml", "toy.yaml", "toy-valve.yaml"])
def test_shipped_recipes_validate(name):
    r = load_recipe(RECIPES / name)
    assert r.alphas and r.datasets
    if name.startswith("qwq"):
        assert r.base == "Qwen/Qwen2.5-32B-Instruct" and r.reasoner == "Qwen/QwQ-32B-Preview"
        assert r.engine.tensor_parallel_size == 2
        assert {d.name: d.max_tokens for d in r.datasets}["gsm8k"] == 4192
        assert {d.name: d.max_tokens for d in r.datasets}["math500"] == 8192
    if name.startswith("r1"):
        assert r.apply == "lora" and r.low_rank.rank == 32
    if name == "toy.yaml":
        assert Path(r.base).is_dir() and Path(r.reasoner).is_dir()  # resolved from the recipe's folder


GOOD = """\
name: t
base: b
reasoner: r
alphas: [0, 0.5]
datasets:
  - {name: gsm8k, limit: 2}
"""


@pytest.mark.parametrize("edit,message", [
    ("colour: red\n", "unknown field colour"),
    ("sampling: {max_tokens: 8, temprature: 0}\n", "unknown field sampling.temprature"),
    ("alphas: [0, x]\n", "field alphas[1] must be a number, got 'x'"),
    ("alphas: 0.5\n", "field alphas must be a list, got 0.5"),
    ("datasets: [{name: gsm8k, limit: many}]\n", "field datasets[0].limit must be an integer, got 'many'"),
    ("datasets: [{limit: 3}]\n", "missing field datasets[0].name"),
    ("apply: teleport\n", "field apply must be one of swap, materialize, lora, got 'teleport'"),
    ("engine: {tensor_parallel_size: true}\n", "field engine.tensor_parallel_size must be an integer, got True"),
])
def test_bad_field_is_named(tmp_path, edit, message):
    key = edit.split(":")[0]
    text = "".join(line for line in GOOD.splitlines(keepends=True) if not line.startswith(key + ":"))
    if key == "datasets":
        text = text.replace("  - {name: gsm8k, limit: 2}\n", "")
    p = tmp_path / "r.yaml"
    p.write_text(text + edit)
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert str(e.value).startswith(message + f" ({p})"), str(e.value)


def test_missing_base_via_cli(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(GOOD.replace("base: b\n", ""))
    assert_one_line_error(cli("sweep", p), f"missing field base ({p})")


def test_lora_needs_low_rank(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(GOOD + "apply: lora\n")
    assert_one_line_error(cli("sweep", p), f"field apply is 'lora' but low_rank is not set ({p}). "
                                           "Add low_rank: {rank: N}, or use apply: swap")


def test_not_yaml(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: [unclosed\n")
    r = cli("sweep", p)
    assert r.exit_code == 2 and r.stderr.startswith("tvtool: error: recipe is not valid YAML: ")


def test_valve_recipes_carry_the_papers_training_settings():
    from tvtool.train import resolve

    qwq = load_recipe(RECIPES / "qwq-32b-preview.yaml")
    assert qwq.mixchain.alphas == (0.2, 0.4, 0.6, 0.8) and [t.mode for t in qwq.train] == ["valve++", "progressive"]
    o = resolve(qwq.train[0].options, mode="valve++")
    assert (o.rank, o.lora_alpha, o.lr, o.batch_size, o.epochs) == (2, 8.0, 1e-5, 64, 5)
    assert resolve(qwq.train[1].options, mode="progressive").epochs == 2
    toy = load_recipe(RECIPES / "toy-valve.yaml")
    assert Path(toy.mixchain.dataset).is_file() and toy.train[0].alphas == (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)


def test_a_bad_train_entry_names_its_field(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("name: x\nbase: b\nreasoner: r\nalphas: [0]\ndatasets: [{name: toy}]\n"
                   "train: [{name: v, mode: valve++, data: mixchain, options: {rank: two}}]\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(bad)
    assert str(e.value) == f"field train[0].options.rank must be an integer, got 'two' ({bad})"
    bad.write_text("name: x\nbase: b\nreasoner: r\nalphas: [0]\ndatasets: [{name: toy}]\n"
                   "train: [{name: v, mode: valve++}]\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(bad)
    assert str(e.value).startswith("a train entry uses data: mixchain but the recipe has no mixchain stage")
