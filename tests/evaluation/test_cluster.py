"""An α sweep on a local Ray cluster (2 CPUs, 2 actors): units are shards of each run's problems, each actor
switches α in place with the resident swap; same records and table as one engine, survives a kill.

Slow: a Ray start (~5-8 s) and, for the vLLM test, three engine starts in actors plus one reference engine.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tvtool.evaluation.data import Problem, ProblemSet
from tvtool.engine.engine import Engine
from tvtool.engine.options import EngineOptions, SamplingOptions
from tvtool.evaluation.evaluate import evaluate
from tvtool.io.layout import RUN, SAMPLES, SHARDS
from tvtool.merge.config import MergeConfig
from tvtool.engine.prompting import PromptOptions
from tvtool.evaluation.results import read_samples
from tvtool.evaluation.runs import EvalOptions
from tvtool.vectors.source import DeltaSource
from tvtool.evaluation.units import RayOptions, RunSpec, plan_units

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "tvtool" / "assets" / "toy"
ALPHAS = (0.0, 0.5, 1.0)
LIMIT, BATCH, SHARD = 24, 4, 8
PROMPT = PromptOptions(instruction="")
SAMPLING = SamplingOptions(max_tokens=120)
ENGINE = EngineOptions(dtype="float32", max_model_len=256, cpu_kv_cache_gb=1, enforce_eager=True)
SOURCE = DeltaSource(base=str(TOY / "base"), reasoner=str(TOY / "reasoner"))


@pytest.fixture(scope="module")
def local_ray():
    """ray.init(num_cpus=2); workers inherit PYTHONPATH, so they import this checkout, tests/ and this test module
    (FakeActor is pickled by reference to it)."""
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(Path(__file__).parent),
                                                os.environ.get("PYTHONPATH", "")])
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


class FakeActor:
    """The actor interface without vLLM: α = 9 always dies, α = 5 dies on its first try."""

    def __init__(self, job, slot, cores):
        self.out, self.slot = Path(job.output), slot

    def start(self) -> dict:
        return {"slot": self.slot, "node": "n", "pid": os.getpid(), "vllm_pids": [], "start_s": 0.0}

    def run(self, unit):
        first = self.out / f"tried-{unit.name}"
        if unit.alpha == 9 or (unit.alpha == 5 and not first.exists()):
            first.touch()
            os._exit(1)  # the process dies, as with an OOM kill
        (self.out / f"done-{unit.name}").touch()
        return []

    def close(self) -> None:
        pass


def _spec(alpha: float) -> RunSpec:
    problems = ProblemSet(name="toy", kind="gsm8k", source="toy", split="test", excluded={}, description="",
                          problems=(Problem(id="a", question="q", gold="1"),))
    return RunSpec(folder=f"/x/alpha-{alpha:g}/toy", source=SOURCE, config=MergeConfig(alpha), options=EvalOptions(),
                   sampling=SamplingOptions(), problems=problems, model={}, settings={})


def test_dead_actors_are_replaced_and_a_failing_unit_is_named(local_ray, tmp_path):
    from tvtool.evaluation.cluster import Job, run_units

    plan = plan_units(runs=[_spec(a) for a in (1, 5, 9, 2, 3)], engines=2, complete=lambda r: False)
    job = Job(source=SOURCE, output=str(tmp_path), engine=ENGINE, prompt=PROMPT)
    res = run_units(plan=plan, job=job, executor=RayOptions(engines=2, retries=2), actor_cls=FakeActor,
                    progress=False)
    assert set(res.done) == {"alpha-1", "alpha-2", "alpha-3", "alpha-5"}
    assert list(res.failed) == ["alpha-9"] and "ActorDied" in res.failed["alpha-9"]
    assert res.attempts == {"alpha-9": 3, "alpha-5": 1}  # 1 try + 2 retries; 1 death then success
    assert res.actor_deaths == 4 and res.spawned == 2 + 4  # every dead actor was replaced
    assert 4 <= res.engine_starts <= res.spawned  # (the last replacement may still be starting at the end)
    assert sorted(p.name for p in tmp_path.glob("done-*")) == ["done-alpha-1", "done-alpha-2", "done-alpha-3",
                                                              "done-alpha-5"]
    assert ray.is_initialized()  # a cluster the caller started is left running


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_mid_unit(actors: list[dict], folders: list[Path], killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the actor that holds a shard's samples open once that file has some, not all, samples."""
    while not stop.is_set() and not killed:
        for f in (x for folder in folders for x in (folder / SHARDS).glob("*.jsonl")):
            n = len(read_samples(f))
            if not BATCH <= n < SHARD:
                continue
            for a in list(actors):
                fds = Path(f"/proc/{a['pid']}/fd")
                try:
                    if any(os.readlink(x) == str(f) for x in fds.iterdir()):
                        os.kill(a["pid"], signal.SIGKILL)
                        killed.append(a["pid"])
                        return
                except OSError:
                    continue
        time.sleep(0.05)


