"""`sweep`: the whole CoT-Valve pipeline from one recipe, resumable, with a report.

The stages (`tvtool.sweep.stages`, in pipeline order) run one after the other; each skips its outputs
that are already finished: their record holds the same fingerprint (options + inputs' content,
`tvtool.io.finished`). A changed option or input redoes exactly the stages it reaches, saying so in one
line (a re-run finishes the job; a moved sweep folder still resumes). REPORT.md, report.json and the
plots are rebuilt from the records every time, before the stages that publish (push, serve).

Nothing is written before the run is known to be possible: the output is checked apart from every input
the stages read, and each stage refuses what it cannot do, first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from tvtool.io.atomic import discard, write_text
from tvtool.io.lock import output_lock
from tvtool.io.paths import check_output_apart
from tvtool.merge.finite import check_alphas
from tvtool.options import CliOptions, opt
from tvtool.sweep.recipe import Recipe, load_recipe, portable, to_dict
from tvtool.sweep.report import write_report
from tvtool.sweep.spec import merge_configs
from tvtool.sweep.stage import Stage, SweepState
from tvtool.sweep.stages import STAGES
from tvtool.vectors.source import DeltaSource


@dataclass(frozen=True)
class SweepOptions(CliOptions):
    output: str | None = opt(None, "Output folder (default: the recipe's `output`).", short="-o")
    alphas: tuple[float, ...] = opt((), "Override the recipe's α list (repeat or comma-separate).", flag="--alpha")
    limit: int | None = opt(None, "Override every dataset's limit (a quick look).")
    overwrite: bool = opt(False, "Discard the results of every stage in the output folder and redo them.")
    progress: bool = opt(True, "Show progress bars.")
    verbose: bool = opt(False, "Show vLLM's own logs (default: written to <output>/eval/vllm.log).")
    ray: str | None = opt(None, "Evaluate on a Ray cluster at this address (local: start one); the pool "
                                "size comes from the recipe's executor.ray.")


@dataclass(frozen=True)
class SweepResult:
    output: Path
    report: Path
    tables: dict[str, list[dict]]
    engine_starts: int

    def summary(self) -> str:
        return (self.report.read_text().split("## Recipe")[0].strip()
                + f"\n\nreport: {self.report}  (engine starts: {self.engine_starts})")


def sweep(*, recipe: str | os.PathLike | Recipe, options: SweepOptions = SweepOptions()) -> SweepResult:
    """Run (or finish) every stage of `recipe`; returns where the report is."""
    path = None if isinstance(recipe, Recipe) else Path(recipe)
    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if options.alphas:
        r = r.model_copy(update={"alphas": options.alphas,
                                 "merge": tuple(replace(m, alphas=()) for m in r.merge)})
    if options.limit is not None:
        r = r.model_copy(update={"datasets": tuple(replace(d, limit=options.limit) for d in r.datasets)})
    alphas = tuple(dict.fromkeys(r.alphas))
    check_alphas(alphas, where=f"alphas in {path}" if path else "alphas")
    out = Path(options.output or r.output.format(name=r.name))
    todo = [s for s in STAGES if s.runs(r)]
    # --- before anything is written: the output apart from every input, and what each stage refuses ---
    check_output_apart(out, [p for s in todo for p in s.inputs(r)], flag="-o" if options.output else "output")
    state = SweepState(recipe=r, recipe_path=path, out=out, alphas=alphas, progress=options.progress,
                       verbose=options.verbose, ray=options.ray, configs=merge_configs(r),  # plain θ1 + α·Δ without `merge:`
                       source=DeltaSource(base=r.base, reasoner=r.reasoner, more=tuple(v.model for v in r.vectors[1:]),
                                          vocab=r.materialize.vocab))  # the recipe's vocab policy, swap and materialize
    for s in todo:
        s.check(state)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        if options.overwrite:
            for folder in (f for s in STAGES for f in s.folders):
                discard(out / folder)
        write_text(out / "recipe.yaml", yaml.safe_dump(to_dict(portable(r, out)), sort_keys=False,
                                                       allow_unicode=True))
        report = _run(state, todo)
    return SweepResult(out, report, state.tables, state.engine_starts)


def _run(state: SweepState, todo: list[Stage]) -> Path:
    """Each stage in order; a shared engine is closed after the last stage that uses it; the report is
    written after the stages that make results and before those that publish them."""
    last = {key: s for s in todo for key in s.engines}  # the last stage (of this run) using each shared engine
    report = None
    try:
        for s in todo:
            if s.publish and report is None:
                report = write_report(state=state, stages=todo)
            s.run(state)
            for key in [k for k, user in last.items() if user is s]:
                state.release(key)
        return report or write_report(state=state, stages=todo)
    finally:
        state.release_all()


__all__ = ["SweepOptions", "SweepResult", "sweep"]
