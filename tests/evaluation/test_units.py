"""Planning a sweep for a pool of engines (tvtool.evaluation.units), without Ray or an engine."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import cli
from tvtool.evaluation.data import Problem, ProblemSet
from tvtool.engine.options import EngineOptions, SamplingOptions
from tvtool.errors import OptionsError
from tvtool.io.layout import RUN, SAMPLES, SUMMARY
from tvtool.merge.config import MergeConfig
from tvtool.engine.prompting import PromptOptions
from tvtool.evaluation.results import read_samples, summarize
from tvtool.evaluation.runs import EvalOptions
from tvtool.vectors.source import DeltaSource
from tvtool.io.finished import RECORD_KEY, stage_record
from tvtool.evaluation.units import RayOptions, RunSpec, plan_units, settings_complete, sweep_runs

TOY = Path(__file__).resolve().parents[2] / "tvtool" / "assets" / "toy"
PROMPT = PromptOptions(instruction="")
SOURCE = DeltaSource(base=str(TOY / "base"), reasoner=str(TOY / "reasoner"))


def _spec(alpha: float, ds: str, kind: str, n: int, max_tokens: int) -> RunSpec:
    problems = ProblemSet(name=ds, kind=kind, source=ds, split="test", excluded={}, description="",
                          problems=tuple(Problem(id=f"{ds}/{i}", question="q", gold="1") for i in range(n)))
    return RunSpec(folder=f"/out/alpha-{alpha:g}/{ds}", source=SOURCE, config=MergeConfig(alpha),
                   options=EvalOptions(dataset=ds), sampling=SamplingOptions(max_tokens=max_tokens),
                   problems=problems, model={}, settings={})


def _qwq_runs() -> list[RunSpec]:
    """The QwQ-32B recipe's shape: 3 α × GSM8K (1319 @ 4192), MATH-500 (500 @ 8192), ASDiv (2000 @ 4192)."""
    sets = [("gsm8k", "gsm8k", 1319, 4192), ("math500", "math500", 500, 8192), ("ASDiv", "asdiv", 2000, 4192)]
    return [_spec(a, *s) for s in sets for a in (0.0, 0.6, 1.2)]


def test_units_per_alpha_longest_first():
    plan = plan_units(runs=_qwq_runs(), engines=2, complete=lambda r: False)
    assert [u.name for u in plan.units] == ["alpha-1.2", "alpha-0.6", "alpha-0"]
    for u in plan.units:  # one α per unit (one weight load), hardest set first
        assert {r.alpha for r in u.runs} == {u.alpha}
        assert [Path(r.folder).name for r in u.runs] == ["math500", "gsm8k", "ASDiv"]
    assert plan.units[0].expected_tokens == 500 * 8192 + 1319 * 4192 + 2000 * 4192


def test_fewer_alphas_than_engines_splits_by_dataset():
    plan = plan_units(runs=_qwq_runs(), engines=8, complete=lambda r: False)
    assert [u.name for u in plan.units][:4] == ["alpha-1.2/math500", "alpha-1.2/gsm8k", "alpha-1.2/ASDiv",
                                                "alpha-0.6/math500"]
    assert len(plan.units) == 9 and all(len(u.runs) == 1 for u in plan.units)
    # same hardness: the larger token budget first
    two = [_spec(1.0, "a", "gsm8k", 10, 100), _spec(1.0, "b", "gsm8k", 10, 400)]
    big = plan_units(runs=two, engines=2, complete=lambda r: False)
    assert [u.name for u in big.units] == ["alpha-1/b", "alpha-1/a"]
    # fewer runs than engines: shards of problems (tests/evaluation/test_shards.py), the larger budget first
    assert [u.name for u in plan_units(runs=two, engines=4, complete=lambda r: False).units][:2] == [
        "alpha-1/b[0:2]", "alpha-1/b[2:4]"]
    with pytest.raises(OptionsError, match="engines must be at least 1"):
        plan_units(runs=_qwq_runs(), engines=0)


def test_complete_runs_are_skipped_with_a_pluggable_rule():
    runs = _qwq_runs()
    plan = plan_units(runs=runs, engines=2, complete=lambda r: r.alpha == 1.2 or r.name == "alpha-0/gsm8k")
    assert [u.name for u in plan.units] == ["alpha-0.6", "alpha-0"]
    assert [Path(r.folder).name for r in plan.units[1].runs] == ["math500", "ASDiv"]
    assert {r.name for r in plan.skipped} == {"alpha-1.2/gsm8k", "alpha-1.2/math500", "alpha-1.2/ASDiv",
                                             "alpha-0/gsm8k"}
    assert plan.runs == tuple(runs)
    done = plan_units(runs=runs, engines=2, complete=lambda r: True)
    assert done.units == () and len(done.skipped) == 9


