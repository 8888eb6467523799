"""The operator registry is the one list of operators: CLI choices and help, recipe validation and records read it.

- every module in tvtool/merge/operators/ registers one operator; the registry finds them without a list;
- `--method` of materialize, eval and mixchain offers the registry's names, and every setting flag names the
  operators that take it; svd-rank offers only the operators of the form θ1 + α·M and refuses the others in
  one line;
- a setting given without an operator that takes it is one line (CLI) and one recipe field error;
- importing MergeConfig and the merged model's plan (what the engine needs) imports no operator module, top-k
  or kernel.
"""

from __future__ import annotations

import dataclasses
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tvtool.merge.operators
from helpers import assert_one_line_error, cli
from tvtool.errors import RecipeError
from tvtool.merge.registry import operators, settings, users
from tvtool.sweep.recipe import load_recipe
from tvtool.vectors.taskvector import TaskVector

TOY = Path(__file__).resolve().parents[2] / "tvtool" / "assets" / "toy"


def _choices(command: str, flag: str) -> list[str]:
    from tvtool.cli import main

    ctx = main.commands[command].make_context(command, ["--help"], resilient_parsing=True)
    (p,) = [p for p in main.commands[command].params if flag in p.opts]
    return p.type.get_metavar(p, ctx).strip("[]").split("|")


def test_every_module_registers_its_operator():
    modules = {m.name for m in pkgutil.iter_modules(tvtool.merge.operators.__path__)}
    ops = operators()
    assert {cls.__module__.rsplit(".", 1)[1] for cls in ops.values()} == modules
    assert list(ops)[0] == "task_arithmetic" and list(ops)[1:] == sorted(list(ops)[1:])
    for name, cls in ops.items():
        assert cls.name == name and cls.summary and dataclasses.is_dataclass(cls)
        for f in dataclasses.fields(cls):
            assert f.metadata["setting"].help, (name, f.name)  # every setting has help text


@pytest.mark.parametrize("command", ["materialize", "eval", "generate", "mixchain"])
def test_method_choices_and_help_come_from_the_registry(command):
    assert _choices(command, "--method") == list(operators())
    r = cli(command, "--help")
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    for s in settings():
        if s.option:
            flag = s.flag or "--" + s.name.replace("_", "-")
            assert flag in text and f"{', '.join(users(s.name))}:" in text, flag


def test_svd_rank_lists_and_takes_only_alpha_free_operators(llama, tmp_path):
    free = [n for n, cls in operators().items() if cls.alpha_free]
    assert _choices("svd-rank", "--merge-method") == free
    r = cli("svd-rank", "--help")
    assert r.exit_code == 0 and f"--merge-method [{'|'.join(free)}]" in r.output
    for name in (n for n in operators() if n not in free):
        base, reasoner = llama
        r = cli("svd-rank", "--base", base, "--reasoner", reasoner, "--merge-method", name, "--rank", "2",
                "--no-progress", "-o", tmp_path / "f.safetensors")
        assert_one_line_error(r, f"{name} has no merged task vector M to factor (α enters it otherwise than θ1 + α·M) "
                                 f"(--merge-method). Use one of {', '.join(free)}, or materialize {name} models instead")
    r = cli("svd-rank", "--merge-method", "nope", "--rank", "2", "-o", tmp_path / "f.safetensors")
    assert r.exit_code == 2 and "is not one of task_arithmetic" in r.output


