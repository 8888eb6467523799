"""The CoT-Valve stages of a sweep recipe: MixChain-Z, trained valves, their α sweeps, Table 1.

  mixchain  `build_mixchain` from θ1 + αΔ (rebuilt when the recipe's mixchain entry changes);
  train     `tvtool.valve.train` per entry (skipped when finished with the same settings; resumes otherwise);
  sweep     each valve's α sweep in one engine (θ + α·Δθ loaded in place; redone when retrained);
  table 1   the paper's Table 1 shape: method, accuracy, #tokens, ACU; plus the toy bars for ++ / +P.
All stages share one lazily started engine with the recipe's engine settings.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from tvtool.io.atomic import discard
from tvtool.io.layout import format_alpha
from tvtool.merge.options import MergeOptions
from tvtool.sweep.recipe import MergeSpec, delta_source, merge_options
from tvtool.vectors.source import DeltaSource


def run_valve_stages(*, recipe, out: Path, progress: bool,
                     verbose: bool = False) -> tuple[dict[str, list[dict]], dict, int]:
    """({table name: rows}, {valve name: info}, engine starts) for the recipe's mixchain/train entries."""
    from tvtool.engine.engine import Engine
    from tvtool.engine.logs import vllm_logs

    r = recipe
    if r.mixchain is None and not r.train:
        return {}, {}, 0
    # One engine (placeholder weights) for MixChain's θ1 + αΔ and every valve's θ + α·Δθ′ (loaded in place).
    eng = Engine.for_source(source=DeltaSource(base=r.base, reasoner=r.reasoner), options=r.engine, lazy=True)
    try:
        with vllm_logs(folder=out / "valves", verbose=verbose):  # vLLM's lines go to valves/vllm.log
            tables, info = _stages(r, out, eng, progress, verbose)
    finally:
        starts = eng.starts
        eng.close()
    return tables, info, starts


def _stages(r, out: Path, eng, progress: bool, verbose: bool) -> tuple[dict[str, list[dict]], dict]:
    from tvtool.evaluation.evaluate import evaluate
    from tvtool.evaluation.report import table_row
    from tvtool.valve.mixchain import build_mixchain
    from tvtool.valve.options import MixChainOptions
    from tvtool.evaluation.runs import EvalOptions
    from tvtool.valve.train import train

    tables, info = {}, {}
    if r.mixchain is not None:
        mc, folder = r.mixchain, out / "mixchain"
        sampling = replace(r.sampling, max_tokens=mc.max_tokens or r.sampling.max_tokens)
        op = mixchain_merge(r)  # the recipe's operator over its vectors (with `merge:`/`vectors:`)
        build_mixchain(source=delta_source(r), output=folder, engine=eng,
                       prompt=r.prompt, sampling=sampling, engine_options=r.engine, merge=op,  # skipped inside
                       # when its record matches (tvtool.io.finished)
                       options=MixChainOptions(dataset=mc.dataset, split=mc.split, limit=mc.limit,
                                               alphas=mc.alphas, min_correct=mc.min_correct,
                                               overwrite=True, progress=progress))
        info["mixchain"] = json.loads((folder / "mixchain.json").read_text())["stats"]["table9"]
    for t in r.train:
        model = {"reasoner": r.reasoner, "base": r.base}.get(t.model, t.model)
        data = out / "mixchain" if t.data == "mixchain" else t.data
        res = train(mode=t.mode, model=model, data=data, output=out / "train" / t.name, prompt=r.prompt,
                    options=replace(t.options, progress=progress, overwrite=True))
        ev_dir = out / "valves" / t.name
        if not res.skipped:
            discard(ev_dir)  # the valve changed: its old α sweep is stale
        info[t.name] = {"mode": t.mode, "model": _rel(model), "adapter": _rel(res.folder), "final_loss": res.final_loss,
                        "steps": len(res.losses)}
        source = DeltaSource(base=str(model), delta=str(res.folder))  # the adapter is a task vector
        for ds in r.datasets:
            sampling = replace(r.sampling, max_tokens=ds.max_tokens or r.sampling.max_tokens)
            ev = evaluate(source=source, alphas=t.alphas, engine=eng, output=ev_dir, prompt=r.prompt,
                          sampling=sampling,
                          options=EvalOptions(dataset=ds.name, split=ds.split, limit=ds.limit, seed=ds.seed,
                                              kind=ds.kind, params_b=r.params_b, answer_rule=r.answer_rule,
                                              progress=progress, verbose=verbose, overwrite=True))
            name = (ev.runs[0].folder.name if ev.runs else ds.name) + f"-{t.name}"
            tables[name] = [table_row(x) for x in ev.runs]
    return tables, info


def mixchain_merge(recipe) -> MergeOptions:
    """The MixChain stage's operator: the recipe's (one) `merge:` entry over its `vectors:`, all its settings
    (α rules, schedule) at the stage's own α; plain θ1 + α·Δ without `merge:`/`vectors:`."""
    r = recipe
    return merge_options(r.merge[0] if r.merge else MergeSpec(), r.vectors)


