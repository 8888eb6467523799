"""`sweep`: the whole CoT-Valve pipeline from one recipe, resumable, with a report.

The stages (`tvtool.sweep.stages`, in pipeline order) run one after the other; each skips its outputs
that are already finished: their record holds the same fingerprint (options + inputs' content,
`tvtool.io.finished`). A changed option or input redoes exactly the stages it reaches, saying so in one
line (a re-run finishes the job; a moved sweep folder still resumes). REPORT.md, report.json and the
plots are rebuilt from the records every time, before the stages that publish (push, serve).

REPORT.md: what was swept, the stages' headlines (Table 1 for CoT-Valve recipes), one table and plot per
dataset (#tokens vs α; accuracy vs #tokens), the stages' notes (low rank, serve), how to reproduce it (the
sweep, then each stage's exact commands, from the recipe's folder), the recipe, and the versions used.
Local paths are named relative to the recipe: a committed report carries no machine paths.

Nothing is written before the run is known to be possible: the output is checked apart from every input
the stages read, and each stage refuses what it cannot do, first.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import yaml

from tvtool._version import __version__
from tvtool.engine.options import vllm_version
from tvtool.evaluation.report import answer_rule_line, decoding_line, level_section, markdown_table, plot, reading_notes
from tvtool.evaluation.results import ACU_FORMULA
from tvtool.io.atomic import discard, write_bytes, write_json, write_text
from tvtool.io.lock import output_lock
from tvtool.io.paths import check_output_apart
from tvtool.io.finite import check_alphas
from tvtool.errors import TvtoolError
from tvtool.options import CliOptions, opt
from tvtool.sweep.planning import PlanContext, StagePlan, Status, SweepPlan, SweepPlanOptions, machine
from tvtool.sweep.recipe import Recipe, load_recipe, portable, to_dict
from tvtool.sweep.spec import delta_source, merge_configs
from tvtool.sweep.stage import Stage, SweepState
from tvtool.sweep.stages import STAGES
from tvtool.sweep.words import sh, short


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
    state, todo = prepare(recipe=recipe, options=options)
    r, out = state.recipe, state.out
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        if options.overwrite:
            for folder in (f for s in STAGES for f in s.folders):
                discard(out / folder)
        write_text(out / "recipe.yaml", yaml.safe_dump(to_dict(portable(r, out)), sort_keys=False,
                                                       allow_unicode=True))
        report = _run(state, todo)
    return SweepResult(out, report, state.tables, state.engine_starts)


def prepare(*, recipe: str | os.PathLike | Recipe, options: SweepOptions) -> tuple[SweepState, list[Stage]]:
    """The recipe with the options' overrides, the stages it runs, and their shared state; the output checked
    apart from every input and each stage's refusals, before anything is written (`sweep`, `sweep --plan`)."""
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
    check_output_apart(out, [p for s in todo for p in s.inputs(r)], flag="-o" if options.output else "output")
    source = delta_source(r)  # the recipe's vectors and source options (vocab policy), for swap as for materialize
    state = SweepState(recipe=r, recipe_path=path, out=out, alphas=alphas, source=source,
                       configs=merge_configs(r),  # one per (operator, α); plain θ1 + α·Δ without `merge:`
                       progress=options.progress, verbose=options.verbose, ray=options.ray)
    for s in todo:
        s.check(state)
    return state, todo


def plan(*, recipe: str | os.PathLike | Recipe, options: SweepOptions = SweepOptions(),
         plan_options: SweepPlanOptions = SweepPlanOptions()) -> SweepPlan:
    """`sweep --plan`: per stage, its exact commands, the disk it will write, its memory (engines, training,
    streaming passes) and whether it is finished (by the records a run checks). Nothing runs, nothing is
    written or downloaded: inputs are read by their safetensors headers, or their config.json alone. A stage
    whose plan needs what is not at hand says so in its status; the recipe is refused as `sweep` refuses it."""
    state, todo = prepare(recipe=recipe, options=options)
    gpu, ram, words = machine(plan_options)
    ctx = PlanContext(recipe=state.recipe, out=state.out, alphas=state.alphas, configs=list(state.configs),
                      source=state.source, gpus=plan_options.gpus, gpu_memory=gpu, ram=ram,
                      overwrite=options.overwrite, ray=state.ray)
    plans = []
    for s in todo:
        try:
            p = s.plan(ctx)
        except TvtoolError as e:  # an input not at hand, a model type without derived shapes: this stage only
            p = StagePlan(s.name, Status("cannot plan", str(e)))
        if not p.commands:
            p.commands = commands(state.recipe, state.out, stages=[s.name])
        plans.append(p)
    inputs = {ref: f"{'config.json only (shapes derived)' if m.from_config else 'safetensors headers'}: {m.where}"
              for ref, m in ctx.models().items()}
    return SweepPlan(str(state.recipe_path or state.recipe.name), state.out, words, inputs, plans)


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


