"""The merge operators in the remaining paths that apply a task vector (everywhere α is used).

- a recipe's `low_rank` stage with `merge:` factors the operator's M (`svd_rank` with its settings), the
  runs apply α and its rules to M, the report says so, and an edited density redoes the factorization
  and the runs it feeds; the stage-by-stage commands parse back into the same settings;
- Ray sweeps (recipe `executor.ray`, `eval --ray`) plan one unit per (operator, α) carrying its
  `MergeConfig` and the vectors (`DeltaSource.more`), and the actor's load (`EngineActor.run` →
  `Engine.load_alpha` → the worker's `tvtool_load_alpha`) receives materialize's bytes; run in-process
  (units pickled as Ray would), no Ray and no vLLM;
- `tvtool mixchain` with operator flags generates each solution from the operator's config at its α
  (the weights its engine receives equal materialize's bytes), records the operator (mixchain.json,
  card, finished-work record), and an edited density is named and redone; a recipe's mixchain stage
  uses the recipe's operator and vectors.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pickle

import pytest
import yaml
from click.testing import CliRunner

import tvtool
from helpers import assert_bit_equal
from engine_setup import RecordingEngine as _FakeEngine
from helpers import engine_loaded as _loaded
from tiny import state_dict
from tvtool.cli import main
from tvtool.errors import OutputError
from tvtool.lowrank.merged import MERGE_FLAGS
from tvtool.merge.config import MergeConfig
from tvtool.merge.options import MergeOptions
from tvtool.cli.inputs import inputs, merge_from_cli
from tvtool.merge.options import config_name
from tvtool.sweep.recipe import load_recipe
from tvtool.sweep.spec import low_rank_merge, merge_configs
from tvtool.vectors.source import DeltaSource

TOY = Path(__file__).resolve().parents[2] / "tvtool" / "assets" / "toy"


def _recipe(path: Path, *, density: float, **extra) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "t", "base": str(TOY / "base"), "reasoner": str(TOY / "reasoner"), "apply": "swap",
        "merge": {"method": "trim", "density": density, "alphas": [0.5, 0.8], "rules": ["mlp=1", ".=0.5"]},
        "datasets": [{"name": "toy", "limit": 2}], "prompt": {"instruction": ""}, "sampling": {"max_tokens": 8},
        **extra}))
    return path


def test_sweep_low_rank_factors_the_operators_m(tmp_path, monkeypatch, capsys):
    from tvtool.sweep.run import commands as _commands
    from tvtool.sweep.run import SweepOptions, sweep

    monkeypatch.setattr(sys.modules["tvtool.sweep.stages.evaluate"], "Engine", _FakeEngine)
    out, recipe = tmp_path / "sweep", tmp_path / "r.yaml"
    opts = SweepOptions(output=str(out), progress=False)
    _FakeEngine.made.clear()
    sweep(recipe=_recipe(recipe, density=0.5, low_rank={"rank": 2}), options=opts)
    report = json.loads((out / "lowrank" / "delta.lowrank.json").read_text())
    assert report["merge"] == {"method": "trim", "density": 0.5} and not (out / "delta").exists()
    held = {json.loads(w)["config"]["alpha"]: json.loads(w) for e in _FakeEngine.made for w, _ in e.generated}
    rules = (("mlp", 1.0), (".", 0.5))
    for a in (0.5, 0.8):  # α and its rules applied to the factored M (one task vector, no operator left)
        assert MergeConfig.from_dict(held[a]["config"]) == MergeConfig(a, rules=rules)
        assert held[a]["source"]["delta"] == str(out / "lowrank" / "delta.safetensors")
    assert "The `trim` operator's M (density=0.5) in place of Δ" in (out / "REPORT.md").read_text()
    capsys.readouterr()
    _FakeEngine.made.clear()
    sweep(recipe=_recipe(recipe, density=0.3, low_rank={"rank": 2}), options=opts)  # edited density
    err = capsys.readouterr().err
    assert "merge.density 0.5 → 0.3: redoing svd-rank delta.safetensors" in err
    assert sum(len(e.generated) for e in _FakeEngine.made) == 4  # both α runs generated again

    r = load_recipe(recipe)
    (svd,) = [c for c in _commands(r, out) if c.startswith("tvtool svd-rank ")]
    kw = dict(main.commands["svd-rank"].make_context("svd-rank", shlex.split(svd)[2:]).params)
    assert (Path(kw["base"]).resolve(), Path(kw["reasoner"]).resolve()) == (TOY / "base", TOY / "reasoner")
    assert merge_from_cli(kw, rename=MERGE_FLAGS) == MergeOptions(method="trim", density=0.3)
    assert low_rank_merge(r) == MergeOptions(method="trim", density=0.3)
    evals = [c for c in _commands(r, out) if c.startswith("tvtool eval ")]
    kw = dict(main.commands["eval"].make_context("eval", shlex.split(evals[0])[2:]).params)
    assert merge_from_cli(kw) == MergeOptions(rules=("mlp=1", ".=0.5"))
    assert kw["delta_path"].endswith("lowrank/delta.safetensors")


class _LoadingEngine(_FakeEngine):
    """`_FakeEngine` whose weight loads go through the vLLM worker's load path (`test_merge._loaded`)."""

    loads: list[tuple] = []

    def load_alpha(self, *, source, config, force=False):
        load = super().load_alpha(source=source, config=config)
        _LoadingEngine.loads.append((source, config, _loaded(source, config)))
        return load


