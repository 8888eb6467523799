"""Planning an α × dataset sweep for a pool of engines: runs → units, longest first, finished runs skipped.

Pure functions, no Ray and no engine: the plan is made (and finished work skipped) before any
actor starts, so a finished re-run costs neither an engine nor a Ray cluster.

- A *run* (`RunSpec`) is one α on one dataset, written to the same resumable folder the one-engine
  path writes: `<output>/alpha-<a>/<dataset>/` (samples.jsonl, summary.json, run.json).
- A *unit* (`Unit`) is what one engine does in one go: one α for all its datasets (the engine loads
  θ1 + α·Δ once), or one α on one dataset when there are fewer α than engines (`per="auto"`).
- Order: longest expected work first, so that the last unit to finish is a short one:
  α descending (a larger α gives longer chains, CoT-Valve Fig. 3), then the hardest set first by
  `HARDNESS` (answer kind: MATH-500 > GSM8K > ASDiv; chains grow with difficulty), then by expected
  tokens = problems × samples × max_tokens (the budget a run may spend), then by name.
- A run is skipped when `complete(run)` says so; the default `settings_complete` is today's
  finished-run rule (run.json with these settings, marked finished; summary.json; every sample).
  Pass another callable (e.g. an input-fingerprint rule) to change it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

from .errors import OptionsError, OutputError
from .options import opt

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


@dataclass(frozen=True, eq=False)
class RunSpec:
    """One α on one dataset: what `evaluate.run_one` needs, and what its run.json will record."""

    alpha: float
    folder: str  # <output>/alpha-<a>/<dataset>
    options: object = field(repr=False)  # tvtool.evaluate.EvalOptions (dataset, split, limit, seed, kind, …)
    sampling: object = field(repr=False)  # tvtool.generate.SamplingOptions
    model: dict = field(repr=False)  # {"base", "delta", "reasoner", "alpha"}: run.json's settings.model
    settings: dict = field(repr=False)  # the settings run.json records (tvtool.evaluate.run_settings)
    ids: tuple[str, ...] = field(repr=False)  # problem ids, in order
    kind: str = "gsm8k"  # answer kind of the dataset
    params_b: float | None = None
    params_source: str = "counted"

    @property
    def label(self) -> str:
        return Path(self.folder).parent.name  # alpha-<a>

    @property
    def name(self) -> str:
        return f"{self.label}/{Path(self.folder).name}"

    @property
    def expected_tokens(self) -> int:
        return len(self.ids) * self.sampling.n * self.sampling.max_tokens

    @property
    def hardness(self) -> int:
        return HARDNESS.get(self.kind, HARDNESS["gsm8k"])


@dataclass(frozen=True, eq=False)
class Unit:
    """Work for one engine in one go: one α, its runs hardest first."""

    name: str
    alpha: float
    runs: tuple[RunSpec, ...]

    @property
    def expected_tokens(self) -> int:
        return sum(r.expected_tokens for r in self.runs)


@dataclass(frozen=True)
class Plan:
    units: tuple[Unit, ...]  # to do, longest first
    skipped: tuple[RunSpec, ...]  # complete already
    runs: tuple[RunSpec, ...] = field(default=(), repr=False)  # every run, in the one-engine path's order (for reports)


Complete = Callable[[RunSpec], bool]


def settings_complete(run: RunSpec) -> bool:
    """Today's finished-run rule: run.json holds these settings and is marked finished, summary.json
    exists, and samples.jsonl has every (problem, sample index)."""
    from .evaluate import RUN, SAMPLES, SUMMARY, read_samples

    folder = Path(run.folder)
    try:
        rec = json.loads((folder / RUN).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if rec.get("settings") != json.loads(json.dumps(run.settings)) or "finished" not in rec:
        return False
    if not (folder / SUMMARY).is_file():
        return False
    try:
        done = {(r["id"], r["index"]) for r in read_samples(folder / SAMPLES)}
    except OutputError:
        return False
    return all((i, k) in done for i in run.ids for k in range(run.sampling.n))


def plan_units(*, runs: Sequence[RunSpec], engines: int = 1, per: Literal["auto", "alpha", "run"] = "auto",
               complete: Complete = settings_complete) -> Plan:
    """Cut `runs` into units (longest first), leaving out the complete ones; see the module doc."""
    if engines < 1:
        raise OptionsError(f"engines must be at least 1, got {engines}", where="--engines")
    todo = [r for r in runs if not complete(r)]
    skipped = tuple(r for r in runs if r not in todo)
    alphas = list(dict.fromkeys(r.alpha for r in todo))
    if per == "auto":
        per = "alpha" if len(alphas) >= engines else "run"
    hard_first = lambda r: (-r.hardness, -r.expected_tokens, r.name)  # noqa: E731
    if per == "alpha":
        units = [Unit(f"alpha-{_fmt(a)}", a, tuple(sorted((r for r in todo if r.alpha == a), key=hard_first)))
                 for a in alphas]
    elif per == "run":
        units = [Unit(r.name, r.alpha, (r,)) for r in todo]
    else:
        raise OptionsError(f"unknown unit granularity {per!r}", where="plan_units(per=...)", fix="use auto, alpha or run")
    units.sort(key=lambda u: (-u.alpha, -max(r.hardness for r in u.runs), -u.expected_tokens, u.name))
    return Plan(tuple(units), skipped, tuple(runs))


def sweep_runs(*, output: str | os.PathLike, base: str | os.PathLike, alphas: Sequence[float],
               datasets: Sequence[tuple[object, object]], prompt: object,
               delta: str | os.PathLike | None = None, reasoner: str | os.PathLike | None = None) -> list[RunSpec]:
    """The runs of an α sweep, in the one-engine path's order (dataset, then α as given).

    `datasets`: (EvalOptions, SamplingOptions) per dataset. Writes the weightless engine folder
    `<output>/.engine-model` (as `evaluate` does), whose generation_config.json run.json records."""
    from .data import load_problems
    from .evaluate import _safe, count_params_b, run_settings
    from .generate import sampling_record, shell_model
    from .materialize import format_alpha

    if (delta is None) == (reasoner is None) or not alphas:
        raise OptionsError("a Ray sweep needs --base, one of --delta|--reasoner, and --alpha",
                           fix="pass them (checkpoint, --model and --lora evaluations run on one engine)")
    out = Path(output)
    shell = shell_model(base=base, delta=delta, reasoner=reasoner, folder=out / ".engine-model")
    runs, params = [], None
    for o, sampling in datasets:
        problems = load_problems(dataset=o.dataset, split=o.split, limit=o.limit, seed=o.seed, kind=o.kind)
        if o.params_b:
            pb, src = o.params_b, "nominal"
        else:
            params = params if params is not None else count_params_b(base)
            pb, src = params, "counted"
        rec = sampling_record(model_dir=shell, sampling=sampling)
        for a in dict.fromkeys(float(x) for x in alphas):
            m = {"base": str(base), "delta": str(delta) if delta else None,
                 "reasoner": str(reasoner) if reasoner else None, "alpha": a}
            settings = run_settings(problems=problems, model=m, prompt=prompt, sampling_record=rec, score=o.score)
            runs.append(RunSpec(alpha=a, folder=str(out / f"alpha-{format_alpha(a)}" / _safe(problems.name)),
                                options=o, sampling=sampling, model=m, settings=settings,
                                ids=tuple(p.id for p in problems), kind=problems.kind, params_b=pb,
                                params_source=src))
    return runs


def _fmt(a: float) -> str:
    from .materialize import format_alpha

    return format_alpha(a)