def write_report(*, state: SweepState, stages: Sequence[Stage]) -> Path:
    """REPORT.md, report.json and plots, each written atomically; `stages`: the stages of this run, whose
    `report` parts (headlines, notes, plots) go in."""
    out, recipe, tables = state.out, state.recipe, state.tables
    plots, levels = {}, {}  # levels: per-difficulty tables and plot (tvtool.evaluation.report.level_section)
    for name, rows in tables.items():
        plots[name] = plot(rows=rows, path=out / f"plot-{name}.png")
        levels[name], png = level_section(name=name, rows=rows, folder=out)
        plots.update({f"{name}-levels": png} if png else {})
    parts = [p for p in (s.report(state) for s in stages) if p is not None]
    for name, src in ((k, v) for p in parts for k, v in p.plots.items()):
        plots[name] = write_bytes(out / f"{name}.png", Path(src).read_bytes())
    versions = {"tvtool": __version__, "vllm": vllm_version(), "python": platform.python_version()}
    for mod in ("torch", "transformers"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    src = state.recipe_path or out / "recipe.yaml"
    here = src.parent
    shown = portable(recipe, here)  # inputs named relative to the recipe (or by Hub id): no machine paths
    body = [f"# tvtool sweep: {recipe.name}", "",
            f"θ1 = `{shown.base}`, θ2 = `{shown.reasoner}`; α applied by **{recipe.apply}**; "
            f"{decoding_line(recipe.sampling)}.", "",
            answer_rule_line(recipe.answer_rule, budgets=recipe.prompt_budgets, template=recipe.budget_template,
                             alpha=recipe.budget_alpha),
            *reading_notes(rows=[x for t in tables.values() for x in t]), "",
            ACU_FORMULA, ""]
    body += [line for p in parts for line in p.headline]
    for name, rows in tables.items():
        body += [f"## {name}", "", markdown_table(rows=rows), "", f"![{name}]({plots[name].name})", "",
                 *levels[name]]
    body += [*([line for p in parts for line in p.notes] or [""]), "## Reproduce", "", "From the recipe's folder:",
             "", "```bash", f"tvtool sweep {short(src, here)} -o {short(out, here)}", "```", "",
             "Stage by stage (what the sweep runs):", "", "```bash", *commands(recipe, out, here), "```", "",
             "## Recipe", "", "```yaml", yaml.safe_dump(to_dict(shown), sort_keys=False, allow_unicode=True).strip(),
             "```", "", "## Versions", "", *(f"- {k}: {v}" for k, v in versions.items()), ""]
    report = write_text(out / "REPORT.md", "\n".join(body))
    write_json(out / "report.json", {"recipe": to_dict(shown), "tables": tables,
                                     "acu_formula": ACU_FORMULA, "versions": versions,
                                     "plots": {k: v.name for k, v in plots.items()}, "valves": state.valves},
               sort_keys=False)
    return report


def commands(recipe: Recipe, out: str | os.PathLike, here: Path | None = None, *,
             stages: Iterable[str] | None = None) -> list[str]:
    """The commands the sweep runs, stage by stage (or only `stages`), as shell lines with every non-default
    option spelled; local paths relative to `here` (the recipe's folder; default: the working folder)."""
    shown, to = portable(recipe, here), Path(short(out, here))
    names = None if stages is None else set(stages)
    return [sh(c) for s in STAGES if s.runs(recipe) and (names is None or s.name in names)
            for c in s.commands(shown, to)]


__all__ = ["SweepOptions", "SweepResult", "commands", "plan", "prepare", "sweep", "write_report"]
