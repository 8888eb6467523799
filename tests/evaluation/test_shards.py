"""Ray units as shards of a run's problems (α, dataset, problems [start, stop)), without Ray or vLLM.

Two in-process actors (what Ray ships them: pickled job and units) take the units in plan order, one of
them dies mid-shard and the shard is retried by the other; the run folders (samples.jsonl byte for byte,
summary.json, run.json's settings and finished-work record) equal one engine's `tvtool eval` on a
deterministic stand-in engine, and no sample is generated twice. The real pool with vLLM engines is
test_cluster.py's.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import tempfile
from pathlib import Path

import pytest

from engine_setup import Crash, Flaky
from tvtool.engine.engine import HELD, alpha_weights, write_shell_model
from tvtool.engine.options import EngineOptions, Sample, SamplingOptions, sampling_record
from tvtool.engine.prompting import PromptOptions
from tvtool.evaluation.runs import EvalOptions
from tvtool.evaluation.units import RayOptions, plan_units, sweep_runs
from tvtool.io.finished import RECORD_KEY
from tvtool.io.layout import RUN, SAMPLES, SHARDS, SUMMARY
from tvtool.vectors.source import DeltaSource

TOY = Path(__file__).resolve().parents[2] / "tvtool" / "assets" / "toy"
SOURCE = DeltaSource(base=str(TOY / "base"), reasoner=str(TOY / "reasoner"))
PROMPT = PromptOptions(instruction="")
ALPHAS = (0.0, 0.5, 1.0)
OPTS = EvalOptions(dataset="toy", limit=10, batch_size=2, progress=False)
SAMPLING = SamplingOptions(max_tokens=40)


class DetEngine:
    """A stand-in engine: token ids a hash of (α, prompt); counts what it generated."""

    generated = 0

    def __init__(self, options=None):
        self.options, self.weights, self.tokenizer, self.starts = options or EngineOptions(), {"kind": "dummy"}, None, 1
        self.shell = tempfile.mkdtemp(prefix="det-shell-")
        write_shell_model(source=SOURCE, folder=self.shell)

    @classmethod
    def for_source(cls, *, source, options=None, **kw):
        return cls(options)

    def load_alpha(self, *, source, config, force=False):
        want = alpha_weights(source=source, config=config)
        if want == self.weights:
            return dict(HELD)
        self.weights, self.alpha = want, config.alpha
        return {"path": "resident", "seconds": 0.0, "bytes_read": 0, "storage_bytes": 0, "workers": 1,
                "captured": False, "placement": "cpu", "resident_bytes": 1}

    def sampling_record(self, sampling):
        return sampling_record(model_dir=self.shell, sampling=sampling)

    def prompts(self, *, questions, options):
        return list(questions)

    def generate(self, *, prompts, sampling, lora=None, add_special_tokens=True):
        DetEngine.generated += len(prompts)
        out = []
        for p in prompts:
            h = hashlib.sha256(f"{self.alpha}|{p}".encode()).digest()
            out.append([Sample(0, tuple(h[:1 + h[0] % 7]), f"so \\boxed{{{h[1] % 10}}}", "stop")])
        return out

    def close(self):
        pass


def _pool(monkeypatch, *, die_in: str | None = None) -> dict:
    """The Ray pool replaced by two in-process actors taking units in turn; the actor that takes `die_in`
    first dies after one batch (its engine raises) and the unit goes back to the queue."""
    from tvtool.evaluation import cluster

    seen = {}

    def run_units(*, plan, job, executor, progress=True, on_start=None, actor_cls=cluster.EngineActor):
        res = cluster.PoolResult(plan=plan)
        actors = [actor_cls(pickle.loads(pickle.dumps(job)), i, None) for i in range(2)]
        for a in actors:
            a.engine = DetEngine(job.engine)
        queue, turn = list(plan.units), 0
        while queue:
            unit, actor = queue.pop(0), actors[turn % 2]
            turn += 1
            if unit.name == die_in and unit.name not in res.attempts:
                actor.engine = Flaky(actor.engine, ok=1)
                with pytest.raises(Crash):
                    actor.run(pickle.loads(pickle.dumps(unit)))
                res.attempts[unit.name], res.actor_deaths = 1, res.actor_deaths + 1
                actor.engine = DetEngine(job.engine)  # a replacement actor: a fresh engine
                queue.insert(0, unit)
                continue
            res.values[unit.name] = actor.run(pickle.loads(pickle.dumps(unit)))
            res.done.append(unit.name)
        seen["plan"], seen["res"] = plan, res
        return res

    monkeypatch.setattr(cluster, "run_units", run_units)
    return seen


def test_shards_cover_every_problem_once_longest_first():
    runs = sweep_runs(output="/o", source=SOURCE, alphas=ALPHAS, datasets=[(OPTS, SAMPLING)], prompt=PROMPT)
    plan = plan_units(runs=runs, engines=2, shard=3, complete=lambda r: False)
    assert [u.name for u in plan.units][:5] == ["alpha-1/toy[0:3]", "alpha-1/toy[3:6]", "alpha-1/toy[6:9]",
                                                "alpha-1/toy[9:10]", "alpha-0.5/toy[0:3]"]
    for r in runs:
        mine = sorted(u.shard for u in plan.units if u.runs[0] is r)
        assert [i for s, e in mine for i in range(s, e)] == list(range(10))
    auto = plan_units(runs=runs, engines=8, complete=lambda r: False)  # fewer runs than engines: shards
    assert all(u.shard for u in auto.units) and len(auto.units) == 15  # about 2 per engine: 5 per run
    assert plan_units(runs=runs, engines=2, complete=lambda r: False).units[0].shard is None  # as before


def test_two_actors_with_shards_equal_one_engine_and_a_killed_shard_is_retried(tmp_path, monkeypatch):
    from tvtool.evaluation import evaluate as ev_mod
    from tvtool.evaluation.cluster import evaluate_on_ray
    from tvtool.evaluation.evaluate import evaluate

    monkeypatch.setattr(ev_mod.Engine, "for_source", DetEngine.for_source)
    common = dict(source=SOURCE, alphas=ALPHAS, options=OPTS, prompt=PROMPT, sampling=SAMPLING)
    DetEngine.generated = 0
    ref = evaluate(output=tmp_path / "one", **common)
    assert DetEngine.generated == 30

    seen = _pool(monkeypatch, die_in="alpha-0.5/toy[3:6]")
    DetEngine.generated = 0
    res = evaluate_on_ray(output=tmp_path / "ray", executor=RayOptions(engines=2, shard=3), progress=False, **common)
    assert DetEngine.generated == 30  # the retried shard resumed: nothing generated twice
    assert seen["res"].attempts == {"alpha-0.5/toy[3:6]": 1} and len(seen["plan"].units) == 12
    for a in ALPHAS:
        one, ray = (tmp_path / w / f"alpha-{a:g}" / "toy" for w in ("one", "ray"))
        assert (ray / SAMPLES).read_bytes() == (one / SAMPLES).read_bytes(), a
        assert json.loads((ray / SUMMARY).read_text()) == json.loads((one / SUMMARY).read_text())
        r1, r2 = (json.loads((f / RUN).read_text()) for f in (one, ray))
        assert r2[RECORD_KEY] == r1[RECORD_KEY] and r2["settings"] == r1["settings"] and "finished" in r2
        assert not (ray / SHARDS).exists()
        shards = r2["load"]["shards"]
        assert [s["problems"] for s in shards] == [[0, 3], [3, 6], [6, 9], [9, 10]]
        assert {s["engine"] for s in shards} == {0, 1} and {s["path"] for s in shards} <= {"resident", "held"}
    assert [r.summary for r in res.results[0].runs] == [r.summary for r in ref.runs]
    assert (tmp_path / "ray" / "summary-toy.md").read_text() == (tmp_path / "one" / "summary-toy.md").read_text()

    # a finished re-run plans nothing; one engine resuming the Ray folders generates nothing
    DetEngine.generated = 0
    again = evaluate_on_ray(output=tmp_path / "ray", executor=RayOptions(engines=2, shard=3), progress=False, **common)
    assert again.pool.plan.units == () and DetEngine.generated == 0
    evaluate(output=tmp_path / "ray", **common)
    assert DetEngine.generated == 0


def test_one_engine_resumes_a_run_left_in_shards(tmp_path, monkeypatch):
    """A pool killed before merging: the shard files are merged by the next run, not regenerated."""
    from tvtool.evaluation import evaluate as ev_mod
    from tvtool.evaluation.cluster import evaluate_on_ray
    from tvtool.evaluation.evaluate import evaluate

    monkeypatch.setattr(ev_mod.Engine, "for_source", DetEngine.for_source)
    common = dict(source=SOURCE, alphas=(0.5,), options=OPTS, prompt=PROMPT, sampling=SAMPLING)
    evaluate(output=tmp_path / "one", **common)
    _pool(monkeypatch)
    from tvtool.evaluation import cluster

    monkeypatch.setattr(cluster, "_finish_shards", lambda *a: None)  # killed before the merge
    evaluate_on_ray(output=tmp_path / "ray", executor=RayOptions(engines=2, shard=4), progress=False, **common)
    run = tmp_path / "ray" / "alpha-0.5" / "toy"
    assert len(list((run / SHARDS).glob("*.jsonl"))) == 3 and "finished" not in json.loads((run / RUN).read_text())
    DetEngine.generated = 0
    evaluate(output=tmp_path / "ray", **common)
    assert DetEngine.generated == 0 and not (run / SHARDS).exists()
    assert (run / SAMPLES).read_bytes() == (tmp_path / "one" / "alpha-0.5" / "toy" / SAMPLES).read_bytes()