def table1(*, recipe, tables: dict[str, list[dict]], dataset: str) -> list[dict]:
    """Rows shaped like the paper's Table 1: base, reasoner, Δ-interpolation at each α, each valve at its α."""
    main = {row["alpha"]: row for row in tables.get(dataset, [])}
    rows = []
    for a, row in sorted(main.items()):
        method = "Base (θ1)" if a == 0 else "Reasoner (θ2)" if a == 1 else "Δ-interpolation θ1 + αΔ"
        rows.append({"method": method, "alpha": a, **_cells(row)})
    for t in recipe.train:
        label = {"valve++": "CoT-Valve++", "progressive": "CoT-Valve+P", "valve": "CoT-Valve"}[t.mode]
        for row in tables.get(f"{dataset}-{t.name}", []):
            rows.append({"method": f"{label} `{t.name}` (θ + αΔθ′)", "alpha": row["alpha"], **_cells(row)})
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
    """The toy bars (issue 13) for a ++ valve's α rows and a +P row: (bar, met, numbers)."""
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
    """REPORT.md lines: Table 1 per dataset, the bars, the MixChain statistics, the valves' training."""
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
            body += ["Bars (issue 13):", ""] + [f"- {'met' if ok else '**NOT met**'}: {b} ({nums})"
                                                for b, ok, nums in bars] + [""]
    if mix:
        body += ["## MixChain-Z (`mixchain/`)", "", "| Solution index | #Samples | #Avg Token |", "|---|---|---|"]
        body += [f"| {x['label']} | {x['samples']} | {x['mean_tokens'] or 0:.1f} |" for x in mix] + [""]
    for t in recipe.train:
        v = valves.get(t.name)
        if v:
            body += [f"- valve `{t.name}` ({t.mode}) on `{_rel(v['model'])}`: {v['steps']} steps, final loss "
                     f"{v['final_loss']:.4f}; adapter `train/{t.name}/` (loss curve `train/{t.name}/loss.png`)"]
    return body + [""]


def valve_commands(*, recipe, out: str) -> list[list[str]]:
    """The commands (as words) of the CoT-Valve stages, what `run_valve_stages` calls; every non-default
    option spelled by the options' `to_cli_args`."""
    from tvtool.valve.options import MixChainOptions
    from tvtool.options import cli_number, to_cli_args
    from tvtool.evaluation.runs import EvalOptions

    r, cmds = recipe, []
    prompt = r.prompt.to_cli_args()
    engine = r.engine.to_cli_args(exclude=("enable_lora", "max_lora_rank"))
    if r.mixchain:
        m = r.mixchain
        mo = MixChainOptions(dataset=_rel(m.dataset), split=m.split, limit=m.limit, alphas=m.alphas,
                             min_correct=m.min_correct)
        sampling = replace(r.sampling, max_tokens=m.max_tokens or r.sampling.max_tokens)
        op = mixchain_merge(r)
        src = [w for v in r.vectors for w in ("--vector", f"{_rel(v.model)}:{cli_number(v.weight)}")] or \
            ["--reasoner", _rel(r.reasoner)]
        cmds.append(["tvtool", "mixchain", _rel(r.base), *src, *r.source.to_cli_args(), *mo.to_cli_args(),
                     *to_cli_args(op),
                     *sampling.to_cli_args(exclude=("n",)), *prompt, *engine, "-o", f"{out}/mixchain"])
    for t in r.train:
        model = _rel({"reasoner": r.reasoner, "base": r.base}.get(t.model, t.model))
        data = f"{out}/mixchain" if t.data == "mixchain" else _rel(t.data)
        cmds.append(["tvtool", "train", t.mode, "--model", model, "--data", data,
                     *t.options.to_cli_args(exclude=("progress", "overwrite")), *prompt, "-o", f"{out}/train/{t.name}"])
        for d in r.datasets:
            ev = EvalOptions(dataset=_rel(d.name), split=d.split, limit=d.limit, seed=d.seed, kind=d.kind,
                             params_b=r.params_b, answer_rule=r.answer_rule)
            sampling = replace(r.sampling, max_tokens=d.max_tokens or r.sampling.max_tokens)
            cmds.append(["tvtool", "eval", "--base", model, "--delta", f"{out}/train/{t.name}", "--alpha",
                         ",".join(cli_number(a) for a in t.alphas), "--dataset", ev.dataset,
                         *ev.to_cli_args(exclude=("dataset",)), *prompt, *sampling.to_cli_args(), *engine,
                         "-o", f"{out}/valves/{t.name}"])
    return cmds


def _rel(p) -> str:
    import os

    try:
        rel = os.path.relpath(p)
        return rel if Path(p).exists() and not rel.startswith("..") else str(p)
    except ValueError:
        return str(p)


__all__ = ["mixchain_merge", "run_valve_stages", "table1", "table1_markdown", "valve_bars", "valve_commands", "valve_section"]
