"""Recipes validate at load, and a bad one gets an error naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import assert_one_line_error, cli
from tvtool.errors import RecipeError
from tvtool.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("name", ["qwq-32b-preview.yaml", "r1-distill-llama-8b.yaml", "toy.yaml"])
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


def test_prompt_budgets_and_answer_rule(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(GOOD + "prompt_budgets: [20, 50, 100]\nbudget_template: llama\nanswer_rule: boxed-only\n")
    r = load_recipe(p)
    assert (r.prompt_budgets, r.budget_template, r.answer_rule, r.budget_alpha) == ((20, 50, 100), "llama",
                                                                                    "boxed-only", 1.0)
    p.write_text(GOOD + "prompt_budgets: [20, fifty]\n")
    with pytest.raises(RecipeError, match=r"^field prompt_budgets\[1\] must be an integer, got 'fifty'"):
        load_recipe(p)
    p.write_text(GOOD + "answer_rule: loose\n")
    with pytest.raises(RecipeError, match="^field answer_rule must be one of paper, boxed-only, strict-match, "
                                          "flexible-extract, got 'loose'"):
        load_recipe(p)
    p.write_text(GOOD + "prompt_budgets: [20]\napply: materialize\n")
    assert_one_line_error(cli("sweep", p), f"field prompt_budgets needs apply: swap ({p}). "
                                           "Use apply: swap, or remove prompt_budgets")


def test_eval_options_from_the_command_line():
    import click
    from click.testing import CliRunner

    from tvtool.runs import EvalOptions
    from tvtool.options import click_options, from_cli

    got = []

    @click.command()
    @click_options(EvalOptions)
    def cmd(**kw):
        got.append(from_cli(EvalOptions, kw))

    r = CliRunner().invoke(cmd, ["--prompt-budget", "20,50", "--prompt-budget", "100", "--answer-rule",
                                 "strict-match", "--budget-template", "llama", "--verbose"])
    assert r.exit_code == 0, r.output
    o = got[0]
    assert (o.prompt_budgets, o.answer_rule, o.budget_template, o.verbose) == ((20, 50, 100), "strict-match",
                                                                               "llama", True)
    bad = CliRunner().invoke(cmd, ["--prompt-budget", "20,x"])
    assert bad.exit_code == 2 and "'20,x' is not an integer (or comma-separated integers)" in bad.output