def test_settings_without_an_operator_that_takes_them_are_one_line(llama, tmp_path):
    base, reasoner = llama
    for flags, what in ((["--density", "0.3"], "density"), (["--drop-p", "0.5"], "p"), (["--beta", "0.1"], "beta")):
        r = cli("materialize", base, "--reasoner", reasoner, "--alpha", "0.5", "-o", tmp_path / "o", *flags)
        who = users(what)
        assert_one_line_error(r, f"task_arithmetic takes no {what} (a setting of {', '.join(who)}) (merge.{what}). "
                                 f"Drop it, or choose an operator that takes it, e.g. --method {who[0]}")
    r = cli("materialize", base, "--reasoner", reasoner, "--alpha", "0.5", "-o", tmp_path / "o", "--method", "ties",
            "--drop-seed", "3")
    assert_one_line_error(r, f"ties takes no seed (a setting of {', '.join(users('seed'))}) (merge.seed). Drop it, or "
                             f"choose an operator that takes it, e.g. --method {users('seed')[0]}")
    assert not (tmp_path / "o").exists()


def test_an_alpha_rule_that_applies_to_no_tensor_is_one_line(llama, tmp_path):
    base, reasoner = llama
    r = cli("materialize", base, "--reasoner", reasoner, "--alpha", "0.5", "-o", tmp_path / "o",
            "--alpha-rule", "mlp=1", "--alpha-rule", "mlp.up=2")
    assert_one_line_error(r, "the α rule mlp.up=2 applies to no tensor: an earlier rule takes every tensor it matches "
                             "(--alpha-rule). Fix the regex, or drop the rule")
    assert not (tmp_path / "o").exists()


def test_recipe_merge_entries_are_checked_against_the_registry(tmp_path):
    p = tmp_path / "r.yaml"
    base = {"name": "t", "base": str(TOY / "base"), "reasoner": str(TOY / "reasoner"), "alphas": [0.5],
            "datasets": [{"name": "toy"}]}
    p.write_text(yaml.safe_dump({**base, "merge": {"method": "trim", "p": 0.5}}))
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    who = users("p")
    assert str(e.value) == (f"field merge[0].p is invalid: trim takes no p (a setting of {', '.join(who)}) ({p}). "
                            f"Drop it, or choose an operator that takes it, e.g. --method {who[0]}")
    for name in operators():
        p.write_text(yaml.safe_dump({**base, "merge": {"method": name}}))
        assert load_recipe(p).merge[0].method == name


def test_the_engine_imports_no_operator():
    """What the engine imports (its module, MergeConfig, the plan) loads no operator, top-k or kernel module; the
    package's own __init__ (the public API, which imports every verb) is left out of the measure."""
    pkg = Path(tvtool.merge.operators.__file__).parents[2]
    code = ("import sys, types; p = types.ModuleType('tvtool'); p.__path__ = [sys.argv[1]]; sys.modules['tvtool'] = p; "
            "import tvtool.engine.engine, tvtool.merge.config, tvtool.merge.plan; "
            "from tvtool.merge.config import MergeConfig; "
            "print(sorted(m for m in sys.modules if m.startswith(('tvtool.merge.operators', 'tvtool.merge.topk', "
            "'tvtool.merge.kernels', 'tvtool.merge.gta', 'numba'))))")
    out = subprocess.run([sys.executable, "-c", code, str(pkg)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_an_eval_sweeps_settings_are_checked_before_any_engine_starts(tmp_path, monkeypatch):
    from tvtool.engine.engine import Engine

    def no_engine(**kw):
        raise AssertionError("an engine was started")

    monkeypatch.setattr(Engine, "for_source", no_engine)
    args = ["eval", "--base", TOY / "base", "--reasoner", TOY / "reasoner", "--alpha", "0.5", "--dataset", "toy",
            "-o", tmp_path / "ev"]
    names = TaskVector.between(TOY / "base", TOY / "reasoner").names()
    assert_one_line_error(cli(*args, "--alpha-rule", "xyz=2"),
                          f"the α rule xyz=2 applies to no tensor: no tensor name matches it ({len(names)} tensors, "
                          f"e.g. {', '.join(repr(n) for n in names[:3])}) (--alpha-rule). Fix the regex, or drop the rule")
    r = cli(*args, "--vector", TOY / "reasoner", "--method", "slerp")
    assert r.exit_code == 2 and r.stderr.startswith("tvtool: error: slerp interpolates θ1 and one θ2, got 2")
