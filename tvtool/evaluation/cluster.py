"""An α × dataset sweep on a Ray cluster: a pool of actors, each holding ONE tvtool engine.

Plain `@ray.remote` actors, not Ray Data LLM: Ray Data builds its own vLLM engine per stage and
cannot swap θ1 + α·Δ in place; here each actor starts one `Engine` (placeholder weights) and
loads each α in place, as the one-engine path does (its shell model is written on its own node by
`Engine.for_source`, and removed when the engine closes).

- The plan (`tvtool.evaluation.units`) is made before Ray starts; a finished re-run starts no engine and no Ray.
- Units are pulled from a queue as actors free up (`ray.wait` on their futures), longest first. A unit is
  an α (all datasets), a run, or a shard of a run's problems (`tvtool.evaluation.shards`): each engine
  switches α in place, resident after its first α; a run's shards are merged into its folder, in the
  one-engine order, when all are done, and the run finished as one engine finishes it.
- Each actor does what the one-engine path does per run: `Engine.load_alpha(source, config)` (a
  `DeltaSource` and a `MergeConfig`, plain data; loaded only if not held; resident in the actor's engine
  after its first α, as on one engine), then `runs.run_one`, into
  the same resumable folder as `tvtool eval`; so a Ray sweep and a local one give the same table and
  can resume each other.
- An actor that dies (OOM, node lost, SIGKILL) is replaced and its unit retried, up to `retries`
  times, resuming from the samples already written; a unit that keeps failing is named in a
  `ClusterError` after the rest has finished.
- Each actor checks at start that it can read the inputs and write the output (multi-node: shared
  storage or Hub ids) and fails fast naming its node. Its vLLM processes are killed by a small
  reaper process when the actor dies, however it dies; Ctrl-C kills every actor.
- CPU build: `VLLM_CPU_OMP_THREADS_BIND` gets a distinct core list per actor (vLLM's default bound two
  engines' workers to the same core), or `nobind`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from tvtool.io.atomic import write_json
from tvtool.engine.engine import Engine, write_shell_model
from tvtool.engine.options import EngineOptions, SamplingOptions, check_engine_options
from tvtool.errors import ClusterError, OptionsError, TvtoolError
from tvtool.evaluation.report import EvalResult, RunResult, table_row
from tvtool.io.layout import RUN, SUMMARY, parse_hub_ref, summary_table
from tvtool.merge.config import MergeConfig
from tvtool.merge.options import MergeOptions
from tvtool.merge.stream import check_configs, check_finite_inputs
from tvtool.engine.prompting import PromptOptions, load_tokenizer
from tvtool.engine.reaper import descendants, reap_actor
from tvtool.evaluation.report import write_table
from tvtool.evaluation.results import summary_of
from tvtool.evaluation.runs import (EvalOptions, begin_run, check_settings, finish_run, merge_shards, read_run,
                                    run_one)
from tvtool.evaluation.shards import generate_shard
from tvtool.vectors.source import DeltaSource
from tvtool.evaluation.units import (Complete, Plan, RayOptions, RunSpec, Unit, plan_units, settings_complete,
                                    sweep_runs)


@dataclass(frozen=True)
class Job:
    """What every engine of the pool shares (plain data, pickled to each actor)."""

    source: DeltaSource  # Δ and θ1: each actor's engine starts from its shell model (`Engine.for_source`)
    output: str  # the output root (checked writable on each node)
    engine: EngineOptions
    prompt: PromptOptions
    seed: int = 0
    cwd: str = field(default_factory=os.getcwd)  # relative paths mean the same on every node


@dataclass
class PoolResult:
    plan: Plan = field(repr=False)
    done: list[str] = field(default_factory=list)  # unit names
    failed: dict[str, str] = field(default_factory=dict)  # unit name -> last error
    attempts: dict[str, int] = field(default_factory=dict)  # unit name -> actor deaths while running it
    actors: list[dict] = field(default_factory=list)  # start info of every actor (node, pid, vllm_pids, start_s)
    actor_deaths: int = 0
    spawned: int = 0  # actors created (a replacement still starting when the work ran out is killed)
    unit_s: dict[str, float] = field(default_factory=dict)  # unit name -> seconds of its last (finished) try
    values: dict[str, object] = field(default_factory=dict)  # unit name -> what its actor returned
    wall_s: float = 0.0

    @property
    def engine_starts(self) -> int:
        return len(self.actors)


# --- the actor ---------------------------------------------------------------------------


class EngineActor:
    """One tvtool `Engine` in a Ray actor; `ray.remote` wraps it at use (importing needs no Ray)."""

    def __init__(self, job: Job, slot: int, cores: str | None):
        self.job, self.slot, self.engine = job, slot, None
        if cores is not None:  # before vLLM reads it at engine start
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cores

    def start(self) -> dict:
        import ray

        t0 = time.perf_counter()
        node = ray.util.get_node_ip_address()
        _check_access(self.job, node)
        me = os.getpid()
        self._reaper = reap_actor(me)  # before vLLM starts: a kill during start-up is covered too
        j = self.job
        self.engine = Engine.for_source(source=j.source, options=j.engine, seed=j.seed)
        reaper = self._reaper.pid if self._reaper else None
        kids = [p for p in descendants(me) if p != reaper]
        return {"slot": self.slot, "node": node, "pid": me, "vllm_pids": kids,
                "bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"), "start_s": time.perf_counter() - t0}

    def run(self, unit: Unit) -> list[str] | dict:
        """The one-engine path's per-run steps: hold θ1 + α·Δ (loaded only if not held), then `run_one`
        (which resumes from the samples already written). A shard: its problems into its shard file;
        returns the load."""
        if unit.shard is not None:
            r = unit.runs[0]
            load = self.engine.load_alpha(source=r.source, config=r.config)
            generate_shard(engine=self.engine, folder=r.folder, problems=r.problems, start=unit.shard[0],
                           stop=unit.shard[1], prompt=self.job.prompt, sampling=r.sampling,
                           options=replace(r.options, progress=False))
            return {"problems": list(unit.shard), "engine": self.slot, **load}
        for r in unit.runs:
            load = self.engine.load_alpha(source=r.source, config=r.config)
            run_one(engine=self.engine, problems=r.problems, folder=r.folder, model=r.model, prompt=self.job.prompt,
                    sampling=r.sampling, options=replace(r.options, progress=False), params_b=r.params_b,
                    params_source=r.params_source, weights=r.weights, load=load)
        return [r.folder for r in unit.runs]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def _check_access(job: Job, node: str) -> None:
    """Fail fast, naming the node, when it cannot read an input or write the output."""
    if Path(job.cwd).is_dir():
        os.chdir(job.cwd)
    for what, p in job.source.describe().items():
        if p is None or (not Path(p).exists() and parse_hub_ref(p) is not None):  # a Hub id: resolved on the node
            continue
        if not os.access(p, os.R_OK):
            raise ClusterError(f"node {node} cannot read the {what} {p}", where=f"node {node}",
                               fix="put models and the output folder on storage every node mounts, or use Hub ids")
    probe = Path(job.output) / f".tvtool-node-check-{node}-{os.getpid()}"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ClusterError(f"node {node} cannot write the output folder {job.output}: {e.strerror}",
                           where=f"node {node}", fix="put the output folder on storage every node mounts") from None


# --- the pool ------------------------------------------------------------------------------


def run_units(*, plan: Plan, job: Job, executor: RayOptions, actor_cls: type = EngineActor,
              on_start: Callable[[dict], None] | None = None, progress: bool = True) -> PoolResult:
    """Run `plan.units` on a pool of `executor.engines` actors; returns what was done and what failed.

    Starts (and stops) a Ray cluster only when Ray is not initialized and there is work.
    `on_start(info)` is called with each actor's start info (node, pid, vllm_pids, start_s)."""
    res = PoolResult(plan=plan)
    if not plan.units:
        return res
    try:
        import ray
        from ray.exceptions import RayActorError, RayTaskError
    except ImportError:
        raise OptionsError("Ray is not installed", where="--ray", fix="pip install 'tvtool[ray]'") from None
    t0 = time.perf_counter()
    own = not ray.is_initialized()
    if own:
        ray.init(address=None if executor.address == "local" else executor.address, include_dashboard=False,
                 logging_level="WARNING", log_to_driver=False)
    from tqdm.auto import tqdm

    remote = ray.remote(actor_cls)
    gpus = _gpus(executor, job, ray)
    n = min(executor.engines, len(plan.units))
    slots: dict[int, object] = {}
    futures: dict[object, tuple[str, int, Unit | None]] = {}
    given: dict[str, float] = {}
    start_deaths: dict[int, int] = {}
    queue = deque(plan.units)
    bar = tqdm(total=len(plan.units), desc="units", unit="unit", disable=not progress)

    def spawn(i: int) -> None:
        cores = None if gpus else _cores(executor, job, i)
        a = remote.options(num_cpus=executor.cpus_per_engine, num_gpus=gpus, max_restarts=0).remote(job, i, cores)
        slots[i] = a
        res.spawned += 1
        futures[a.start.remote()] = ("start", i, None)

    def give(i: int) -> None:
        if queue:
            u = queue.popleft()
            futures[slots[i].run.remote(u)] = ("run", i, u)
            given[u.name] = time.perf_counter()

    try:
        for i in range(n):
            spawn(i)
        while queue or any(k == "run" for k, _, _ in futures.values()):
            if not futures:
                break
            ready, _ = ray.wait(list(futures), num_returns=1)
            kind, i, unit = futures.pop(ready[0])
            try:
                value = ray.get(ready[0])
            except RayActorError as e:  # the process died: OOM, node lost, SIGKILL
                res.actor_deaths += 1
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                if unit is not None:
                    res.attempts[unit.name] = res.attempts.get(unit.name, 0) + 1
                    if res.attempts[unit.name] <= executor.retries:
                        queue.appendleft(unit)  # resumes from the samples already written
                    else:
                        res.failed[unit.name] = why
                        bar.update(1)
                else:
                    start_deaths[i] = start_deaths.get(i, 0) + 1
                if queue and start_deaths.get(i, 0) <= executor.retries:
                    spawn(i)
                continue
            except RayTaskError as e:  # an exception inside the actor: deterministic, not retried
                cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else e
                msg = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
                if kind == "start":
                    raise ClusterError(msg if isinstance(cause, TvtoolError) else f"an engine could not start: {msg}",
                                       where=f"engine {i}") from None
                res.failed[unit.name] = msg
                bar.update(1)
                give(i)
                continue
            if kind == "start":
                res.actors.append(value)
                if on_start is not None:
                    on_start(value)
            else:
                res.done.append(unit.name)
                res.values[unit.name] = value
                res.unit_s[unit.name] = time.perf_counter() - given[unit.name]
                bar.update(1)
            give(i)
        for u in queue:  # no engine could start for these
            res.failed[u.name] = "no engine could start"
        starting = {i for k, i, _ in futures.values() if k == "start"}  # not needed any more: killed
        _close(ray, [a for i, a in slots.items() if i not in starting])
        for i in starting:
            ray.kill(slots[i], no_restart=True)
    except BaseException:  # Ctrl-C or a failed start: stop every actor; reapers stop their vLLM processes
        for a in slots.values():
            ray.kill(a, no_restart=True)
        raise
    finally:
        bar.close()
        if own:
            ray.shutdown()
        res.wall_s = time.perf_counter() - t0
    return res


