"""Planning an α × dataset sweep for a pool of engines: runs → units, longest first, finished runs skipped.

Pure functions, no Ray and no engine: the plan is made (and finished work skipped) before any
actor starts, so a finished re-run costs neither an engine nor a Ray cluster.

- A *run* (`RunSpec`) is one α on one dataset, written to the same resumable folder the one-engine
  path writes: `<output>/alpha-<a>/<dataset>/` (samples.jsonl, summary.json, run.json).
- A *unit* (`Unit`) is what one engine does in one go: one configuration (α, or an operator at α: one
  run folder name) for all its datasets (the engine loads θ1 + α·Δ, or θ1 + α·M, once), or one
  configuration on one dataset when there are fewer configurations than engines, or a shard of one
  run's problems (α, dataset, problems [start, stop)) when there are fewer runs than engines or
  `RayOptions.shard` asks for it (`per="auto"`): with the resident swap an engine switches α in memory,
  so a unit can be that small; shards land in the run's folder (`tvtool.evaluation.shards`).
- Order: longest expected work first, so that the last unit to finish is a short one:
  α descending (a larger α gives longer chains, CoT-Valve Fig. 3), then the hardest set first by
  `HARDNESS` (answer kind: MATH-500 > GSM8K > ASDiv; chains grow with difficulty), then by expected
  tokens = problems × samples × max_tokens (the budget a run may spend), then by name.
- A run is skipped when `complete(run)` says so. The default, `settings_complete`, is the one-engine
  path's pre-check (`tvtool.evaluation.runs.is_complete`: run.json holds this run's finished-work record,
  `runs.run_record`, and samples.jsonl every sample); pass another callable to change it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

from tvtool.evaluation.data import ProblemSet, load_problems
from tvtool.engine.engine import shell_files
from tvtool.engine.options import EngineOptions, SamplingOptions, sampling_record
from tvtool.errors import OptionsError
from tvtool.engine.engine import sweep_model
from tvtool.evaluation.runs import run_params
from tvtool.io.layout import dataset_dir
from tvtool.merge.config import MergeConfig
from tvtool.merge.options import config_name
from tvtool.options import opt
from tvtool.engine.prompting import PromptOptions
from tvtool.evaluation.runs import EvalOptions, check_reading, is_complete, run_record, run_settings
from tvtool.vectors.source import DeltaSource

HARDNESS = {"math500": 2, "gsm8k": 1, "asdiv": 0}  # by answer kind; unknown kinds count as gsm8k


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray sweep runs (`--ray [ADDRESS]`; recipe `executor: {ray: {...}}`)."""

    address: str = opt("local", "Ray address: local (ray.init(): RAY_ADDRESS, a running local cluster, or a new "
                                "one), auto, or host:port / ray://host:port.")
    engines: int = opt(2, "Engines in the pool (Ray actors), each holding one vLLM engine.")
    gpus_per_engine: float | None = opt(None, "GPUs per engine (default: tensor × pipeline parallel size when the "
                                              "cluster has GPUs, else 0).")
    cpus_per_engine: float = opt(1, "CPUs per engine; on CPU the engine's threads are bound to as many distinct "
                                    "cores.")
    retries: int = opt(2, "Retries of a unit whose engine process died (OOM, node lost, kill).", flag="--ray-retries")
    cpu_bind: Literal["auto", "nobind"] = opt("auto", "CPU build: auto = a distinct core list per engine (cores "
                                                      "i·c … i·c+c−1 of the node), nobind = no binding.")
    shard: int | None = opt(None, "Problems per unit: cut each run (one α on one dataset) into shards of this many "
                                  "problems, taken longest first by engines that switch α in place (default: "
                                  "shards only when there are fewer runs than engines, about 2 units per engine).")


