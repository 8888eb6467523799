"""`sweep`: the whole CoT-Valve pipeline from one recipe, resumable, with a report.

Stages, each skipped when its output is already finished: its record holds the same fingerprint
(options + inputs' content, `tvtool.finished`); a changed option or input redoes exactly the stages
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

from . import __version__
from .atomic import discard, write_bytes, write_json, write_text
from .delta import DeltaOptions, delta
from .engine import Engine, vllm_version
from .evaluate import evaluate, table_row
from .finished import read_record, say, changes, stage_record, write_record
from .finite import check_alphas
from .hub import PushOptions, push
from .layout import format_alpha
from .lock import output_lock
from .lowrank import LowRankOptions, svd_rank
from .materialize import MaterializeOptions, materialize
from .options import opt
from .peft_adapter import adapter_folders, write_peft_adapters
from .prompting import PromptOptions
from .recipe import Recipe, load_recipe, to_dict
from .report import markdown_table, plot
from .results import ACU_FORMULA
from .runs import EvalOptions
from .source import DeltaSource, input_fingerprint


@dataclass(frozen=True)
class SweepOptions:
    output: str | None = opt(None, "Output folder (default: the recipe's `output`).", short="-o")
    alphas: tuple[float, ...] = opt((), "Override the recipe's α list (repeat or comma-separate).", flag="--alpha")
    limit: int | None = opt(None, "Override every dataset's limit (a quick look).")
    overwrite: bool = opt(False, "Discard the results of every stage in the output folder and redo them.")
    progress: bool = opt(True, "Show progress bars.")


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
        r = replace(r, alphas=options.alphas)
    if options.limit is not None:
        r = replace(r, datasets=tuple(replace(d, limit=options.limit) for d in r.datasets))
    alphas = tuple(dict.fromkeys(r.alphas))
    check_alphas(alphas, where=f"alphas in {path}" if path else "alphas")
    out = Path(options.output or r.output.format(name=r.name))
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        if options.overwrite:
            for stage in STAGES:
                discard(out / stage)
        return _sweep(r, path, alphas, out, options)


STAGES = ("delta", "lowrank", "models", "eval")  # the folders `sweep --overwrite` discards


def _sweep(r: Recipe, path: Path | None, alphas: tuple[float, ...], out: Path, options: SweepOptions) -> SweepResult:
    write_text(out / "recipe.yaml", yaml.safe_dump(to_dict(portable(r, out)), sort_keys=False, allow_unicode=True))
    pg = options.progress

    d_path = out / "delta"
    if r.keep.delta or r.low_rank:  # skipped inside when its record matches (redone, saying why, if not)
        delta(base=r.base, reasoner=r.reasoner, output=d_path, options=DeltaOptions(progress=pg, overwrite=True))
    source = DeltaSource(base=r.base, reasoner=r.reasoner)
    lowrank = adapters = None
    if r.low_rank:
        lowrank = _low_rank(r, d_path, out / "lowrank", alphas, pg)
        source = DeltaSource(base=r.base, delta=str(lowrank["factored"]))
        adapters = lowrank.get("adapters")
    models = out / "models"
    folders = {}
    if r.apply == "materialize" or r.keep.models or (r.push.enabled and r.apply != "lora"):
        folders = materialize(base=r.base, output=models, delta=source.delta, reasoner=source.reasoner,
                              options=MaterializeOptions(alphas=alphas, include=r.include, exclude=r.exclude,
                                                         progress=pg, overwrite=True)).folders

    # One engine for every dataset (started only if some run is not complete yet).
    if r.apply == "swap":
        eng = Engine.for_source(source=source, options=r.engine, lazy=True)
    elif r.apply == "materialize":
        eng = Engine(model=folders[alphas[0]], options=r.engine, lazy=True)
    else:
        rank = json.loads((Path(adapters[alphas[0]]) / "adapter_config.json").read_text())["r"]
        eng = Engine(model=r.base, options=replace(r.engine, enable_lora=True, max_lora_rank=rank), lazy=True)
    tables = {}
    try:
        for ds in r.datasets:
            sampling = replace(r.sampling, max_tokens=ds.max_tokens or r.sampling.max_tokens)
            ev = EvalOptions(dataset=ds.name, split=ds.split, limit=ds.limit, seed=ds.seed, kind=ds.kind,
                             params_b=r.params_b, include=r.include if r.apply == "swap" else None,
                             exclude=r.exclude if r.apply == "swap" else None, progress=pg, overwrite=True)
            common = dict(output=out / "eval", options=ev, prompt=r.prompt, sampling=sampling, engine=eng)
            if r.apply == "swap":
                res = evaluate(source=source, alphas=alphas, **common)
            elif r.apply == "materialize":
                res = evaluate(checkpoints=[folders[a] for a in alphas], **common)
            else:
                res = evaluate(model=r.base, loras=[adapters[a] for a in alphas], alphas=alphas, **common)
            tables[res.runs[0].folder.name if res.runs else ds.name] = [table_row(x) for x in res.runs]
    finally:
        starts = eng.starts
        eng.close()

    report = write_report(out=out, recipe=r, recipe_path=path, tables=tables, lowrank=lowrank)
    if r.push.enabled:
        folder = models if r.apply != "lora" else out / "lowrank" / "adapters"
        push(folder=folder, evaluation=_markdown(tables),
             options=PushOptions(repo=r.push.repo, private=r.push.private, dry_run=r.push.dry_run))
    return SweepResult(out, report, tables, starts)


def _low_rank(r: Recipe, d_path: Path, folder: Path, alphas, progress: bool) -> dict:
    lr = r.low_rank
    factored = folder / "delta.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    res = svd_rank(delta=d_path, output=factored, options=LowRankOptions(  # skipped inside when finished
        rank=lr.rank, energy=lr.energy, max_rank=lr.max_rank, method=lr.method, include=lr.include,
        exclude=lr.exclude, plot=True, progress=progress, overwrite=True))
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
                 lowrank: dict | None) -> Path:
    """REPORT.md, report.json and plots (#tokens vs α; accuracy vs #tokens; SVD spectra when low rank),
    each written atomically."""
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
        tot = json.loads(Path(lowrank["report"]).read_text())["totals"]
        lr = (f"\n## Low rank\n\nΔ replaced by a rank-{recipe.low_rank.rank or 'energy ' + str(recipe.low_rank.energy)}"
              f" approximation ({recipe.low_rank.method} SVD): ‖Δ‖² kept {tot['energy_kept']:.4f}, relative "
              f"Frobenius error {tot['rel_error']:.4f}. Per-tensor report: `{Path(lowrank['report']).name}`; "
              "spectra: `spectra.png`.\n")
    src = recipe_path or out / "recipe.yaml"
    shown = portable(recipe, src.parent)  # inputs named relative to the recipe (or by Hub id): no machine paths
    body = [f"# tvtool sweep: {recipe.name}", "",
            f"θ1 = `{shown.base}`, θ2 = `{shown.reasoner}`; α applied by **{recipe.apply}**; "
            f"greedy={recipe.sampling.temperature == 0}, max_tokens={recipe.sampling.max_tokens}.", "",
            ACU_FORMULA, ""]
    for name, rows in tables.items():
        body += [f"## {name}", "", markdown_table(rows=rows), "", f"![{name}]({plots[name].name})", ""]
    here = src.parent
    body += [lr, "## Reproduce", "", "From the recipe's folder:", "", "```bash",
             f"tvtool sweep {_short(src, here)} -o {_short(out, here)}", "```", "",
             "Stage by stage (what the sweep runs):", "", "```bash", *_commands(recipe, out, here), "```", "",
             "## Recipe", "", "```yaml", yaml.safe_dump(to_dict(shown), sort_keys=False, allow_unicode=True).strip(),
             "```", "", "## Versions", "", *(f"- {k}: {v}" for k, v in versions.items()), ""]
    report = write_text(out / "REPORT.md", "\n".join(body))
    write_json(out / "report.json", {"recipe": to_dict(shown), "tables": tables, "acu_formula": ACU_FORMULA,
                                     "versions": versions, "plots": {k: Path(v).name for k, v in plots.items()}},
               sort_keys=False)
    return report


def _short(p, start: str | os.PathLike | None = None) -> str:
    """A local path relative to `start` (default: the working folder); Hub ids and names unchanged."""
    try:
        return os.path.relpath(p, start) if os.path.isabs(p) or Path(p).exists() else str(p)
    except ValueError:  # another drive
        return str(p)


def portable(r: Recipe, start: Path) -> Recipe:
    """`r` with its local inputs relative to `start` (the recipe's folder), as a recipe there would name them."""
    return replace(r, base=_short(r.base, start), reasoner=_short(r.reasoner, start),
                   datasets=tuple(replace(d, name=_short(d.name, start)) for d in r.datasets))


def _commands(r: Recipe, out: Path, here: Path) -> list[str]:
    a = ",".join(format_alpha(x) for x in dict.fromkeys(r.alphas))
    r = portable(r, here)
    out = Path(_short(out, here))
    cmds, src = [], f"--reasoner {r.reasoner}"
    flags = ""
    sel = "".join(f" --{k} {shlex.quote(v)}" for k, v in (("include", r.include), ("exclude", r.exclude)) if v)
    if r.prompt.instruction != PromptOptions().instruction:
        flags += f" --instruction {shlex.quote(r.prompt.instruction)}"
    flags += f" --dtype {r.engine.dtype}" if r.engine.dtype != "auto" else ""
    flags += f" --max-model-len {r.engine.max_model_len}" if r.engine.max_model_len else ""
    flags += f" --tensor-parallel-size {r.engine.tensor_parallel_size}" if r.engine.tensor_parallel_size > 1 else ""
    flags += " --enforce-eager" if r.engine.enforce_eager else ""
    if r.low_rank or r.keep.delta:
        cmds.append(f"tvtool delta {r.base} {r.reasoner} -o {out}/delta")
    if r.low_rank:
        k = f"--rank {r.low_rank.rank}" if r.low_rank.rank else f"--energy {r.low_rank.energy}"
        peft = f" --peft {out}/lowrank/adapters --peft-alpha {a}" if r.apply == "lora" else ""
        cmds.append(f"tvtool svd-rank {k} {out}/delta -o {out}/lowrank/delta.safetensors{peft}")
        src = f"--delta {out}/lowrank/delta.safetensors"
    if r.apply == "materialize" or r.keep.models:
        cmds.append(f"tvtool materialize {r.base} {src} --alpha {a}{sel} -o {out}/models")
    for d in r.datasets:
        lim = f" --limit {d.limit}" if d.limit else ""
        mt = d.max_tokens or r.sampling.max_tokens
        if r.apply == "swap":
            cmds.append(f"tvtool eval --base {r.base} {src} --alpha {a}{sel} --dataset {d.name}{lim} --max-tokens {mt}"
                        f"{flags} -o {out}/eval")
        elif r.apply == "materialize":
            cmds.append(f"tvtool eval {out}/models/alpha-* --dataset {d.name}{lim} --max-tokens {mt}{flags} "
                        f"-o {out}/eval")
        else:
            cmds.append(f"tvtool eval --model {r.base} --lora {out}/lowrank/adapters/alpha-* --alpha {a} "
                        f"--dataset {d.name}{lim} --max-tokens {mt}{flags} -o {out}/eval")
    return cmds

