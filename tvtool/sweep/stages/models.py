"""Stage `models`: θ1 + α·Δ model folders on disk (`tvtool materialize`, every α in one pass), for
`apply: materialize`, `keep.models`, or models to push; each α folder skipped when its record matches."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tvtool.io.layout import SETTINGS_FILE
from tvtool.merge.materialize import materialize, materialize_record, output_folders
from tvtool.merge.options import MergeOptions
from tvtool.merge.plan import output_plan, plan_nbytes
from tvtool.options import to_cli_args
from tvtool.sweep.planning import PlanContext, Size, StagePlan, Status, human, streaming
from tvtool.sweep.spec import RecipeCore, delta_source, low_rank_merge, merge_options
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

    def plan(self, ctx: PlanContext) -> StagePlan:
        r, o = ctx.recipe, replace(ctx.recipe.materialize, alphas=ctx.alphas)
        folders = output_folders(output=ctx.out / "models", options=o, configs=None if ctx.plain() else ctx.configs)
        opened = ctx.open(delta_source(r))  # the shapes (a factored delta has Δ's names and shapes)
        each = plan_nbytes(output_plan(opened.base, opened.tv, dtype=o.dtype))
        source = ctx.source

        def find() -> Status:
            if not ctx.exists(source) and any(f.exists() for f in folders.values()):
                return Status("unknown", "its input is not written yet (an earlier stage writes it)")
            return ctx.status((f, lambda c=c: materialize_record(source.fingerprint_record(), c, o), SETTINGS_FILE)
                              for c, f in folders.items())

        return StagePlan(self.name, ctx.status_of(find),
                         [Size(f"models/: {len(folders)} folder(s) of θ1 + α·Δ "
                               f"({'as the base stores it' if o.dtype == 'auto' else o.dtype}), {human(each)} each",
                               each * len(folders))],
                         [streaming("every α in one pass")])

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
