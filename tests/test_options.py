"""Options are defined once: `to_cli_args()` is the inverse of `from_cli`, and the reproduce
commands written by materialize and sweep parse back into the options that were used."""

from __future__ import annotations

import dataclasses
import re
import shlex
import typing
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard

import tvtool
from tvtool.cli import main
from tvtool.vectors.delta import DeltaOptions
from tvtool.evaluation.runs import EvalOptions
from tvtool.engine.options import EngineOptions, SamplingOptions
from tvtool.engine.prompting import PromptOptions
from tvtool.io.hub import PushOptions
from tvtool.lowrank.svd import LowRankOptions
from tvtool.merge.options import MaterializeOptions
from tvtool.valve.options import MixChainOptions, PlanOptions, TrainOptions
from tvtool.options import click_options, from_cli, unwrap_optional
from tvtool.cli.inputs import inputs
from tvtool.sweep.recipe import load_recipe
from tvtool.sweep.run import commands
from tvtool.sweep.run import SweepOptions
from tvtool.sweep.spec import delta_source, merge_configs
from tvtool.sweep.stages.evaluate import eval_options
from tvtool.vectors.source import DeltaSource, SourceOptions

CLASSES = [DeltaOptions, EvalOptions, EngineOptions, LowRankOptions, MaterializeOptions, MixChainOptions,
           PlanOptions, PromptOptions, PushOptions, SamplingOptions, SourceOptions, SweepOptions, TrainOptions]
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _other(tp, default, k: int):
    """A value of type `tp` different from `default` (k varies the choice)."""
    tp, _ = unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if tp is bool:
        return not default
    if origin is typing.Literal:
        return next(c for c in typing.get_args(tp)[::-1] if c != default)
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        return {float: (-0.5, 1 / 3, 1e-7, 2.0), int: (20, 50, 100 + k)}.get(inner, ("a b", "--x", "c'd"))
    if tp is int:
        return (default or 0) + 7 + k
    if tp is float:
        return 0.1 + (default or 0) + 1 / 3
    return f"it's {k} {{x}}"  # spaces, quotes, braces


