"""Recipes validate at load, and a bad one gets an error naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import assert_one_line_error, cli
from tvtool.errors import RecipeError
from tvtool.sweep.recipe import load_recipe
from tvtool.merge.registry import operators, users

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.parametrize("name", ["qwq-32b-preview.yaml", "r1-distill-llama-8b.yaml", "toy.yaml", "toy-valve.yaml",
                                  "long-to-short-7b.yaml", "long-to-short-32b.yaml", "toy-operators.yaml"])
def test_shipped_recipes_validate(name):
    r = load_recipe(RECIPES / name)
    assert (r.alphas or all(m.alphas for m in r.merge)) and r.datasets
    if name.startswith("qwq"):
        assert r.base == "Qwen/Qwen2.5-32B-Instruct" and r.reasoner == "Qwen/QwQ-32B-Preview"
        assert r.engine.tensor_parallel_size == 2
        assert {d.name: d.max_tokens for d in r.datasets}["gsm8k"] == 4192
        assert {d.name: d.max_tokens for d in r.datasets}["math500"] == 8192
    if name.startswith("r1"):
        assert r.apply == "lora" and r.low_rank.rank == 32
    if name.startswith("long-to-short"):  # the paper's README settings (density = 1 − trim ratio k)
        from tvtool.sweep.spec import merge_configs

        size = name.split("-")[-1].removesuffix(".yaml")  # Table 7: TIES (density = 1 − k, α); DARE p = 0.3 at 7B
        ties = {"7b": (0.2, 1.0), "32b": (0.75, 0.55)}[size]
        got = [(c.method, c.alpha, c.density, c.p) for c in merge_configs(r)]
        dare = [("dare_linear", 0.7, 1.0, 0.3), ("dare_ties", 1.0, 1.0, 0.3)] if size == "7b" else []  # DARE: no trim
        assert got == [("task_arithmetic", 0.7, 1.0, 0.0), ("ties", ties[1], ties[0], 0.0)] + dare
        # §4 / §5.2: System 1 is the pre-trained base itself, System 2 the R1 distill of it
        assert (r.base, r.reasoner, r.vectors) == ({"7b": "Qwen/Qwen2.5-Math-7B", "32b": "Qwen/Qwen2.5-32B"}[size],
                                                   f"deepseek-ai/DeepSeek-R1-Distill-Qwen-{size.upper()}", ())
    if name == "toy-operators.yaml":  # reports/toy-operators: the α curve of toy.yaml plus TIES, DARE, breadcrumbs
        from tvtool.merge.options import config_name
        from tvtool.sweep.spec import merge_configs

        cs = merge_configs(r)
        plain = [c.alpha for c in cs if c.is_plain()]
        assert set(load_recipe(RECIPES / "toy.yaml").alphas) <= set(plain) and r.apply == "swap"
        assert {c.method for c in cs} == {"task_arithmetic", "ties", "dare_linear", "breadcrumbs"}
        assert "ties-d0.2-alpha-0.7" in {config_name(c) for c in cs} and len(cs) == len(set(map(config_name, cs)))
        assert Path(r.base).is_dir() and Path(r.reasoner).is_dir()
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
    ("materialize: {include: '('}\n", "field materialize.include is not a valid regular expression: missing ), unterminated "
                                      "subpattern at position 0"),
    ("materialize: {alphas: [1]}\n", "field materialize.alphas is chosen by the sweep"),
    ("sampling: {max_tokens: 8, temprature: 0}\n", "unknown field sampling.temprature"),
    ("alphas: [0, x]\n", "field alphas[1] must be a number, got 'x'"),
    ("alphas: 0.5\n", "field alphas must be a list, got 0.5"),
    ("datasets: [{name: gsm8k, limit: many}]\n", "field datasets[0].limit must be an integer, got 'many'"),
    ("datasets: [{limit: 3}]\n", "missing field datasets[0].name"),
    ("apply: teleport\n", "field apply must be one of swap, materialize, lora, got 'teleport'"),
    ("engine: {tensor_parallel_size: true}\n", "field engine.tensor_parallel_size must be an integer, got True"),
    ("low_rank: {rank: '8'}\n", "field low_rank.rank must be an integer, got '8'"),
    ("low_rank: {rank: 8, rnak: 4}\n", "unknown field low_rank.rnak"),
    ("low_rank: {rank: 8, energy: 0.9}\n", "field low_rank needs exactly one of rank and energy"),
    ("low_rank: [8]\n", "field low_rank must be a mapping, got list"),
    ("push: {enabled: yes, privat: false}\n", "unknown field push.privat"),
    ("datasets: []\n", "field datasets must list at least one dataset"),
    ("alphas: []\n", "field alphas must list at least one α"),
    ("alphas: [0, .nan]\n", "field alphas must be finite numbers, got nan"),
    ("output: runs/{nme}\n", "field output has an unknown key {nme}"),
    ("name: 3\n", "field name must be a string, got 3"),
    ("name:\n", "field name must not be empty"),
    ("merge: {method: tie}\n", "field merge[0].method must be one of {operators}, got 'tie'"),
    ("merge: {density: 0.3}\n", "field merge[0].density is invalid: task_arithmetic takes no density (a setting of "
                                "{users:density})"),
    ("merge: {method: ties, rules: [mlp]}\n", "field merge[0].rules is invalid: bad α rule 'mlp'"),
    ("source: {vocab: some}\n", "field source.vocab must be one of error, intersect, got 'some'"),
    ("materialize: {vocab: intersect}\n", "unknown field materialize.vocab"),
    ("merge: {method: ties, density: 0}\n", "field merge[0].density is invalid: density must be in (0, 1], got 0.0"),
    ("merge: [{method: dare_ties, p: 1.0}]\n", "field merge[0].p is invalid: DARE drop probability p must be in [0, 1), got 1.0"),
    ("merge: {method: ties, layer_schedule: fast}\n", "field merge[0].layer_schedule is invalid: bad layer schedule 'fast'"),
    ("vectors: [{weight: 0.5}]\n", "missing field vectors[0].model"),
    ("merge: [{method: ties}, {method: trim}]\nlow_rank: {rank: 2}\n",
     "field merge lists several operators, but low_rank uses one merged task vector"),
    ("merge: [{method: ties}, {method: trim}]\nmixchain: {alphas: [0.5]}\n",
     "field merge lists several operators, but mixchain uses one merged task vector"),
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
    message = message.replace("{users:density}", ", ".join(users("density"))).replace(  # the registry's lists
        "{operators}", ", ".join(operators()))
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


def test_unknown_field_lists_the_known_ones(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(GOOD + "keep: {delta: true, modles: true}\n")
    assert_one_line_error(cli("sweep", p), f"unknown field keep.modles ({p}). Known fields: delta, models")


def test_output_template_error_names_known_keys(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(GOOD + "output: runs/{nme}\n")
    assert_one_line_error(cli("sweep", p), f"field output has an unknown key {{nme}} ({p}). Known keys: {{name}}")


def test_duplicate_key_is_an_error(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(GOOD + "sampling: {max_tokens: 8}\nname: again\n")
    assert_one_line_error(cli("sweep", p), f"duplicate key 'name' on line 8 ({p}). Give each field once")
    p.write_text(GOOD + "sampling: {max_tokens: 8, max_tokens: 9}\n")
    assert_one_line_error(cli("sweep", p), f"duplicate key 'max_tokens' on line 7 ({p}). Give each field once")


def test_not_utf8(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_bytes(GOOD.encode() + "# á\n".encode("latin-1"))
    assert_one_line_error(cli("sweep", p), f"recipe is not UTF-8 text (byte 0xe1 at offset {len(GOOD) + 2}) "
                                           f"({p}). Save it as UTF-8")


def test_not_a_mapping(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("- 1\n- 2\n")
    assert_one_line_error(cli("sweep", p), f"the recipe must be a mapping of fields, got list ({p})")


def test_recipe_nests_the_verbs_options(tmp_path):
    """low_rank is LowRankOptions and push is PushOptions (private by default, a dry run by default)."""
    from tvtool.io.hub import PushOptions
    from tvtool.lowrank.svd import LowRankOptions

    p = tmp_path / "r.yaml"
    p.write_text(GOOD + "apply: lora\nlow_rank: {rank: 8, niter: 2}\npush: {enabled: true}\n")
    r = load_recipe(p)
    assert r.low_rank == LowRankOptions(rank=8, niter=2)
    assert isinstance(r.push, PushOptions) and r.push.private and r.push.dry_run and r.push.enabled
    assert PushOptions().private  # one default for recipes, CLI and API
    with pytest.raises(Exception):
        r.name = "other"  # frozen


def test_written_recipe_loads_back_equal(tmp_path):
    """sweep writes the validated recipe as recipe.yaml; loading it gives the same recipe."""
    import yaml

    from tvtool.sweep.recipe import to_dict

    r = load_recipe(RECIPES / "r1-distill-llama-8b.yaml")
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(to_dict(r), sort_keys=False, allow_unicode=True))
    assert load_recipe(p) == r


def test_materialize_section_is_materialize_options(tmp_path):
    """One tensor selection for in-engine α (swap) and α folders (materialize): MaterializeOptions."""
    from tvtool.merge.options import MaterializeOptions

    p = tmp_path / "r.yaml"
    p.write_text(GOOD + "materialize: {include: '\\.mlp\\.', dtype: float32}\n")
    assert load_recipe(p).materialize == MaterializeOptions(include=r"\.mlp\.", dtype="float32")
    assert load_recipe(RECIPES / "toy.yaml").materialize == MaterializeOptions()  # optional section


def test_include_misplaced_or_with_lora(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(GOOD + "include: mlp\n")
    assert_one_line_error(cli("sweep", p), f"unknown field include ({p}). It belongs in a section: "
                                           "low_rank.include or materialize.include")
    p.write_text(GOOD + "apply: lora\nlow_rank: {rank: 4}\nmaterialize: {exclude: attn}\n")
    assert_one_line_error(cli("sweep", p), f"field materialize.exclude does not apply to apply: lora ({p}). "
                                           "Select tensors with low_rank.include/exclude instead")


def test_recipe_built_in_python_raises_recipe_error(tmp_path):
    from tvtool.sweep.recipe import Recipe
    from tvtool.sweep.spec import DatasetSpec

    kw = dict(name="t", base="b", reasoner="r", alphas=(0, 0.5), datasets=(DatasetSpec(name="gsm8k", limit=2),))
    p = tmp_path / "r.yaml"
    p.write_text(GOOD)
    assert Recipe(**kw) == load_recipe(p)
    with pytest.raises(RecipeError) as e:
        Recipe(**{**kw, "alphas": ()})
    assert str(e.value) == "field alphas must list at least one α (Recipe(...)). E.g. alphas: [0, 0.5, 1]"
    with pytest.raises(RecipeError) as e:
        Recipe(**kw, colour="red")
    assert str(e.value).startswith("unknown field colour (Recipe(...)). Known fields: name, base, ")


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

    from tvtool.evaluation.runs import EvalOptions
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


def test_valve_recipes_carry_the_papers_training_settings():
    from tvtool.valve.options import resolve

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
    assert str(e.value) == (f"field train[0].data is mixchain but the recipe has no mixchain stage ({bad}). "
                            "Add mixchain: {...}, or give a dataset path")
    head = "name: x\nbase: b\nreasoner: r\nalphas: [0]\ndatasets: [{name: toy}]\nmixchain: {alphas: [0.5]}\n"
    for stage, msg in [
        ("train: [{name: v}, {name: v}]", "field train[1].name repeats the name 'v'"),
        ("train: [{name: v, options: {rank: 0}}]", "field train[0].options.rank LoRA rank must be ≥ 1, got 0"),
        ("train: [{name: v, alphas: []}]", "field train[0].alphas must list at least one α"),
        ("train: [{name: v, mode: valv}]", "field train[0].mode must be one of valve, valve++, progressive, got 'valv'"),
        ("train: [{mode: valve}]", "missing field train[0].name"),
    ]:
        bad.write_text(head + stage + "\n")
        with pytest.raises(RecipeError) as e:
            load_recipe(bad)
        assert str(e.value).startswith(f"{msg} ({bad})"), str(e.value)
    bad.write_text(head.replace("{alphas: [0.5]}", "{alphas: [0.5], min_correct: three}") + "train: [{name: v}]\n")
    with pytest.raises(RecipeError, match=r"^field mixchain.min_correct "):
        load_recipe(bad)
