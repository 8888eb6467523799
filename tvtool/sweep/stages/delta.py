"""Stage `delta`: Δ = θ2 − θ1 on disk (`tvtool delta`), when the recipe keeps it (`keep.delta`) or
`low_rank:` factors Δ itself; skipped inside when its record matches (an edited input redoes it)."""

from __future__ import annotations

from pathlib import Path

from tvtool.sweep.spec import RecipeCore, low_rank_merge
from tvtool.sweep.stage import Stage, SweepState, register
from tvtool.vectors.delta import DeltaOptions, delta


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
        delta(base=r.base, reasoner=r.reasoner, output=state.out / "delta",
              options=DeltaOptions(progress=state.progress, overwrite=True, vocab=r.source.vocab))

    def commands(self, recipe: RecipeCore, out: Path) -> list[list[str]]:
        return [["tvtool", "delta", recipe.base, recipe.reasoner, "-o", f"{out}/delta"]]