def _finish_shards(plan: Plan, pool: PoolResult, sharded: dict[str, RunSpec], tokenizer) -> None:
    """Each sharded run whose shards all finished: samples merged in the one-engine order, then finished as one
    engine finishes it, with the shards' loads (`load.shards`) in run.json. Others wait for a re-run."""
    for folder, r in sharded.items():
        units = [u for u in plan.units if u.shard is not None and u.runs[0].folder == folder]
        if any(u.name not in pool.values for u in units):
            continue
        f = Path(folder)
        merge_shards(f, r.problems, r.sampling.n)
        run = {k: v for k, v in json.loads((f / RUN).read_text()).items() if k != "finished"}
        run["load"] = {"shards": sorted((pool.values[u.name] for u in units), key=lambda x: x["problems"])}
        finish_run(folder=f, run=run, problems=r.problems, sampling=r.sampling, options=r.options,
                   params_b=r.params_b, params_source=r.params_source, tokenizer=tokenizer)


def _close(ray, actors: Sequence) -> None:
    refs = [a.close.remote() for a in actors]
    ray.wait(refs, num_returns=len(refs), timeout=120)
    for a in actors:
        ray.kill(a, no_restart=True)


def _gpus(o: RayOptions, job: Job, ray) -> float:
    if o.gpus_per_engine is not None:
        return o.gpus_per_engine
    if ray.cluster_resources().get("GPU", 0) > 0:
        return job.engine.tensor_parallel_size * job.engine.pipeline_parallel_size
    return 0


