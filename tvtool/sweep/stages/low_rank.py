"""Stage `low_rank`: Δ (or, with `merge:`/`vectors:`, the operator's M) replaced by a factored low-rank
approximation (`tvtool svd-rank`, spectra plot); with `apply: lora`, one LoRA adapter per α. The runs
after it apply α to the factored delta. Each output is skipped when its record matches."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from tvtool.io.finished import changes, read_record, say, stage_record, write_record
from tvtool.io.fingerprint import input_fingerprint
from tvtool.io.layout import DTYPES
from tvtool.lowrank.merged import MERGE_FLAGS, applied_configs, open_input, operator_config
from tvtool.lowrank.peft_adapter import adapter_folders, padded_rank, write_peft_adapters
from tvtool.lowrank.svd import LowRankOptions, lowrank_record, report_path, select, svd_rank
from tvtool.merge.options import MergeOptions
from tvtool.merge.config import MergeConfig
from tvtool.options import to_cli_args
from tvtool.sweep.planning import Memory, PlanContext, Size, StagePlan, Status, human
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

    def plan(self, ctx: PlanContext) -> StagePlan:
        r, lr, folder = ctx.recipe, ctx.recipe.low_rank, ctx.out / "lowrank"
        op, factored, o = low_rank_merge(r), folder / "delta.safetensors", replace(ctx.recipe.low_rank, plot=True)
        tv = ctx.open(delta_source(r)).tv  # Δ's names and shapes (M has the same)
        names = tv.names()
        choice = select(names=names, shapes={n: tv.shape(n) for n in names}, options=lr, where=f"{r.base} → Δ")
        item = DTYPES[lr.dtype].itemsize

        def rank(shape) -> int:  # --energy: at most max_rank, else the full rank (an upper bound)
            return min(lr.rank or lr.max_rank or min(shape), min(shape))

        factors = [tv.shape(n) for n in names if choice[n] == "factor"]
        size = sum(rank(s) * sum(s) for s in factors) * item + \
            sum(math.prod(tv.shape(n)) for n in names if choice[n] == "full") * item
        exact = lr.rank is not None
        at = str(lr.rank) if exact else f"≤ {lr.max_rank or 'min(shape)'} (energy {lr.energy})"
        disk = [Size(f"lowrank/delta.safetensors ({len(factors)} tensors factored at rank {at}, {lr.dtype})",
                     size, exact)]
        alphas = ctx.alphas
        if r.apply == "lora":
            pr = padded_rank(lr.rank or lr.max_rank or max(min(s) for s in factors))
            each = sum(pr * sum(s) for s in factors if len(s) == 2) * item
            disk.append(Size(f"lowrank/adapters/: {len(alphas)} LoRA adapter(s) at rank {pr}, {human(each)} each",
                             len(alphas) * each, exact))
        big = max(math.prod(s) for s in factors)
        memory = [Memory("SVD", None, None, (f"SVD: one tensor at a time in float32, the largest {human(big * 4)} "
                                             f"(plus the SVD's workspace); Δ read in row chunks",))]
        source = DeltaSource(base=None, delta=str(ctx.out / "delta")) if op is None else delta_source(r)

        def find() -> Status:
            if not ctx.exists(source) and folder.exists():
                return Status("unknown", "its input (delta/) is not written yet (the delta stage writes it)")
            operator = None if op is None else open_input(
                source=source, config=operator_config(merge=op, n_vectors=1 + len(source.more))).settings()
            outputs = [(report_path(factored), lambda: lowrank_record(source, o, operator=operator), None)]
            if r.apply == "lora":
                outputs.append((folder / ADAPTERS_RECORD, lambda: _adapters_record(alphas, factored), None))
            st = ctx.status(outputs)
            want = adapter_folders(output=folder / "adapters", alphas=alphas).values() if r.apply == "lora" else []
            return Status("resumes", "adapter folders missing") if st.state == "finished" and \
                not all(p.exists() for p in want) else st

        status = ctx.status_of(find)
        ctx.source = DeltaSource(base=r.base, delta=str(factored))  # as `run` leaves the state
        if op is not None:
            ctx.configs = applied_configs(ctx.configs)
            ctx.alphas = tuple(dict.fromkeys(c.alpha for c in ctx.configs))
        return StagePlan(self.name, status, disk, memory)

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
        rec = _adapters_record(alphas, factored)
        old = read_record(folder / ADAPTERS_RECORD)
        if (old or {}).get("fingerprint") != rec["fingerprint"] or not all(p.exists() for p in want.values()):
            if old is not None:
                say(f"{changes(old, rec)}: redoing the LoRA adapters")
            write_peft_adapters(factored=factored, output=folder / "adapters", alphas=alphas, overwrite=True)
            write_record(folder, rec, name=ADAPTERS_RECORD)  # last
        out["adapters"] = want
    return out


def _adapters_record(alphas, factored: Path) -> dict:
    """The finished-work record of the LoRA adapters (`ADAPTERS_RECORD`): their α and the factored delta."""
    return stage_record(stage="adapters", options={"alphas": list(alphas)},
                        inputs={"factored": input_fingerprint(factored)})


def _factored(op: dict | None) -> str:
    """The report's words on an operator's M factored instead of Δ (`svd_rank`'s report `merge`)."""
    if not op:
        return ""
    c = MergeConfig.from_record({"alpha": 1.0, **op})
    return f"The `{c.method}` operator's M ({describe(c)['params'] or 'default settings'}) in place of Δ; "
