"""Stage `models`: θ1 + α·Δ model folders on disk (`tvtool materialize`, every α in one pass), for
`apply: materialize`, `keep.models`, or models to push; each α folder skipped when its record matches."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tvtool.merge.materialize import materialize
from tvtool.merge.options import MergeOptions
from tvtool.options import to_cli_args
from tvtool.sweep.spec import RecipeCore, low_rank_merge, merge_options
from tvtool.sweep.stage import Stage, SweepState, register
from tvtool.sweep.words import source_words, vector_words


@register
class ModelsStage(Stage):
    name = "models"
    order = 30
    folders = ("models",)

    def runs(self, recipe: RecipeCore) -> bool:
        r = recipe
        return r.apply == "materialize" or r.keep.models or (r.push.enabled and r.apply != "lora")

    def inputs(self, recipe: RecipeCore) -> list[str]:
        return [recipe.base, recipe.reasoner, *(v.model for v in recipe.vectors)]

    def run(self, state: SweepState) -> None:
        r, source, models = state.recipe, state.source, state.out / "models"
        if state.plain():
            state.folders = materialize(
                source=source, output=models,
                options=replace(r.materialize, alphas=state.alphas, progress=state.progress, overwrite=True)).folders
        else:
            state.folders = materialize(
                source=source, output=models, configs=state.configs,
                options=replace(r.materialize, progress=state.progress, overwrite=True)).configs

    def commands(self, recipe: RecipeCore, out: Path) -> list[list[str]]:
        r, alphas = recipe, tuple(dict.fromkeys(recipe.alphas))
        if not (r.apply == "materialize" or r.keep.models):
            return []
        op, vec, src = low_rank_merge(r) if r.low_rank else None, vector_words(r), source_words(r, out)
        cmds = []
        for m in r.merge or [None]:  # one run per merge entry
            mo = [] if m is None else to_cli_args(merge_options(m) if op is None else
                                                  MergeOptions(rules=m.rules, layer_schedule=m.layer_schedule))
            own = op is None  # the recipe's vectors (else the factored M)
            cmds.append(["tvtool", "materialize", r.base, *(vec or src if m is not None and own else src),
                         *(r.source.to_cli_args() if own else []), *mo,
                         "-o", f"{out}/models",
                         *replace(r.materialize, alphas=tuple(m and m.alphas or alphas)).to_cli_args()])
        return cmds