def _in_process_pool(monkeypatch) -> list:
    """Replace the Ray pool by the actor class run in this process; returns the plans it was given."""
    from tvtool.evaluation import cluster

    plans = []

    def run_units(*, plan, job, executor, progress=True, on_start=None, actor_cls=cluster.EngineActor):
        plans.append(plan)
        res = cluster.PoolResult(plan=plan)
        actor = actor_cls(pickle.loads(pickle.dumps(job)), 0, None)
        actor.engine = _LoadingEngine(job.engine)
        for unit in plan.units:
            actor.run(pickle.loads(pickle.dumps(unit)))  # what Ray ships to the actor
            res.done.append(unit.name)
        return res

    monkeypatch.setattr(cluster, "run_units", run_units)
    _LoadingEngine.loads.clear()
    return plans


def _materialized(base, r1, r2, configs, out) -> dict:
    res = tvtool.materialize(source=DeltaSource(base=base, reasoner=r1, more=(r2,)), output=out, configs=configs,
                             options=tvtool.MaterializeOptions(progress=False))
    return res.configs


def test_ray_sweep_units_carry_the_operator_configs_and_load_the_materialized_bytes(trio, tmp_path, monkeypatch):
    from tvtool.sweep.run import SweepOptions, sweep

    base, r1, r2 = trio
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "t", "base": str(base), "vectors": [{"model": str(r1), "weight": 0.7}, {"model": str(r2), "weight": 0.5}],
        "merge": [{"method": "ties", "density": 0.3, "alphas": [0.55, 1.0]},
                  {"method": "dare_ties", "p": 0.5, "seed": 3, "alphas": [0.8]}],
        "datasets": [{"name": "toy", "limit": 2}], "prompt": {"instruction": ""}, "sampling": {"max_tokens": 8},
        "executor": {"ray": {"engines": 2}}}))
    configs = merge_configs(load_recipe(recipe))
    plans = _in_process_pool(monkeypatch)
    res = sweep(recipe=recipe, options=SweepOptions(output=str(tmp_path / "sweep"), progress=False))
    (plan,) = plans
    assert sorted(u.name for u in plan.units) == sorted(config_name(c) for c in configs)
    for u in plan.units:  # one configuration per unit: its operator, weights and the second vector
        (c,) = {r.config for r in u.runs}
        assert u.name == config_name(c) and c in configs and c.method in ("ties", "dare_ties")
        assert {r.source.more for r in u.runs} == {(str(r2),)}
    want = _materialized(base, r1, r2, configs, tmp_path / "models")
    assert sorted((c for _, c, _ in _LoadingEngine.loads), key=configs.index) == configs
    for _, c, got in _LoadingEngine.loads:
        assert_bit_equal(got, state_dict(want[c]))
    rows = next(iter(res.tables.values()))  # the report's operator columns, as on one engine
    assert {(row["method"], row["label"]) for row in rows} == {(c.method, config_name(c)) for c in configs}