def _parse(cls, args: list[str]):
    got = []

    @click.command()
    @click_options(cls)
    def cmd(**kw):
        got.append(from_cli(cls, kw))

    r = CliRunner().invoke(cmd, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return got[0]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_to_cli_args_round_trips(cls):
    hints = typing.get_type_hints(cls)
    assert cls().to_cli_args() == []  # defaults need no flags
    assert _parse(cls, []) == cls()
    fields = dataclasses.fields(cls)
    everything = cls(**{f.name: _other(hints[f.name], getattr(cls(), f.name), i) for i, f in enumerate(fields)})
    assert _parse(cls, everything.to_cli_args()) == everything
    for f in fields:  # one field at a time: only its flag is written
        one = dataclasses.replace(cls(), **{f.name: getattr(everything, f.name)})
        args = one.to_cli_args()
        assert {a for a in args if a.startswith("--") and a not in one.__dict__.values()} == {args[0]}, args
        assert _parse(cls, args) == one
        assert _parse(cls, shlex.split(shlex.join(args))) == one


def test_bool_flags_use_their_names():
    assert PushOptions(private=False).to_cli_args() == ["--public"]
    assert MaterializeOptions(progress=False).to_cli_args() == ["--no-progress"]
    assert MaterializeOptions(alphas=(0.6, 1.0)).to_cli_args() == ["--alpha", "0.6,1"]
    assert DeltaSource(base="b", reasoner="r", allow_pickle=True).cli_args() == ["--reasoner", "r", "--allow-pickle"]
    assert DeltaSource(base="b", reasoner="r", more=("r2",), vocab="intersect").cli_args(weights=(1.0, 0.5)) == \
        ["--reasoner", "r", "--vector", "r2:0.5", "--vocab", "intersect"]
    assert DeltaSource(base="b", reasoner="r", more=("r2",)).cli_args(weights=(0.7, 0.5)) == \
        ["--vector", "r:0.7", "--vector", "r2:0.5"]


def test_model_card_command_rebuilds_the_options(llama, tmp_path):
    base, reasoner = llama
    o = MaterializeOptions(alphas=(0.6,), dtype="float32", include=r"mlp\.", name_template="m {alpha}",
                           config_from="base", max_shard_size="150KB", progress=False)
    out = tmp_path / "out dir"
    res = tvtool.materialize(source=DeltaSource(base=base, reasoner=reasoner), output=out, options=o)
    card = ModelCard.load(res.folders[0.6] / "README.md").text
    cmd = re.search(r"```bash\n(tvtool materialize .*)\n```", card).group(1)
    words = shlex.split(cmd)
    ctx = main.commands["materialize"].make_context("materialize", words[2:])
    kw = dict(ctx.params)
    assert (kw.pop("base"), kw.pop("reasoner"), kw.pop("output"), kw.pop("delta_path")) == \
        (str(base), str(reasoner), str(out), None)
    assert from_cli(MaterializeOptions, kw) == dataclasses.replace(o, progress=True)


def _resolved(s: DeltaSource) -> DeltaSource:
    """`s` with its local paths absolute (commands name them relative to the recipe's folder)."""
    abs_ = lambda p: str(Path(p).resolve()) if p and Path(p).exists() else p  # noqa: E731
    return dataclasses.replace(s, base=abs_(s.base), reasoner=abs_(s.reasoner), delta=abs_(s.delta),
                               more=tuple(abs_(m) for m in s.more))


@pytest.mark.parametrize("name", ["toy.yaml", "qwq-32b-preview.yaml", "r1-distill-llama-8b.yaml"])
def test_sweep_commands_parse_into_the_sweeps_options(name, tmp_path):
    r = load_recipe(RECIPES / name)
    evals = commands(r, tmp_path / "run", stages=("eval",))  # the valves' own evals are the train stage's
    assert len(evals) == len(r.datasets)
    for cmd, ds in zip(evals, r.datasets):
        ctx = main.commands["eval"].make_context("eval", shlex.split(cmd)[2:])
        kw = dict(ctx.params)
        ev, sampling = eval_options(r, ds, True)
        assert from_cli(EvalOptions, kw) == ev
        assert from_cli(SamplingOptions, kw) == sampling
        assert from_cli(PromptOptions, kw) == r.prompt
        assert from_cli(EngineOptions, kw) == r.engine
        assert tuple(a for part in kw["alphas"] for a in part) in ((), tuple(dict.fromkeys(r.alphas)))


@pytest.mark.parametrize("name", ["toy-operators.yaml", "long-to-short-7b.yaml", "vectors"])
def test_sweep_commands_of_merge_entries_rebuild_the_sweeps_configs(name, tmp_path):
    """One `tvtool eval` per `merge:` entry; together they parse back into the sweep's configurations."""
    if name == "vectors":  # the several-vector example: System 1 Instruct and System 2 R1 over the Math base
        text = (RECIPES / "long-to-short-7b.yaml").read_text().replace(
            "reasoner: deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "vectors:\n"
            "  - {model: Qwen/Qwen2.5-Math-7B-Instruct, weight: 0.4}\n  - {model: deepseek-ai/DeepSeek-R1-Distill-Qwen-7B}")
        (tmp_path / "v.yaml").write_text(text)
        r = load_recipe(tmp_path / "v.yaml")
        assert [(v.model, v.weight) for v in r.vectors] == [("Qwen/Qwen2.5-Math-7B-Instruct", 0.4),
                                                            ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 1.0)]
    else:
        r = load_recipe(RECIPES / name)
    evals = [c for c in commands(r, tmp_path / "run") if c.startswith("tvtool eval ")]
    assert len(evals) == len(r.merge) * len(r.datasets)
    got = []
    for cmd in evals[:len(r.merge)]:
        kw = dict(main.commands["eval"].make_context("eval", shlex.split(cmd)[2:]).params)
        assert kw["vectors"] if r.vectors else kw["reasoner"]  # every task vector as --vector MODEL:WEIGHT
        source, mo = inputs(kw)
        assert _resolved(source) == _resolved(delta_source(r))
        got += mo.configs([a for part in kw["alphas"] for a in part])
    assert got == merge_configs(r)