@dataclass(frozen=True, eq=False)
class RunSpec:
    """One α on one dataset: what `runs.run_one` needs, and what its run.json will record (plain data,
    pickled to the actors: the problems travel with it, so nodes need no dataset access)."""

    folder: str  # <output>/<alpha-a | operator tag-alpha-a>/<dataset> (`merge_options.config_name`)
    source: DeltaSource = field(repr=False)
    config: MergeConfig  # α, the tensors it applies to, and the merge operator (plain data)
    options: EvalOptions = field(repr=False)  # dataset, split, limit, seed, kind, batch_size, score, …
    sampling: SamplingOptions = field(repr=False)
    problems: ProblemSet = field(repr=False)
    model: dict = field(repr=False)  # run.json's settings.model (`evaluate.sweep_model`)
    settings: dict = field(repr=False)  # the settings run.json records (`runs.run_settings`)
    params_b: float | None = None
    params_source: str = "counted"
    weights: dict | None = field(default=None, repr=False)  # the weights' content (`runs.run_record`)
    record: dict = field(default_factory=dict, repr=False)  # the finished-work record run.json holds

    @property
    def alpha(self) -> float:
        return self.config.alpha

    @property
    def label(self) -> str:
        return Path(self.folder).parent.name  # alpha-<a>, or <operator tag>-alpha-<a>

    @property
    def name(self) -> str:
        return f"{self.label}/{Path(self.folder).name}"

    @property
    def expected_tokens(self) -> int:
        return len(self.problems) * self.sampling.n * self.sampling.max_tokens

    @property
    def hardness(self) -> int:
        return HARDNESS.get(self.problems.kind, HARDNESS["gsm8k"])


@dataclass(frozen=True, eq=False)
class Unit:
    """Work for one engine in one go: one configuration (run folder name), its runs hardest first; or
    problems [start, stop) of one run (`shard`)."""

    name: str
    alpha: float
    runs: tuple[RunSpec, ...]
    shard: tuple[int, int] | None = None

    @property
    def expected_tokens(self) -> int:
        if self.shard is not None:
            r = self.runs[0]
            return (self.shard[1] - self.shard[0]) * r.sampling.n * r.sampling.max_tokens
        return sum(r.expected_tokens for r in self.runs)


@dataclass(frozen=True)
class Plan:
    units: tuple[Unit, ...]  # to do, longest first
    skipped: tuple[RunSpec, ...]  # complete already
    runs: tuple[RunSpec, ...] = field(default=(), repr=False)  # every run, in the one-engine path's order (for reports)


Complete = Callable[[RunSpec], bool]


def settings_complete(run: RunSpec) -> bool:
    """The one-engine path's rule (`runs.is_complete`): run.json holds this run's record (the same
    fingerprint) and samples.jsonl has every (problem, sample index); the summary is rebuilt from the samples."""
    return is_complete(folder=run.folder, record=run.record, problems=run.problems, n=run.sampling.n)


SHARDS_PER_ENGINE = 2  # automatic shards: about this many units per engine


def plan_units(*, runs: Sequence[RunSpec], engines: int = 1,
               per: Literal["auto", "alpha", "run", "shard"] = "auto", shard: int | None = None,
               complete: Complete = settings_complete) -> Plan:
    """Cut `runs` into units (longest first), leaving out the complete ones; see the module doc. `shard`:
    problems per shard (`per="shard"`; by default sized for about `SHARDS_PER_ENGINE` units per engine)."""
    if engines < 1:
        raise OptionsError(f"engines must be at least 1, got {engines}", where="--engines")
    if shard is not None and shard < 1:
        raise OptionsError(f"a shard needs at least one problem, got {shard}", where="--shard")
    todo = [r for r in runs if not complete(r)]
    skipped = tuple(r for r in runs if r not in todo)
    labels = list(dict.fromkeys(r.label for r in todo))  # one per α (and operator): one weight load each
    if per == "auto":
        per = "shard" if shard is not None or len(todo) < engines else "alpha" if len(labels) >= engines else "run"
    hard_first = lambda r: (-r.hardness, -r.expected_tokens, r.name)  # noqa: E731
    if per == "alpha":
        units = []
        for lab in labels:
            mine = tuple(sorted((r for r in todo if r.label == lab), key=hard_first))
            units.append(Unit(lab, mine[0].alpha, mine))
    elif per == "run":
        units = [Unit(r.name, r.alpha, (r,)) for r in todo]
    elif per == "shard":
        units = [u for r in todo for u in _shards(r, shard, engines, sum(x.expected_tokens for x in todo))]
    else:
        raise OptionsError(f"unknown unit granularity {per!r}", where="plan_units(per=...)",
                           fix="use auto, alpha, run or shard")
    units.sort(key=lambda u: (-u.alpha, -max(r.hardness for r in u.runs), -u.expected_tokens, u.name))
    return Plan(tuple(units), skipped, tuple(runs))