def _finish(run: RunSpec, *, drop: int = 0, settings: dict | None = None) -> None:
    """What a finished run leaves: run.json (settings, finished), samples.jsonl, summary.json."""
    f = Path(run.folder)
    f.mkdir(parents=True, exist_ok=True)
    record = run.record
    if settings is not None:  # made with other settings: another finished-work record (tvtool.io.finished)
        record = stage_record(stage="eval", options={**run.record["options"], **{k: settings[k] for k in ("score",)}},
                              inputs=run.record["inputs"])
    (f / RUN).write_text(json.dumps({"settings": settings or run.settings, RECORD_KEY: record, "finished": "now"}))
    recs = [{"id": p.id, "index": 0, "num_tokens": 3 + k, "finish_reason": "stop", "correct": k % 2 == 0}
            for k, p in enumerate(run.problems.problems[drop:])]
    (f / SAMPLES).write_text("".join(json.dumps(x) + "\n" for x in recs))
    (f / SUMMARY).write_text(json.dumps(summarize(records=recs, params_b=None)))


@pytest.fixture
def toy_runs(tmp_path):
    datasets = [(EvalOptions(dataset="toy", limit=6), SamplingOptions(max_tokens=40))]
    return sweep_runs(output=tmp_path, source=SOURCE, alphas=(0.0, 0.5, 1.0, 0.5), datasets=datasets, prompt=PROMPT)


def test_sweep_runs_match_the_one_engine_layout(toy_runs, tmp_path):
    assert [r.name for r in toy_runs] == ["alpha-0/toy", "alpha-0.5/toy", "alpha-1/toy"]  # α de-duplicated
    r = toy_runs[1]
    assert r.folder == str(tmp_path / "alpha-0.5" / "toy") and len(r.problems) == 6
    assert r.settings["model"] == {"base": str(TOY / "base"), "delta": None, "reasoner": str(TOY / "reasoner"),
                                   "alpha": 0.5}
    assert r.config == MergeConfig(0.5) and r.params_source == "counted" and r.params_b > 0
    # the engine folder's generation_config.json is recorded as not applied, as Engine.sampling_record does
    assert r.settings["sampling"]["checkpoint_generation_config_ignored"]["max_new_tokens"] == 200
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # planning writes nothing
    # --include/--exclude reach the MergeConfig the actor loads and the recorded model, as in `evaluate`
    (m,) = sweep_runs(output=tmp_path, source=SOURCE, alphas=(0.5,), prompt=PROMPT,
                      datasets=[(EvalOptions(dataset="toy", limit=2, include="mlp", params_b=7.0),
                                 SamplingOptions(max_tokens=40))])
    assert m.config == MergeConfig(0.5, include="mlp") and m.model["include"] == "mlp" and "exclude" not in m.model
    assert (m.params_b, m.params_source) == (7.0, "nominal")
    with pytest.raises(OptionsError, match="a Ray sweep needs --base"):
        sweep_runs(output=tmp_path, source=SOURCE, alphas=(), datasets=[], prompt=PROMPT)


def test_settings_complete_is_the_one_engine_precheck(toy_runs):
    a0, a05, a1 = toy_runs
    _finish(a0)
    _finish(a05, drop=1)  # one sample missing
    _finish(a1, settings={**a1.settings, "score": False})  # made with other settings
    assert [settings_complete(r) for r in toy_runs] == [True, False, False]
    (Path(a0.folder) / SUMMARY).unlink()  # the summary is rebuilt from the samples: still complete
    assert settings_complete(a0)
    (Path(a0.folder) / RUN).unlink()
    assert not settings_complete(a0)