def test_eval_ray_cli_takes_the_operator_flags(trio, tmp_path, monkeypatch):
    base, r1, r2 = trio
    plans = _in_process_pool(monkeypatch)
    r = CliRunner().invoke(main, ["eval", "--ray", "--base", str(base), "--vector", f"{r1}:0.7", "--vector",
                                  f"{r2}:0.5", "--method", "ties", "--density", "0.3", "--alpha", "0.55",
                                  "--dataset", "toy", "--limit", "2", "--max-tokens", "8", "--instruction", "",
                                  "--no-progress", "-o", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    c = MergeConfig(0.55, method="ties", density=0.3, weights=(0.7, 0.5))
    (plan,) = plans
    assert [r.label for u in plan.units for r in u.runs] == [config_name(c)] and plan.units[0].runs[0].config == c
    ((_, got_c, got),) = _LoadingEngine.loads
    assert got_c == c
    assert_bit_equal(got, state_dict(_materialized(base, r1, r2, [c], tmp_path / "m")[c]))
    assert (tmp_path / "ev" / config_name(c) / "toy" / "samples.jsonl").is_file()


def test_mixchain_generates_from_the_operators_configs(trio, tmp_path, monkeypatch):
    from tvtool.engine.engine import Engine
    from tvtool.engine.options import SamplingOptions
    from tvtool.valve.mixchain import build_mixchain
    from tvtool.valve.options import MixChainOptions
    from tvtool.engine.prompting import PromptOptions

    base, r1, r2 = trio
    monkeypatch.setattr(Engine, "for_source", _LoadingEngine.for_source)
    _LoadingEngine.loads.clear()
    out = tmp_path / "mix"
    flags = ["--vector", f"{r1}:0.7", "--vector", f"{r2}:0.5", "--method", "ties", "--density", "0.3"]
    r = CliRunner().invoke(main, ["mixchain", str(base), *flags, "--alpha", "0.8,0.5", "--dataset", "toy", "--limit",
                                  "2", "--min-correct", "0", "--max-tokens", "8", "--instruction", "", "--no-progress",
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    configs = [MergeConfig(a, method="ties", density=0.3, weights=(0.7, 0.5)) for a in (0.5, 0.8)]
    assert [c for _, c, _ in _LoadingEngine.loads] == configs  # solution_1 = the smallest α
    want = _materialized(base, r1, r2, configs, tmp_path / "models")
    for _, c, got in _LoadingEngine.loads:
        assert_bit_equal(got, state_dict(want[c]))
    op = {"method": "ties", "density": 0.3, "weights": [0.7, 0.5], "more": [str(r2)]}
    rec = json.loads((out / "mixchain.json").read_text())
    assert rec["merge"] == op and rec["record"]["options"]["merge"] == op
    assert f"merge operator: `ties` (weights [0.7, 0.5], density 0.3) over 2 task vector(s) (θ₂, `{r2}`)" in \
        (out / "README.md").read_text()
    assert sorted(p.name for p in (tmp_path / "mix.generations").iterdir() if p.is_dir()) == \
        sorted(config_name(c) for c in configs)

    kw = dict(source=DeltaSource(base=base, reasoner=r1, more=(r2,)), output=out,
              options=MixChainOptions(dataset="toy", limit=2, min_correct="0", alphas=(0.5, 0.8), progress=False),
              prompt=PromptOptions(instruction=""), sampling=SamplingOptions(max_tokens=8))
    _LoadingEngine.loads.clear()
    same = MergeOptions(method="ties", density=0.3, weights=(0.7, 0.5))
    assert build_mixchain(merge=same, **kw).engine_starts == 0 and not _LoadingEngine.loads  # finished
    edited = MergeOptions(method="ties", density=0.5, weights=same.weights)
    with pytest.raises(OutputError, match=r"merge\.density 0\.3 → 0\.5"):
        build_mixchain(merge=edited, **kw)


def test_recipe_mixchain_stage_uses_the_recipes_operator(trio, tmp_path):
    from tvtool.sweep.run import commands as _commands
    from tvtool.sweep.stages.mixchain import MixChainStage, mixchain_merge

    base, r1, r2 = trio
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "t", "base": str(base), "vectors": [{"model": str(r1), "weight": 0.7}, {"model": str(r2), "weight": 0.5}],
        "merge": {"method": "ties", "density": 0.3, "rules": ["mlp=1"]}, "alphas": [1.0],
        "datasets": [{"name": "toy", "limit": 2}], "mixchain": {"dataset": "toy", "alphas": [0.5, 0.8]}}))
    r = load_recipe(recipe)
    op = mixchain_merge(r)
    assert op == MergeOptions(method="ties", density=0.3, rules=("mlp=1",), weights=(0.7, 0.5))
    (cmd,) = MixChainStage().commands(r, "run")
    kw = dict(main.commands["mixchain"].make_context("mixchain", cmd[2:]).params)
    source, merge = inputs(kw)
    assert merge == op and source == DeltaSource(base=str(base), reasoner=str(r1), more=(str(r2),))
    assert _commands  # the sweep's own commands import cleanly with a mixchain stage
