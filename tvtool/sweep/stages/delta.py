"""Stage `delta`: Δ = θ2 − θ1 on disk (`tvtool delta`), when the recipe keeps it (`keep.delta`) or
`low_rank:` factors Δ itself; skipped inside when its record matches (an edited input redoes it)."""

from __future__ import annotations

from pathlib import Path

from tvtool.io.layout import dtype_name
from tvtool.io.writer import plan_bytes
from tvtool.sweep.planning import PlanContext, Size, StagePlan, streaming
from tvtool.sweep.spec import RecipeCore, low_rank_merge
from tvtool.sweep.stage import Stage, SweepState, register
from tvtool.vectors.delta import DeltaOptions, delta, delta_plan, delta_record, delta_source


@register
class DeltaStage(Stage):
    name = "delta"
    order = 10
    folders = ("delta",)

    def runs(self, recipe: RecipeCore) -> bool:
        return recipe.keep.delta or (recipe.low_rank is not None and low_rank_merge(recipe) is None)

    def inputs(self, recipe: RecipeCore) -> list[str]:
        return [recipe.base, recipe.reasoner]

    def run(self, state: SweepState) -> None:
        r = state.recipe
        delta(base=r.base, reasoner=r.reasoner, output=state.out / "delta", options=_options(r, state.progress))

    def plan(self, ctx: PlanContext) -> StagePlan:
        r, o = ctx.recipe, _options(ctx.recipe, False)
        source = delta_source(base=r.base, reasoner=r.reasoner, options=o)
        dtype, entries = delta_plan(ctx.open(source).tv, o)
        status = ctx.status([(ctx.out / "delta", lambda: delta_record(source, dtype=dtype_name(dtype),
                                                                      allow_nonfinite=o.allow_nonfinite), None)])
        return StagePlan(self.name, status, [Size(f"delta/ (Δ, {len(entries)} tensors in {dtype_name(dtype)})",
                                                  plan_bytes(entries))], [streaming("Δ = θ2 − θ1")])

    def commands(self, recipe: RecipeCore, out: Path) -> list[list[str]]:
        return [["tvtool", "delta", recipe.base, recipe.reasoner, "-o", f"{out}/delta"]]


def _options(r: RecipeCore, progress: bool) -> DeltaOptions:
    """The delta options of the sweep's run (and of its plan: the same record)."""
    return DeltaOptions(progress=progress, overwrite=True, vocab=r.source.vocab)