def _shards(run: RunSpec, size: int | None, engines: int, total_tokens: int) -> list[Unit]:
    """`run`'s problems in shards of `size` (default: its share of SHARDS_PER_ENGINE units per engine)."""
    n = len(run.problems)
    if size is None:
        k = max(1, round(SHARDS_PER_ENGINE * engines * run.expected_tokens / max(1, total_tokens)))
        size = -(-n // k)
    return [Unit(f"{run.name}[{s}:{min(n, s + size)}]", run.alpha, (run,), (s, min(n, s + size)))
            for s in range(0, n, max(1, size))]


def sweep_runs(*, output: str | os.PathLike, source: DeltaSource, alphas: Sequence[float],
               datasets: Sequence[tuple[EvalOptions, SamplingOptions]], prompt: PromptOptions,
               engine_options: EngineOptions = EngineOptions(),
               configs: Sequence[MergeConfig] | None = None) -> list[RunSpec]:
    """The runs of an α sweep, in the one-engine path's order (dataset, then α as given), with the
    folders, settings and parameter counts `evaluate` gives them.

    `datasets`: (EvalOptions, SamplingOptions) per dataset. `configs` (merge operators, several task
    vectors: `source.more`) replace `alphas` and each dataset's include/exclude, as in `evaluate`. The
    settings record the shell-model folder's generation_config.json as not applied, as an engine made
    by `Engine.for_source` does."""
    if configs is not None:
        alphas = [c.alpha for c in configs]
    if not alphas:
        raise OptionsError("a Ray sweep needs --base, one of --delta|--reasoner, and --alpha",
                           fix="pass them (checkpoint, --model and --lora evaluations run on one engine)")
    out = Path(output)
    shell = shell_files(source=source)  # what each actor's engine starts from (not written: read from here)
    records = [sampling_record(files=shell, sampling=sampling) for _, sampling in datasets]
    runs, fingerprint = [], source.fingerprint_record()
    for (o, sampling), rec in zip(datasets, records):
        problems = load_problems(dataset=o.dataset, split=o.split, limit=o.limit, seed=o.seed, kind=o.kind)
        check_reading(o, problems)
        params_b, params_source = run_params(o, source.base)
        for config in (dict.fromkeys(configs) if configs is not None else
                       [MergeConfig(a, o.include, o.exclude) for a in dict.fromkeys(float(x) for x in alphas)]):
            model = sweep_model(source=source, config=config)
            settings = run_settings(engine=None, problems=problems, model=model, lora=None, prompt=prompt,
                                    sampling=sampling, options=o, sampling_record=rec)
            weights = {"source": fingerprint, "merge": config.record()}
            record = run_record(engine=None, problems=problems, model=model, lora=None, prompt=prompt,
                                sampling=sampling, options=o, weights=weights, sampling_record=rec,
                                engine_options=engine_options)
            runs.append(RunSpec(folder=str(out / config_name(config) / dataset_dir(problems.name)), source=source,
                                config=config, options=o, sampling=sampling, problems=problems, model=model,
                                settings=settings, params_b=params_b, params_source=params_source,
                                weights=weights, record=record))
    return runs
