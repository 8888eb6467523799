"""Stage `push`: the α models (or, with `apply: lora`, the adapters) to the Hugging Face Hub with the
evaluation tables in their cards (`tvtool push`); private, and a dry run, unless the recipe says not.
Runs after REPORT.md is written."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tvtool.evaluation.report import markdown_table
from tvtool.evaluation.results import ACU_FORMULA
from tvtool.io.hub import PushOptions, push
from tvtool.options import opt
from tvtool.sweep.planning import PlanContext, StagePlan, Status
from tvtool.sweep.spec import RecipeCore
from tvtool.sweep.stage import Section, Stage, SweepState, register
from tvtool.sweep.words import sh


@dataclass(frozen=True)
class PushStage(PushOptions):
    """`tvtool push` options plus whether the stage runs; in a recipe a push is a dry run unless it says not."""

    dry_run: bool = opt(True, "Only list what would be uploaded.")
    enabled: bool = opt(False, "Push the α models (or adapters) at the end.")


@register
class PushToHub(Stage):
    name = "push"
    order = 90
    section = Section("push", PushStage, PushStage(), "What to push (private, and a dry run, by default).",
                      after="keep")
    publish = True

    def runs(self, recipe: RecipeCore) -> bool:
        return recipe.push.enabled

    def run(self, state: SweepState) -> None:
        r = state.recipe
        folder = state.out / "models" if r.apply != "lora" else state.out / "lowrank" / "adapters"
        push(folder=folder, evaluation=markdown(state.tables), options=r.push)

    def plan(self, ctx: PlanContext) -> StagePlan:
        r = ctx.recipe
        what = "the LoRA adapters (lowrank/adapters/)" if r.apply == "lora" else "the α models (models/)"
        return StagePlan(self.name, Status("nothing to run" if r.push.dry_run else "runs after the report",
                                           f"a dry run: lists what would be uploaded of {what}" if r.push.dry_run
                                           else f"uploads {what} to {r.push.repo}; nothing written here"),
                         commands=[sh(["tvtool", "push", str(ctx.out / ("lowrank/adapters" if r.apply == "lora"
                                                                         else "models")), *_push_options(r.push)])])


def _push_options(p: PushStage) -> list[str]:
    """The `tvtool push` flags of the recipe's push (its defaults are push's own, not the recipe's)."""
    return PushOptions(**{f.name: getattr(p, f.name) for f in dataclasses.fields(PushOptions)}).to_cli_args()


def markdown(tables: dict[str, list[dict]]) -> str:
    """The evaluation tables for a model card."""
    return "\n\n".join(f"**{name}**\n\n{markdown_table(rows=rows)}" for name, rows in tables.items()) + \
        f"\n\n{ACU_FORMULA}\n"


__all__ = ["PushStage", "PushToHub", "markdown"]