def _cores(o: RayOptions, job: Job, slot: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for slot `slot`: cores slot·c … slot·c+c−1 (mod the node's cores), split
    over the engine's ranks ('|'-separated lists); or 'nobind'."""
    if o.cpu_bind == "nobind":
        return "nobind"
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    c = max(1, int(o.cpus_per_engine))
    mine = [cores[(slot * c + k) % len(cores)] for k in range(c)]
    ranks = job.engine.tensor_parallel_size * job.engine.pipeline_parallel_size
    per = max(1, len(mine) // ranks)
    return "|".join(",".join(map(str, mine[r * per:(r + 1) * per] or mine[-1:])) for r in range(ranks))


# --- the verb --------------------------------------------------------------------------------


@dataclass
class ClusterEvalResult:
    results: list  # one tvtool.evaluation.evaluate.EvalResult per dataset, runs in the one-engine order
    pool: PoolResult

    def summary(self) -> str:
        p = self.pool
        tail = (f"ray: {len(p.plan.units)} unit(s) run, {len(p.plan.skipped)} run(s) complete already; "
                f"engine starts: {p.engine_starts}, actor deaths: {p.actor_deaths}, {p.wall_s:.0f} s")
        return "\n\n".join([*(r.summary() for r in self.results), tail])


def evaluate_on_ray(*, output: str | os.PathLike, source: DeltaSource | None, alphas: Sequence[float] = (),
                    merge: MergeOptions = MergeOptions(),
                    configs: Sequence[MergeConfig] | None = None,
                    datasets: Sequence[tuple[EvalOptions, SamplingOptions]] | None = None,
                    options: EvalOptions = EvalOptions(), prompt: PromptOptions = PromptOptions(),
                    sampling: SamplingOptions = SamplingOptions(), engine_options: EngineOptions = EngineOptions(),
                    executor: RayOptions = RayOptions(), complete: Complete = settings_complete,
                    progress: bool = True, on_start: Callable[[dict], None] | None = None) -> ClusterEvalResult:
    """An α sweep (one or more datasets) on a Ray pool, into `evaluate`'s folder layout.

    `source` and `alphas` as for `evaluate`, with merge operators as
    `merge` (× `alphas`, `options`' include/exclude) or `configs`; each actor's engine loads the same
    `MergeConfig` the one-engine path loads. `datasets`:
    (EvalOptions, SamplingOptions) per dataset, or the one of `options`/`sampling`. Runs that
    `complete` accepts are skipped before Ray starts; folders holding other settings are refused
    (or, with overwrite, discarded) before any engine starts, as on one engine. Per dataset an
    `EvalResult` (runs in the one-engine order, its summary table written as `evaluate` writes it).
    Raises `ClusterError` naming the failed units after the others finished."""
    if source is None or source.base is None:
        raise OptionsError("an α sweep needs the base model", where="--base", fix="pass --base")
    if configs is None and (replace(merge, weights=()) != MergeOptions() or source.more):  # as `evaluate` makes them
        configs = merge.configs(alphas, include=options.include, exclude=options.exclude)
    if configs is not None:  # operator settings and α rules checked against the vectors before Ray starts
        check_configs(source=source, configs=configs)
    datasets = list(datasets or [(options, sampling)])
    check_engine_options(engine_options)
    runs = sweep_runs(output=output, source=source, alphas=alphas, datasets=datasets, prompt=prompt,
                      engine_options=engine_options, configs=configs)
    plan = plan_units(runs=runs, engines=executor.engines, shard=executor.shard, complete=complete)
    sharded: dict[str, RunSpec] = {}
    for u in plan.units:  # refuse (or discard) other settings' results now, not in an actor
        for r in u.runs:
            check_settings(Path(r.folder), r.record, r.options.overwrite)
            if u.shard is not None and r.folder not in sharded:  # run.json's first form; finished below
                sharded[r.folder] = r
                begin_run(folder=Path(r.folder), settings=r.settings, record=r.record, problems=r.problems,
                          options=r.options, engine_options=engine_options)
    if plan.units:
        Path(output).mkdir(parents=True, exist_ok=True)  # each actor checks it can write here
        check_finite_inputs(source=source, config=plan.units[0].runs[0].config)  # once, here: not in every actor
    job = Job(source=source, output=str(output), engine=engine_options, prompt=prompt,
              seed=datasets[0][1].sample_seed or 0)
    pool = run_units(plan=plan, job=job, executor=executor, progress=progress, on_start=on_start)
    tokenizer = _tokenizer(source) if plan.skipped or sharded else None  # to read answers here, not in actors
    _finish_shards(plan, pool, sharded, tokenizer)
    if pool.failed:
        raise ClusterError(f"{len(pool.failed)} unit(s) failed: "
                           + "; ".join(f"{k}: {v}" for k, v in pool.failed.items()),
                           where=str(output), fix="re-run to retry them (finished runs are kept)")
    results: dict[str, EvalResult] = {}
    for r in runs:  # every run re-summarised from its samples, as `run_one` does for a complete run
        if r in plan.skipped:  # no actor read it: another answer rule or delimiter is applied here
            read_run(folder=r.folder, problems=r.problems, options=r.options, tokenizer=tokenizer)
        summary = summary_of(folder=Path(r.folder), problems=r.problems, n=r.sampling.n, params_b=r.params_b,
                             params_source=r.params_source, difficulty=r.options.difficulty_field)
        write_json(Path(r.folder) / SUMMARY, summary)
        ev = results.setdefault(r.problems.name, EvalResult(engine_starts=pool.engine_starts))
        ev.runs.append(RunResult(r.label, r.alpha, Path(r.folder), summary))
    for name, ev in results.items():
        if len(ev.runs) > 1:
            ev.table = write_table(rows=[table_row(x) for x in ev.runs], folder=output, name=summary_table(name))
    return ClusterEvalResult(list(results.values()), pool)


def _tokenizer(source: DeltaSource):
    """The tokenizer the pool's engines use (their shell model's, `Engine.for_source`), without an engine."""
    with tempfile.TemporaryDirectory(prefix="tvtool-tokenizer-") as shell:
        write_shell_model(source=source, folder=shell)
        return load_tokenizer(shell)
