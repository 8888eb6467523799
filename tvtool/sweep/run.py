"""`sweep`: the whole CoT-Valve pipeline from one recipe, resumable, with a report.

Stages, each skipped when its output is already finished: its record holds the same fingerprint
(options + inputs' content, `tvtool.io.finished`); a changed option or input redoes exactly the stages
it reaches, saying so in one line (a re-run finishes the job; a moved sweep folder still resumes):
  delta     Δ = θ2 − θ1 on disk (only when kept, or needed for low rank);
  low rank  a factored Δ (and one LoRA adapter per α for apply: lora), spectra plot;
  models    θ1 + αΔ folders (apply: materialize, or keep.models);
  eval      per dataset, one vLLM engine for all α (weights swapped in place for apply: swap);
  report    REPORT.md, report.json and plots, always rebuilt from the per-sample records;
  push      models or adapters to the Hub (dry run unless the recipe says otherwise).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from tvtool._version import __version__
from tvtool.io.atomic import discard, write_bytes, write_json, write_text
from tvtool.vectors.delta import DeltaOptions, delta
from tvtool.engine.engine import Engine
from tvtool.engine.options import SamplingOptions, vllm_version
from tvtool.errors import OptionsError
from tvtool.evaluation.evaluate import evaluate
from tvtool.evaluation.report import table_row
from tvtool.io.finished import changes, read_record, say, stage_record, write_record
from tvtool.io.finite import check_alphas
from tvtool.io.hub import push
from tvtool.io.lock import output_lock
from tvtool.engine.logs import vllm_logs
from tvtool.lowrank.svd import svd_rank
from tvtool.merge.materialize import materialize
from tvtool.options import CliOptions, cli_number, opt, to_cli_args
from tvtool.lowrank.peft_adapter import adapter_folders, write_peft_adapters
from tvtool.merge.options import MergeOptions, config_name
from tvtool.lowrank.merged import MERGE_FLAGS, applied_configs
from tvtool.merge.config import MergeConfig
from tvtool.sweep.recipe import (DatasetSpec, Recipe, delta_source, load_recipe, low_rank_merge, merge_configs,
                                 merge_options, to_dict)
from tvtool.evaluation.report import answer_rule_line, markdown_table, plot
from tvtool.evaluation.results import ACU_FORMULA
from tvtool.evaluation.runs import EvalOptions
from tvtool.io.fingerprint import input_fingerprint
from tvtool.vectors.source import DeltaSource
from tvtool.evaluation.units import RayOptions
from tvtool.sweep.valve_stages import run_valve_stages, valve_commands, valve_section


@dataclass(frozen=True)
class SweepOptions(CliOptions):
    output: str | None = opt(None, "Output folder (default: the recipe's `output`).", short="-o")
    alphas: tuple[float, ...] = opt((), "Override the recipe's α list (repeat or comma-separate).", flag="--alpha")
    limit: int | None = opt(None, "Override every dataset's limit (a quick look).")
    overwrite: bool = opt(False, "Discard the results of every stage in the output folder and redo them.")
    progress: bool = opt(True, "Show progress bars.")
    verbose: bool = opt(False, "Show vLLM's own logs (default: written to <output>/eval/vllm.log).")
    ray: str | None = opt(None, "Evaluate on a Ray cluster at this address (local: start one); the pool "
                                "size comes from the recipe's executor.ray.")


@dataclass(frozen=True)
class SweepResult:
    output: Path
    report: Path
    tables: dict[str, list[dict]]
    engine_starts: int

    def summary(self) -> str:
        return (self.report.read_text().split("## Recipe")[0].strip()
                + f"\n\nreport: {self.report}  (engine starts: {self.engine_starts})")


def sweep(*, recipe: str | os.PathLike | Recipe, options: SweepOptions = SweepOptions()) -> SweepResult:
    """Run (or finish) every stage of `recipe`; returns where the report is."""
    path = None if isinstance(recipe, Recipe) else Path(recipe)
    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if options.alphas:
        r = r.model_copy(update={"alphas": options.alphas,
                                 "merge": tuple(replace(m, alphas=()) for m in r.merge)})
    if options.limit is not None:
        r = r.model_copy(update={"datasets": tuple(replace(d, limit=options.limit) for d in r.datasets)})
    alphas = tuple(dict.fromkeys(r.alphas))
    check_alphas(alphas, where=f"alphas in {path}" if path else "alphas")
    ray_opts = r.executor.ray if options.ray is None else replace(r.executor.ray or RayOptions(), address=options.ray)
    if ray_opts is not None and r.apply != "swap":
        raise OptionsError(f"a Ray sweep loads α in place; apply is {r.apply!r}", where="executor.ray",
                           fix="use apply: swap, or run without --ray / executor.ray")
    out = Path(options.output or r.output.format(name=r.name))
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        if options.overwrite:
            for stage in STAGES:
                discard(out / stage)
        return _sweep(r, path, alphas, out, options, ray_opts)


STAGES = ("delta", "lowrank", "models", "eval", "mixchain", "train", "valves")  # what `--overwrite` discards


def _sweep(r: Recipe, path: Path | None, alphas: tuple[float, ...], out: Path, options: SweepOptions,
           ray_opts: RayOptions | None) -> SweepResult:
    write_text(out / "recipe.yaml", yaml.safe_dump(to_dict(portable(r, out)), sort_keys=False, allow_unicode=True))
    pg = options.progress

    d_path = out / "delta"
    op = low_rank_merge(r) if r.low_rank else None  # low_rank factors this operator's M (not Δ)
    if r.keep.delta or (r.low_rank and op is None):  # skipped inside when its record matches (redone if not)
        delta(base=r.base, reasoner=r.reasoner, output=d_path,
              options=DeltaOptions(progress=pg, overwrite=True, vocab=r.source.vocab))
    source = delta_source(r)  # the recipe's vectors and source options (vocab policy), for swap as for materialize
    configs = merge_configs(r)  # one per (operator, α); plain θ1 + α·Δ without `merge:`
    lowrank = adapters = None
    if r.low_rank:
        lowrank = _low_rank(r, d_path, out / "lowrank", alphas, pg, op)
        source = DeltaSource(base=r.base, delta=str(lowrank["factored"]))
        adapters = lowrank.get("adapters")
        if op is not None:  # M holds the operator: the runs apply α (with its rules) to M
            configs = applied_configs(configs)
            alphas = tuple(dict.fromkeys(c.alpha for c in configs))
    plain = all(c.is_plain(len(source.more) + 1) for c in configs)
    models = out / "models"
    folders = {}
    if r.apply == "materialize" or r.keep.models or (r.push.enabled and r.apply != "lora"):
        if plain:
            folders = materialize(source=source, output=models,
                                  options=replace(r.materialize, alphas=alphas, progress=pg, overwrite=True)).folders
        else:
            folders = materialize(source=source, output=models, configs=configs,
                                  options=replace(r.materialize, progress=pg, overwrite=True)).configs

    evals = [_eval_options(r, ds, pg, verbose=options.verbose) for ds in r.datasets]
    with vllm_logs(folder=out / "eval", verbose=options.verbose):  # vLLM's lines go to eval/vllm.log (tvtool.engine.logs)
        if ray_opts is not None:  # --- ray: the (operator ×) α × dataset plan on a pool of engines ---
            tables, starts = _eval_on_ray(r, source, out / "eval", alphas, evals, ray_opts, pg,
                                          None if plain else configs)
        else:
            tables, starts = _eval_one_engine(r, source, out / "eval", alphas, evals, folders, adapters,
                                              configs, plain)
        if not plain:
            tables = operator_rows(tables=tables, configs=configs)

    # --- CoT-Valve stages: MixChain, trained valves and their α sweeps (tvtool.sweep.valve_stages) ---
    vt, valves, vs = run_valve_stages(recipe=r, out=out, progress=pg, verbose=options.verbose)
    tables.update(vt)
    starts += vs
    report = write_report(out=out, recipe=r, recipe_path=path, tables=tables, lowrank=lowrank, valves=valves)
    if r.push.enabled:
        folder = models if r.apply != "lora" else out / "lowrank" / "adapters"
        push(folder=folder, evaluation=_markdown(tables), options=r.push)
    return SweepResult(out, report, tables, starts)


def _eval_one_engine(r: Recipe, source: DeltaSource, out: Path, alphas, evals, folders, adapters, configs, plain):
    """Every dataset on one engine (started only if some run is not complete yet)."""
    if r.apply == "swap":
        eng = Engine.for_source(source=source, options=r.engine, lazy=True)
    elif r.apply == "materialize":
        eng = Engine(model=next(iter(folders.values())), options=r.engine, lazy=True)
    else:
        rank = json.loads((Path(adapters[alphas[0]]) / "adapter_config.json").read_text())["r"]
        eng = Engine(model=r.base, options=replace(r.engine, enable_lora=True, max_lora_rank=rank), lazy=True)
    tables = {}
    try:
        for ev, sampling in evals:
            common = dict(output=out, options=ev, prompt=r.prompt, sampling=sampling, engine=eng)
            if r.apply == "swap":
                res = evaluate(source=source, configs=configs, **common) if not plain else \
                    evaluate(source=source, alphas=alphas, **common)
            elif r.apply == "materialize":
                res = evaluate(checkpoints=[folders[a] for a in alphas] if plain else list(folders.values()),
                               **common)
            else:
                res = evaluate(model=r.base, loras=[adapters[a] for a in alphas], alphas=alphas, **common)
            tables[res.runs[0].folder.name if res.runs else ev.dataset] = [table_row(x) for x in res.runs]
    finally:
        eng.close()
    return tables, eng.starts


def _eval_on_ray(r: Recipe, source: DeltaSource, out: Path, alphas, evals, ray_opts: RayOptions, pg: bool,
                 configs):
    """Every (operator ×) α × dataset run on a Ray pool: the same run folders and merge configurations
    (`configs`, None: plain θ1 + α·Δ), so the same table as one engine."""
    from tvtool.evaluation.cluster import evaluate_on_ray

    res = evaluate_on_ray(output=out, source=source, alphas=alphas, datasets=evals, prompt=r.prompt,
                          engine_options=r.engine, executor=ray_opts, progress=pg, configs=configs)
    return {ev.runs[0].folder.name: [table_row(x) for x in ev.runs] for ev in res.results}, res.pool.engine_starts


def operator_rows(*, tables: dict[str, list[dict]], configs) -> dict[str, list[dict]]:
    """Each row of an operator run with its `method` and `params` (the report's table and plot series);
    rows of other runs (budget rows) unchanged."""
    by_name = {config_name(c): c for c in configs}
    return {name: [{**row, **_describe(by_name[row["label"]])} if row["label"] in by_name else row
                   for row in rows] for name, rows in tables.items()}


def _describe(c) -> dict:
    """`method` and `params` ("density=0.2", "p=0.5 seed=0", …: the non-default operator settings; None: none)."""
    skip = ("alpha", "include", "exclude", "method")
    d = {k: v for k, v in c.to_dict().items() if k not in skip}
    if c.method.startswith("dare"):
        d["seed"] = c.seed  # the mask seed matters to every DARE run
    params = " ".join(f"{k}={_fmt(v)}" for k, v in d.items())
    return {"method": c.method, "params": params or None}


def _fmt(v) -> str:
    return ",".join(map(_fmt, v)) if isinstance(v, tuple) else f"{v:g}" if isinstance(v, float) else str(v)


def _low_rank(r: Recipe, d_path: Path, folder: Path, alphas, progress: bool, op: MergeOptions | None) -> dict:
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


ADAPTERS_RECORD = "adapters.json"  # the finished-work record of the LoRA adapters (beside their folder)


def _markdown(tables: dict[str, list[dict]]) -> str:
    return "\n\n".join(f"**{name}**\n\n{markdown_table(rows=rows)}" for name, rows in tables.items()) + \
        f"\n\n{ACU_FORMULA}\n"


def write_report(*, out: Path, recipe: Recipe, recipe_path: Path | None, tables: dict[str, list[dict]],
                 lowrank: dict | None, valves: dict | None = None) -> Path:
    """REPORT.md, report.json and plots (#tokens vs α; accuracy vs #tokens; SVD spectra when low rank),
    each written atomically; `valves`: the CoT-Valve stages' Table 1 and bars (tvtool.sweep.valve_stages)."""
    plots = {}
    for name, rows in tables.items():
        plots[name] = plot(rows=rows, path=out / f"plot-{name}.png")
    if lowrank and Path(lowrank["plot"]).exists():
        write_bytes(out / "spectra.png", Path(lowrank["plot"]).read_bytes())
        plots["spectra"] = out / "spectra.png"
    versions = {"tvtool": __version__, "vllm": vllm_version(), "python": platform.python_version()}
    for mod in ("torch", "transformers"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    lr = ""
    if lowrank:
        tot, op = (json.loads(Path(lowrank["report"]).read_text()).get(k) for k in ("totals", "merge"))
        lr = (f"\n## Low rank\n\n{_factored(op)}Δ replaced by a rank-{recipe.low_rank.rank or 'energy ' + str(recipe.low_rank.energy)}"
              f" approximation ({recipe.low_rank.method} SVD): ‖Δ‖² kept {tot['energy_kept']:.4f}, relative "
              f"Frobenius error {tot['rel_error']:.4f}. Per-tensor report: `{Path(lowrank['report']).name}`; "
              "spectra: `spectra.png`.\n")
    src = recipe_path or out / "recipe.yaml"
    here = src.parent
    shown = portable(recipe, here)  # inputs named relative to the recipe (or by Hub id): no machine paths
    body = [f"# tvtool sweep: {recipe.name}", "",
            f"θ1 = `{shown.base}`, θ2 = `{shown.reasoner}`; α applied by **{recipe.apply}**; "
            f"greedy={recipe.sampling.temperature == 0}, max_tokens={recipe.sampling.max_tokens}.", "",
            answer_rule_line(recipe.answer_rule, budgets=recipe.prompt_budgets, template=recipe.budget_template,
                             alpha=recipe.budget_alpha), "",
            ACU_FORMULA, ""]
    if valves:  # --- CoT-Valve: Table 1 and the bars (tvtool.sweep.valve_stages) ---
        body += valve_section(recipe=recipe, tables=tables, valves=valves)
    for name, rows in tables.items():
        body += [f"## {name}", "", markdown_table(rows=rows), "", f"![{name}]({plots[name].name})", ""]
    body += [lr, "## Reproduce", "", "From the recipe's folder:", "", "```bash",
             f"tvtool sweep {_short(src, here)} -o {_short(out, here)}", "```", "",
             "Stage by stage (what the sweep runs):", "", "```bash", *_commands(recipe, out, here),
             *(_sh(c) for c in valve_commands(recipe=shown, out=_short(out, here))), "```", "",
             "## Recipe", "", "```yaml", yaml.safe_dump(to_dict(shown), sort_keys=False, allow_unicode=True).strip(),
             "```", "", "## Versions", "", *(f"- {k}: {v}" for k, v in versions.items()), ""]
    report = write_text(out / "REPORT.md", "\n".join(body))
    write_json(out / "report.json", {"recipe": to_dict(shown), "tables": tables,
                                     "acu_formula": ACU_FORMULA, "versions": versions,
                                     "plots": {k: v.name for k, v in plots.items()}, "valves": valves},
               sort_keys=False)
    return report


def _factored(op: dict | None) -> str:
    """The report's words on an operator's M factored instead of Δ (`svd_rank`'s report `merge`)."""
    if not op:
        return ""
    c = MergeConfig.from_dict({"alpha": 1.0, **{k: v for k, v in op.items() if k != "more"}})
    return f"The `{c.method}` operator's M ({_describe(c)['params'] or 'default settings'}) in place of Δ; "


def portable(r: Recipe, start: Path | None) -> Recipe:
    """`r` with its local inputs relative to `start` (the recipe's folder), as a recipe there would name
    them (committed reports carry no machine paths)."""
    s = lambda p: _short(p, start)  # noqa: E731
    mc = replace(r.mixchain, dataset=s(r.mixchain.dataset)) if r.mixchain else None
    return r.model_copy(update={
        "base": s(r.base), "reasoner": s(r.reasoner), "mixchain": mc,
        "datasets": tuple(replace(d, name=s(d.name)) for d in r.datasets),
        "vectors": tuple(replace(v, model=s(v.model)) for v in r.vectors),
        "train": tuple(replace(t, model=t.model if t.model in ("base", "reasoner") else s(t.model),
                               data=t.data if t.data == "mixchain" else s(t.data)) for t in r.train)})


def _short(p, start: str | os.PathLike | None = None) -> str:
    """A local path relative to `start` (default: the working folder); Hub ids and names unchanged."""
    try:
        return os.path.relpath(p, start) if Path(p).exists() else str(p)
    except ValueError:  # another drive
        return str(p)


class _Glob(str):
    """A command word left unquoted so that the shell expands it (e.g. `models/alpha-*`)."""


def _sh(words: list[str]) -> str:
    return " ".join(w if isinstance(w, _Glob) else shlex.quote(str(w)) for w in words)


def _eval_options(r: Recipe, ds: DatasetSpec, progress: bool, *,
                  verbose: bool = False) -> tuple[EvalOptions, SamplingOptions]:
    """A recipe dataset's evaluation and sampling options (per-dataset max_tokens wins)."""
    swap = r.apply == "swap"  # in-engine α: the eval applies the recipe's tensor selection itself
    ev = EvalOptions(dataset=ds.name, split=ds.split, limit=ds.limit, seed=ds.seed, kind=ds.kind,
                     params_b=r.params_b, include=r.materialize.include if swap else None,
                     exclude=r.materialize.exclude if swap else None, progress=progress,
                     answer_rule=r.answer_rule, prompt_budgets=r.prompt_budgets,
                     budget_template=r.budget_template, budget_alpha=r.budget_alpha, verbose=verbose,
                     overwrite=True)  # the sweep's own run folders: a changed record redoes the run
    return ev, replace(r.sampling, max_tokens=ds.max_tokens or r.sampling.max_tokens)


def _commands(r: Recipe, out: Path, here: Path | None = None) -> list[str]:
    """The stage-by-stage commands the sweep runs (paths relative to `here`, the recipe's folder), with
    every non-default option spelled by `to_cli_args`."""
    alphas = tuple(dict.fromkeys(r.alphas))
    r = portable(r, here)
    base, reasoner, out = r.base, r.reasoner, Path(_short(out, here))
    cmds, src = [], ["--reasoner", reasoner]
    opts = r.source.to_cli_args()  # the source options (--vocab …) of the recipe's vectors
    op = low_rank_merge(r) if r.low_rank else None
    vec = [w for v in r.vectors for w in ("--vector", f"{_short(v.model)}:{cli_number(v.weight)}")]
    if (r.low_rank and op is None) or r.keep.delta:
        cmds.append(["tvtool", "delta", base, reasoner, "-o", f"{out}/delta"])
    if r.low_rank:
        lora = r.apply == "lora"
        lr = replace(r.low_rank, plot=True, peft=f"{out}/lowrank/adapters" if lora else None,
                     peft_alpha=alphas if lora else r.low_rank.peft_alpha)
        what = [f"{out}/delta"] if op is None else ["--base", base, *(vec or src), *opts,
                                                     *to_cli_args(op, rename=MERGE_FLAGS)]
        cmds.append(["tvtool", "svd-rank", *what, "-o", f"{out}/lowrank/delta.safetensors", *lr.to_cli_args()])
        src = ["--delta", f"{out}/lowrank/delta.safetensors"]
    for m in (r.merge or [None]) if r.apply == "materialize" or r.keep.models else ():  # one run per merge entry
        mo = [] if m is None else to_cli_args(merge_options(m) if op is None else
                                              MergeOptions(rules=m.rules, layer_schedule=m.layer_schedule))
        own = op is None  # the recipe's vectors (else the factored M)
        cmds.append(["tvtool", "materialize", base, *(vec or src if m is not None and own else src),
                     *(opts if own else []), *mo,
                     "-o", f"{out}/models", *replace(r.materialize, alphas=tuple(m and m.alphas or alphas)).to_cli_args()])
    for d in r.datasets:
        ev, sampling = _eval_options(r, d, True)
        flags = ["--dataset", ev.dataset, *ev.to_cli_args(exclude=("dataset",)), *r.prompt.to_cli_args(), *sampling.to_cli_args(),
                 *r.engine.to_cli_args(exclude=("enable_lora", "max_lora_rank")), "-o", f"{out}/eval"]
        a = ["--alpha", ",".join(cli_number(x) for x in alphas)]
        if r.apply == "swap" and r.merge:  # one eval per merge entry, each with its own α list
            for m in r.merge:
                mo = merge_options(m) if op is None else \
                    MergeOptions(rules=m.rules, layer_schedule=m.layer_schedule)  # the operator is in M
                cmds.append(["tvtool", "eval", "--base", base, *(src if op else [*(vec or src), *opts]),
                             *to_cli_args(mo),
                             "--alpha", ",".join(cli_number(x) for x in m.alphas or alphas), *flags])
        elif r.apply == "swap":
            cmds.append(["tvtool", "eval", "--base", base, *src, *([] if r.low_rank else opts), *a, *flags])
        elif r.apply == "materialize":
            cmds.append(["tvtool", "eval", _Glob(shlex.quote(f"{out}/models/") + ("*alpha-*" if r.merge else "alpha-*")),
                         *flags])
        else:
            cmds.append(["tvtool", "eval", "--model", base, "--lora",
                         _Glob(shlex.quote(f"{out}/lowrank/adapters/") + "alpha-*"), *a, *flags])
    return [_sh(c) for c in cmds]