@pytest.mark.vllm
def test_ray_sweep_equals_one_engine_and_survives_a_kill(local_ray, tmp_path):
    from tvtool.engine.reaper import descendants
    from tvtool.evaluation.cluster import evaluate_on_ray

    before = set(descendants(os.getpid()))  # engines other tests of this session hold (their fixtures close them)
    opts = EvalOptions(dataset="toy", limit=LIMIT, batch_size=BATCH, progress=False)
    common = dict(source=SOURCE, alphas=ALPHAS, options=opts, prompt=PROMPT,
                  sampling=SAMPLING, engine_options=ENGINE)
    ref = evaluate(output=tmp_path / "local", **common)  # the one-engine `tvtool eval`, closed on return

    out = tmp_path / "ray"
    actors, killed, stop = [], [], threading.Event()
    folders = [out / f"alpha-{a:g}" / "toy" for a in ALPHAS]
    watcher = threading.Thread(target=_kill_mid_unit, args=(actors, folders, killed, stop), daemon=True)
    watcher.start()
    try:
        res = evaluate_on_ray(output=out, executor=RayOptions(engines=2, retries=2, shard=SHARD),
                              on_start=actors.append, progress=False, **common)
    finally:
        stop.set()
    assert len(killed) == 1, "the kill did not land mid-unit"
    pool = res.pool
    assert pool.actor_deaths == 1 and pool.spawned == 3 and 2 <= pool.engine_starts <= 3 and not pool.failed
    assert sorted(pool.done) == sorted(f"alpha-{a:g}/toy[{s}:{s + SHARD}]" for a in ALPHAS for s in (0, 8, 16))
    assert sum(pool.attempts.values()) == 1
    binds = {a["slot"]: a["bind"] for a in pool.actors}  # a replacement takes its slot's cores
    assert len(binds) == 2 and len(set(binds.values())) == 2  # distinct core lists per slot

    # the same records (token ids, in the same order) and the same table as one engine; nothing lost or duplicated
    loads = []
    for f, a in zip(folders, ALPHAS):
        mine = read_samples(f / SAMPLES)
        theirs = read_samples(tmp_path / "local" / f.relative_to(out) / SAMPLES)
        assert len(mine) == LIMIT and len({r["id"] for r in mine}) == LIMIT, a
        assert [(r["id"], r["token_ids"]) for r in mine] == [(r["id"], r["token_ids"]) for r in theirs], a
        run = json.loads((f / RUN).read_text())
        assert run["record"] == json.loads((tmp_path / "local" / f.relative_to(out) / RUN).read_text())["record"]
        loads += run["load"]["shards"]
    # each actor swaps α with the resident swap: it captures once, then sets α from memory, reading nothing
    assert {x["path"] for x in loads} <= {"resident", "held"} and any(x["path"] == "resident" for x in loads)
    later = [x for x in loads if x["path"] == "resident" and not x["captured"]]
    assert later and all(x["bytes_read"] < 1024 for x in later)  # (an eventfd read may count: not an input)
    (ev,) = res.results
    assert [(r.label, r.summary) for r in ev.runs] == [(r.label, r.summary) for r in ref.runs]
    assert (out / "summary-toy.md").read_text() == (tmp_path / "local" / "summary-toy.md").read_text()

    # no vLLM process outlives the sweep: the actors' own and any below this test process
    pids = [p for a in pool.actors for p in a["vllm_pids"]] + [a["pid"] for a in pool.actors]
    deadline = time.time() + 15
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if _alive(p)], [(p, _cmdline(p)) for p in pids if _alive(p)]
    assert not [p for p in set(descendants(os.getpid())) - before
                if "VLLM" in _cmdline(p) or "EngineCore" in _cmdline(p)]

    # either path resumes the other: a finished re-run starts no engine (Ray's or a local one)
    again = evaluate_on_ray(output=out, executor=RayOptions(engines=2), progress=False, **common)
    assert again.pool.engine_starts == 0 and len(again.pool.plan.skipped) == 3
    lazy = Engine.for_source(source=SOURCE, options=ENGINE, lazy=True)
    local = evaluate(output=out, engine=lazy, **common)
    lazy.close()
    assert lazy.starts == 0 and [r.summary for r in local.runs] == [r.summary for r in ref.runs]