def test_a_finished_rerun_starts_no_engine_and_no_ray(toy_runs, tmp_path, monkeypatch):
    from tvtool.evaluation.cluster import evaluate_on_ray

    for r in toy_runs:
        _finish(r)
    (Path(toy_runs[1].folder) / SUMMARY).unlink()
    monkeypatch.setitem(sys.modules, "ray", None)  # importing ray would now fail
    kw = dict(output=tmp_path, source=SOURCE, alphas=(0.0, 0.5, 1.0), options=EvalOptions(dataset="toy", limit=6),
              sampling=SamplingOptions(max_tokens=40), prompt=PROMPT, executor=RayOptions(engines=2), progress=False)
    res = evaluate_on_ray(**kw)
    assert res.pool.engine_starts == 0 and res.pool.plan.units == () and len(res.pool.plan.skipped) == 3
    assert [r.label for r in res.results[0].runs] == ["alpha-0", "alpha-0.5", "alpha-1"]
    # summaries are rebuilt from the samples (with the counted size), as the one-engine path does
    recs = read_samples(Path(toy_runs[1].folder) / SAMPLES)
    want = summarize(records=recs, params_b=toy_runs[1].params_b)
    assert res.results[0].runs[1].summary == want == json.loads((Path(toy_runs[1].folder) / SUMMARY).read_text())
    assert (tmp_path / "summary-toy.md").is_file()
    # one sample missing: now Ray is needed, and its absence is one clear error
    f = Path(toy_runs[2].folder) / SAMPLES
    f.write_text("".join(f.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(OptionsError, match=r"Ray is not installed \(--ray\)\. Pip install 'tvtool\[ray\]'"):
        evaluate_on_ray(**kw)


def test_other_settings_are_refused_before_ray_starts(toy_runs, tmp_path, monkeypatch):
    from tvtool.evaluation.cluster import evaluate_on_ray
    from tvtool.errors import OutputError

    _finish(toy_runs[0], drop=2, settings={**toy_runs[0].settings, "score": False})
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(OutputError, match="holds results made with other settings"):
        evaluate_on_ray(output=tmp_path, source=SOURCE, alphas=(0.0,), options=EvalOptions(dataset="toy", limit=6),
                        sampling=SamplingOptions(max_tokens=40), prompt=PROMPT, progress=False)


def test_ray_refuses_non_sweep_modes_in_one_line(tmp_path):
    r = cli("eval", "--model", TOY / "base", "--dataset", "toy", "-o", tmp_path / "x", "--ray")
    assert r.exit_code == 2
    assert r.stderr.strip() == ("tvtool: error: --ray runs α sweeps (--ray). Pass --base with --delta|--reasoner "
                                "and --alpha (or drop --ray)")


def test_recipe_executor_ray(tmp_path):
    from tvtool.sweep.recipe import load_recipe

    text = (Path(__file__).resolve().parents[2] / "recipes" / "toy.yaml").read_text()
    f = tmp_path / "r.yaml"
    f.write_text(text.replace("output: runs/toy", "output: runs/toy\nexecutor: {ray: {address: auto, engines: 4, "
                                                   "gpus_per_engine: 2, cpus_per_engine: 8}}"))
    r = load_recipe(f)
    assert r.executor.ray == RayOptions(address="auto", engines=4, gpus_per_engine=2.0, cpus_per_engine=8.0)
    f.write_text(text.replace("output: runs/toy", "output: runs/toy\nexecutor: {ray: {engines: two}}"))
    from tvtool.errors import RecipeError

    with pytest.raises(RecipeError, match="field executor.ray.engines must be an integer, got 'two'"):
        load_recipe(f)


def test_cpu_core_lists_are_distinct_per_engine():
    from tvtool.evaluation.cluster import Job, _cores

    job = Job(source=DeltaSource(base="b", reasoner="r"), output="o", engine=EngineOptions(), prompt=PROMPT)
    cores = sorted(__import__("os").sched_getaffinity(0))
    lists = [_cores(RayOptions(cpus_per_engine=1), job, i) for i in range(len(cores))]
    assert lists == [str(c) for c in cores]  # one distinct core each
    assert _cores(RayOptions(cpu_bind="nobind"), job, 0) == "nobind"
    tp2 = replace(job, engine=EngineOptions(tensor_parallel_size=2))
    assert _cores(RayOptions(cpus_per_engine=2), tp2, 0).count("|") == 1  # one list per rank


@pytest.mark.vllm
def test_cpu_build_refuses_vllms_ray_executor_before_starting():
    from tvtool.engine.engine import Engine

    with pytest.raises(OptionsError) as e:
        Engine(model=TOY / "base", options=EngineOptions(distributed_executor_backend="ray"))
    assert str(e.value) == ("distributed_executor_backend 'ray' is not supported by vLLM's CPU build "
                            "(--distributed-executor-backend ray). Leave it unset (or use mp); to spread a sweep "
                            "over a Ray cluster pass --ray")
