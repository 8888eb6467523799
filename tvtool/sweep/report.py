"""A sweep's REPORT.md, report.json and plots, rebuilt from the stages' results on every run.

REPORT.md: what was swept, the stages' headlines (Table 1 for CoT-Valve recipes), one table and plot per
dataset (#tokens vs α; accuracy vs #tokens), the stages' notes (low rank, serve), how to reproduce it (the
sweep, then each stage's exact commands, from the recipe's folder), the recipe, and the versions used.
Local paths are named relative to the recipe: a committed report carries no machine paths.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Iterable, Sequence

import yaml

from tvtool._version import __version__
from tvtool.engine.options import vllm_version
from tvtool.evaluation.report import answer_rule_line, markdown_table, plot
from tvtool.evaluation.results import ACU_FORMULA
from tvtool.io.atomic import write_bytes, write_json, write_text
from tvtool.sweep.recipe import Recipe, portable, to_dict
from tvtool.sweep.stage import Stage, SweepState
from tvtool.sweep.stages import STAGES
from tvtool.sweep.words import sh, short


def write_report(*, state: SweepState, stages: Sequence[Stage]) -> Path:
    """REPORT.md, report.json and plots, each written atomically; `stages`: the stages of this run, whose
    `report` parts (headlines, notes, plots) go in."""
    out, recipe, tables = state.out, state.recipe, state.tables
    plots = {}
    for name, rows in tables.items():
        plots[name] = plot(rows=rows, path=out / f"plot-{name}.png")
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
            f"greedy={recipe.sampling.temperature == 0}, max_tokens={recipe.sampling.max_tokens}.", "",
            answer_rule_line(recipe.answer_rule, budgets=recipe.prompt_budgets, template=recipe.budget_template,
                             alpha=recipe.budget_alpha), "",
            ACU_FORMULA, ""]
    body += [line for p in parts for line in p.headline]
    for name, rows in tables.items():
        body += [f"## {name}", "", markdown_table(rows=rows), "", f"![{name}]({plots[name].name})", ""]
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


__all__ = ["commands", "write_report"]