@pytest.mark.parametrize("name", ["toy-operators.yaml", "vectors"])
def test_materialize_commands_of_merge_entries_rebuild_the_sweeps_configs(name, tmp_path):
    """apply: materialize with `merge:` writes one `tvtool materialize` per entry, carrying the operator flags,
    the vectors and the entry's α; together they parse back into the sweep's configurations."""
    toy = str(RECIPES.parent / "tvtool" / "assets" / "toy")
    text = (RECIPES / ("long-to-short-7b.yaml" if name == "vectors" else name)).read_text().replace(
        "apply: swap", "apply: materialize").replace("../tvtool/assets/toy", toy).replace(
        "reasoner: deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "vectors:\n"
        "  - {model: Qwen/Qwen2.5-Math-7B-Instruct, weight: 0.4}\n  - {model: deepseek-ai/DeepSeek-R1-Distill-Qwen-7B}")
    (tmp_path / "m.yaml").write_text(text)
    r = load_recipe(tmp_path / "m.yaml")
    assert r.apply == "materialize" and (bool(r.vectors) == (name == "vectors"))
    cmds = commands(r, tmp_path / "run")
    mats = [c for c in cmds if c.startswith("tvtool materialize ")]
    assert len(mats) == len(r.merge)
    got = []
    for cmd in mats:
        kw = dict(main.commands["materialize"].make_context("materialize", shlex.split(cmd)[2:]).params)
        assert kw["vectors"] if r.vectors else kw["reasoner"]  # every task vector as --vector MODEL:WEIGHT
        source, mo = inputs(kw)
        assert _resolved(source) == _resolved(delta_source(r))
        got += mo.configs([a for part in kw["alphas"] for a in part])
    assert got == merge_configs(r)
    evals = [c for c in cmds if c.startswith("tvtool eval ")]
    assert evals and all("/models/'*alpha-*" in c or "/models/*alpha-*" in c for c in evals)


@pytest.mark.parametrize("apply", ["swap", "materialize"])
def test_sweep_commands_carry_the_materialize_section(apply, tmp_path):
    """The recipe's materialize.include/exclude reach `tvtool eval` (swap) or `tvtool materialize`."""
    p = tmp_path / "r.yaml"
    p.write_text("name: t\nbase: b\nreasoner: r\nalphas: [0, 0.6]\ndatasets: [{name: toy, limit: 3}]\n"
                 f"apply: {apply}\nmaterialize: {{include: 'mlp|attn', exclude: 'layers\\.0\\.', dtype: float32}}\n")
    r = load_recipe(p)
    cmds = commands(r, tmp_path / "run")
    ev, _ = eval_options(r, r.datasets[0], True)
    ctx = main.commands["eval"].make_context("eval", shlex.split(cmds[-1])[2:])
    assert from_cli(EvalOptions, dict(ctx.params)) == ev
    if apply == "swap":
        assert (ev.include, ev.exclude) == ("mlp|attn", r"layers\.0\.")
        assert not any(c.startswith("tvtool materialize ") for c in cmds)
    else:
        assert (ev.include, ev.exclude) == (None, None)  # the α folders already carry the selection
        (mat,) = [c for c in cmds if c.startswith("tvtool materialize ")]
        kw = dict(main.commands["materialize"].make_context("materialize", shlex.split(mat)[2:]).params)
        assert from_cli(MaterializeOptions, kw) == dataclasses.replace(r.materialize, alphas=(0.0, 0.6))
