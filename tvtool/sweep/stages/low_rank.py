"""Stage `low_rank`: Δ (or, with `merge:`/`vectors:`, the operator's M) replaced by a factored low-rank
approximation (`tvtool svd-rank`, spectra plot); with `apply: lora`, one LoRA adapter per α. The runs
after it apply α to the factored delta. Each output is skipped when its record matches."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from tvtool.io.finished import changes, read_record, say, stage_record, write_record
from tvtool.io.fingerprint import input_fingerprint
from tvtool.lowrank.merged import MERGE_FLAGS, applied_configs
from tvtool.lowrank.peft_adapter import adapter_folders, write_peft_adapters
from tvtool.lowrank.svd import LowRankOptions, svd_rank
from tvtool.merge.options import MergeOptions
from tvtool.merge.config import MergeConfig
from tvtool.options import to_cli_args
from tvtool.sweep.spec import Invalid, RecipeCore, delta_source, low_rank_merge, one_merged_vector
from tvtool.sweep.stage import Part, Section, Stage, SweepState, register
from tvtool.sweep.words import describe, vector_words
from tvtool.vectors.source import DeltaSource

ADAPTERS_RECORD = "adapters.json"  # the finished-work record of the LoRA adapters (beside their folder)


def _check(r: RecipeCore) -> None:
    lr = r.low_rank
    if lr is not None:
        one_merged_vector(r, "low_rank")
    if r.apply == "lora" and lr is None:
        raise Invalid("is 'lora' but low_rank is not set", "add low_rank: {rank: N}, or use apply: swap", "apply")
    if lr is not None and (lr.rank is None) == (lr.energy is None):
        raise Invalid("needs exactly one of rank and energy", field="low_rank")
    if lr is not None and (lr.peft is not None or lr.peft_alpha != LowRankOptions().peft_alpha):
        raise Invalid("sets peft/peft_alpha, which the sweep chooses", "use apply: lora for one adapter per α",
                      "low_rank")


@register
class LowRankStage(Stage):
    name = "low_rank"
    order = 20
    section = Section("low_rank", LowRankOptions | None, None, "Replace Δ by a low-rank approximation first.",
                      after="apply", check=_check)
    folders = ("lowrank",)

    def runs(self, recipe: RecipeCore) -> bool:
        return recipe.low_rank is not None

    def inputs(self, recipe: RecipeCore) -> list[str]:
        return [recipe.base, recipe.reasoner, *(v.model for v in recipe.vectors)]

    def run(self, state: SweepState) -> None:
        r = state.recipe
        op = low_rank_merge(r)  # low_rank factors this operator's M (not Δ)
        lowrank = _low_rank(r, state.out / "delta", state.out / "lowrank", state.alphas, state.progress, op)
        state.lowrank, state.adapters = lowrank, lowrank.get("adapters")
        state.source = DeltaSource(base=r.base, delta=str(lowrank["factored"]))
        if op is not None:  # M holds the operator: the runs apply α (with its rules) to M
            state.configs = applied_configs(state.configs)
            state.alphas = tuple(dict.fromkeys(c.alpha for c in state.configs))

    def commands(self, recipe: RecipeCore, out: Path) -> list[list[str]]:
        r, alphas = recipe, tuple(dict.fromkeys(recipe.alphas))
        op = low_rank_merge(r)
        lora = r.apply == "lora"
        lr = replace(r.low_rank, plot=True, peft=f"{out}/lowrank/adapters" if lora else None,
                     peft_alpha=alphas if lora else r.low_rank.peft_alpha)
        what = [f"{out}/delta"] if op is None else \
            ["--base", r.base, *(vector_words(r) or ["--reasoner", r.reasoner]), *r.source.to_cli_args(),
             *to_cli_args(op, rename=MERGE_FLAGS)]
        return [["tvtool", "svd-rank", *what, "-o", f"{out}/lowrank/delta.safetensors", *lr.to_cli_args()]]

    def report(self, state: SweepState) -> Part:
        lowrank, lr = state.lowrank, state.recipe.low_rank
        tot, op = (json.loads(Path(lowrank["report"]).read_text()).get(k) for k in ("totals", "merge"))
        text = (f"{_factored(op)}Δ replaced by a rank-{lr.rank or 'energy ' + str(lr.energy)} approximation "
                f"({lr.method} SVD): ‖Δ‖² kept {tot['energy_kept']:.4f}, relative Frobenius error "
                f"{tot['rel_error']:.4f}. Per-tensor report: `{Path(lowrank['report']).name}`; spectra: `spectra.png`.")
        plot = Path(lowrank["plot"])
        return Part(notes=["", "## Low rank", "", text, ""], plots={"spectra": plot} if plot.exists() else {})


def _low_rank(r: RecipeCore, d_path: Path, folder: Path, alphas, progress: bool, op: MergeOptions | None) -> dict:
    """svd-rank of Δ (the delta on disk), or with `op` of the operator's M over the vectors (`low_rank_merge`)."""
    lr = r.low_rank
    factored = folder / "delta.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    given = dict(source=DeltaSource(base=None, delta=str(d_path))) if op is None else \
        dict(source=delta_source(r), merge=op)  # the operator's M over the recipe's vectors
    res = svd_rank(output=factored, **given,  # skipped inside when finished
                   options=replace(lr, plot=True, progress=progress, overwrite=True))
    report = res.report_path
    out = {"factored": factored, "report": report, "plot": report.with_suffix(".png")}
    if r.apply == "lora":
        want = adapter_folders(output=folder / "adapters", alphas=alphas)
        rec = stage_record(stage="adapters", options={"alphas": list(alphas)},
                           inputs={"factored": input_fingerprint(factored)})
        old = read_record(folder / ADAPTERS_RECORD)
        if (old or {}).get("fingerprint") != rec["fingerprint"] or not all(p.exists() for p in want.values()):
            if old is not None:
                say(f"{changes(old, rec)}: redoing the LoRA adapters")
            write_peft_adapters(factored=factored, output=folder / "adapters", alphas=alphas, overwrite=True)
            write_record(folder, rec, name=ADAPTERS_RECORD)  # last
        out["adapters"] = want
    return out


def _factored(op: dict | None) -> str:
    """The report's words on an operator's M factored instead of Δ (`svd_rank`'s report `merge`)."""
    if not op:
        return ""
    c = MergeConfig.from_dict({"alpha": 1.0, **{k: v for k, v in op.items() if k != "more"}})
    return f"The `{c.method}` operator's M ({describe(c)['params'] or 'default settings'}) in place of Δ; "
