"""Stage `table1`: the CoT-Valve results in the shape of the paper's Table 1 (method, α, accuracy, #tokens,
ACU: base, reasoner, Δ-interpolation, each valve at its α), the checks a ++ and a +P valve should pass,
MixChain-Z's statistics (Table 9) and each valve's training, at the top of REPORT.md. Nothing to run:
it reads what `eval`, `mixchain` and `train` left."""

from __future__ import annotations

from tvtool.io.layout import format_alpha
from tvtool.sweep.planning import PlanContext, StagePlan, Status
from tvtool.sweep.spec import RecipeCore
from tvtool.sweep.stage import Part, Stage, SweepState, register
from tvtool.sweep.words import rel

LABELS = {"valve++": "CoT-Valve++", "progressive": "CoT-Valve+P", "valve": "CoT-Valve"}


@register
class Table1Stage(Stage):
    name = "table1"
    order = 70

    def runs(self, recipe: RecipeCore) -> bool:
        return recipe.mixchain is not None or bool(recipe.train)

    def report(self, state: SweepState) -> Part:
        return Part(headline=valve_section(recipe=state.recipe, tables=state.tables, valves=state.valves))

    def plan(self, ctx: PlanContext) -> StagePlan:
        return StagePlan(self.name, Status("nothing to run", "REPORT.md's Table 1, from what eval, mixchain and "
                                                             "train leave"))


def table1(*, recipe, tables: dict[str, list[dict]], dataset: str) -> list[dict]:
    """Rows shaped like the paper's Table 1: base, reasoner, Δ-interpolation at each α, each valve at its α."""
    main = {row["alpha"]: row for row in tables.get(dataset, [])}
    rows = []
    for a, row in sorted(main.items()):
        method = "Base (θ1)" if a == 0 else "Reasoner (θ2)" if a == 1 else "Δ-interpolation θ1 + αΔ"
        rows.append({"method": method, "alpha": a, **_cells(row)})
    for t in recipe.train:
        for row in tables.get(f"{dataset}-{t.name}", []):
            method = f"{LABELS[t.mode]} `{t.name}` (θ + αΔθ′)"
            rows.append({"method": method, "alpha": row["alpha"], **_cells(row)})
    return rows


def _cells(row: dict) -> dict:
    return {"accuracy": row["accuracy"], "mean_tokens": row["mean_tokens"], "acu": row["acu"]}


def table1_markdown(rows: list[dict]) -> str:
    lines = ["| Method | α | Accuracy % | #Tokens | ACU |", "|---|---|---|---|---|"]
    for x in rows:
        lines.append(f"| {x['method']} | {format_alpha(x['alpha'])} | {x['accuracy']:.1f} | {x['mean_tokens']:.1f} | "
                     f"{x['acu']:.3g} |")
    return "\n".join(lines)


def valve_bars(*, valve: list[dict], shortest: float | None = None, final: dict | None = None) -> list[tuple[str, bool, str]]:
    """The checks for a ++ valve's α rows and a +P row: (check, met, numbers)."""
    by = {round(x["alpha"], 4): x for x in valve}
    out = []
    need = [0.0, 0.25, 0.5, 0.75, 1.0]
    if all(a in by for a in need):
        n = [by[a]["mean_tokens"] for a in need]
        out.append(("++: mean #tokens non-increasing over α = 0, .25, .5, .75, 1",
                    all(y <= x for x, y in zip(n, n[1:])), " → ".join(f"{v:.1f}" for v in n)))
        out.append(("++: #tokens at α = 1 at most half of α = 0", n[4] <= 0.5 * n[0], f"{n[4]:.1f} vs {n[0]:.1f}"))
        lo, hi = min(n[0], n[4]), max(n[0], n[4])
        inside = [a for a, v in zip(need[1:4], n[1:4]) if lo * 1.1 < v < hi * 0.9]
        out.append(("++: a valve, not a switch (≥ 2 of α = .25, .5, .75 strictly inside, 10% margins)",
                    len(inside) >= 2, f"inside: {', '.join(map(format_alpha, inside)) or 'none'}"))
        acc = [by[a]["accuracy"] for a in need]
        out.append(("++: accuracy ≥ 90% at every α in [0, 1]", min(acc) >= 90, f"min {min(acc):.1f}%"))
    if final is not None and shortest:
        out.append(("+P: within 1.2× of the shortest MixChain column's mean, accuracy ≥ 90%",
                    final["mean_tokens"] <= 1.2 * shortest and final["accuracy"] >= 90,
                    f"{final['mean_tokens']:.1f} tokens = {final['mean_tokens'] / shortest:.2f}× {shortest:.1f}, "
                    f"{final['accuracy']:.1f}%"))
    return out


def valve_section(*, recipe, tables: dict[str, list[dict]], valves: dict) -> list[str]:
    """REPORT.md lines: Table 1 per dataset, the valve checks, the MixChain statistics, the valves' training."""
    body = []
    mix = valves.get("mixchain")
    shortest = min((x["mean_tokens"] for x in mix if x["mean_tokens"]), default=None) if mix else None
    for ds in [d for d in tables if not any(d.endswith(f"-{t.name}") for t in recipe.train)]:
        rows = table1(recipe=recipe, tables=tables, dataset=ds)
        body += [f"## Table 1 ({ds}, greedy)", "", table1_markdown(rows), ""]
        bars = []
        for t in recipe.train:
            vrows = tables.get(f"{ds}-{t.name}", [])
            if t.mode == "valve++":
                bars += valve_bars(valve=vrows)
            elif t.mode == "progressive" and vrows:
                final = next((x for x in vrows if x["alpha"] == 1.0), vrows[-1])
                bars += valve_bars(valve=[], shortest=shortest, final=final)
        if bars:
            body += ["Valve checks:", ""] + [f"- {'met' if ok else '**NOT met**'}: {b} ({nums})"
                                            for b, ok, nums in bars] + [""]
    if mix:
        body += ["## MixChain-Z (`mixchain/`)", "", "| Solution index | #Samples | #Avg Token |", "|---|---|---|"]
        body += [f"| {x['label']} | {x['samples']} | {x['mean_tokens'] or 0:.1f} |" for x in mix] + [""]
    for t in recipe.train:
        v = valves.get(t.name)
        if v:
            body += [f"- valve `{t.name}` ({t.mode}) on `{rel(v['model'])}`: {v['steps']} steps, final loss "
                     f"{v['final_loss']:.4f}; adapter `train/{t.name}/` (loss curve `train/{t.name}/loss.png`)"]
    return body + [""]


__all__ = ["Table1Stage", "table1", "table1_markdown", "valve_bars", "valve_section"]
