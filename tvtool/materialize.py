"""`materialize`: write θ1 + α·Δ for many α in one pass over the inputs.

Each input tensor is read once, in row chunks, however many α are asked for; the
sum is float32 and rounded once. Every α becomes a complete model folder (shards,
index, config/tokenizer files, model card) written under `<name>.partial/` and
renamed only when complete, so an interrupted run never leaves a folder that
looks done, and re-running finishes the job.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, Sequence

from . import __version__
from .atomic import atomic_dir
from .card import model_card
from .errors import OptionsError, OutputError
from .layout import SETTINGS_FILE, alpha_name
from .merge import MergeConfig, merge_chunks, merged_config, output_plan, plan_entries
from .merge_options import MergeOptions, config_name, split_vectors
from .options import CliOptions, opt
from .output import ShardedWriter, WriteBehind, parse_size, progress
from .source import DeltaSource

@dataclass(frozen=True)
class MaterializeOptions(CliOptions):
    alphas: tuple[float, ...] = opt((), "α to write (repeat, or comma-separate): θ1 + α·Δ. Any real number.",
                                    flag="--alpha", short="-a")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt("auto", "Output dtype. auto: the base's.")
    config_from: Literal["reasoner", "base"] = opt(
        "reasoner", "Take config.json, tokenizer, chat template and generation_config from this model.")
    name_template: str = opt("alpha-{alpha}", "Name of each α's folder inside the output folder.")
    include: str | None = opt(None, "Apply α only to tensors whose name matches this regex; others stay at the base.")
    exclude: str | None = opt(None, "Do not apply α to tensors whose name matches this regex.")
    max_shard_size: str = opt("5GB", "Largest safetensors shard in each output folder.")
    allow_missing: bool = opt(False, "With --reasoner: skip tensors present in only one model (recorded).")
    vocab: Literal["error", "intersect"] = opt(
        "error", "With --reasoner: on a vocabulary-size mismatch, error or interpolate only the shared rows.")
    allow_pickle: bool = opt(False, "Accept *.bin pickle checkpoints, loaded with torch.load(weights_only=True).")
    overwrite: bool = opt(False, "Replace existing α folders made with other settings.")
    progress: bool = opt(True, "Show a progress bar.")


@dataclass(frozen=True)
class MaterializeResult:
    folders: dict[float, Path]  # by α (with several operator settings per α: the last one's)
    written: list[float]
    skipped: list[float]
    bytes_read: int
    bytes_written: int
    configs: dict[MergeConfig, Path] = field(default_factory=dict)  # every configuration's folder

    def summary(self) -> str:
        s = [f"{c.tag() + ' ' if c.tag() else ''}α={c.alpha:g} → {f}"
             + (" (already complete)" if c.alpha in self.skipped and c.alpha not in self.written else "")
             for c, f in self.configs.items()]
        return "\n".join(s)


def materialize(*, base: str | os.PathLike, output: str | os.PathLike, delta: str | os.PathLike | None = None,
                reasoner: str | os.PathLike | None = None, options: MaterializeOptions,
                merge: MergeOptions = MergeOptions(), configs: Sequence[MergeConfig] | None = None
                ) -> MaterializeResult:
    """Write θ1 + α·Δ (or an operator's θ1 + α·M, `merge`) for every α in `options.alphas` under
    `output`, reading each input once per pass. `configs` (instead of α × `merge`) writes several
    operator settings in the same run.

    The tensors come from the shared merge stream (`tvtool.merge.merge_chunks`), one output per configuration."""
    o = options
    delta, reasoner, more, weights = split_vectors(delta=delta, reasoner=reasoner, options=merge)
    source = DeltaSource(base=base, delta=delta, reasoner=reasoner, allow_missing=o.allow_missing, vocab=o.vocab,
                         allow_pickle=o.allow_pickle, more=more)
    alphas = _check_options(o, configs)
    cfgs = list(dict.fromkeys(configs)) if configs is not None else \
        merge.configs(alphas, include=o.include, exclude=o.exclude, weights=weights)
    b, tvs = source.open_vectors()
    tv = tvs[0]
    plan = output_plan(b, tv, dtype=o.dtype)
    files = merged_config(base=b, tv=tv, plan=plan, config_from=o.config_from)
    prov = tv.provenance()
    out = Path(output)
    folders = {c: out / config_name(c, o.name_template) for c in cfgs}
    if len(set(folders.values())) != len(folders):
        raise OptionsError("two configurations map to the same folder name", where=o.name_template,
                           fix="include {alpha} in --name-template")
    settings = {c: _settings(c, b, o, reasoner, delta, more) for c in cfgs}
    todo = [c for c in cfgs if not _complete(folders[c], settings[c], o.overwrite)]
    entries = plan_entries(plan)
    read = total_w = 0
    with contextlib.ExitStack() as stack:  # every folder is renamed into place only if all succeed
        tmps = {c: stack.enter_context(atomic_dir(folders[c])) for c in todo}
        writers = {c: stack.enter_context(ShardedWriter(folder=tmps[c], plan=entries, metadata={"format": "pt"},
                                                        max_shard_size=parse_size(o.max_shard_size)))
                   for c in todo}
        total_w = sum(w.total_size for w in writers.values())
        with progress(total_w, f"materialize {len(todo)} α", o.progress and bool(todo)) as bar:
            wb = WriteBehind(on_bytes=bar.update)
            try:
                stream = merge_chunks(base=b, tv=tvs, configs=todo, plan=plan) if todo else ()
                for chunk in stream:
                    read += chunk.bytes_read
                    for c, t in zip(todo, chunk.outputs):
                        wb.submit(writers[c], chunk.name, t)
                    bar.set_postfix_str(f"tensors {chunk.index + 1}/{len(plan)}", refresh=False)
                wb.flush()
            finally:
                wb.close()
        for c in todo:
            writers[c].close()
            _write_extras(tmps[c], files, settings[c], prov, c, o, reasoner, delta, base, output, merge)
    return MaterializeResult({c.alpha: f for c, f in folders.items()}, [c.alpha for c in todo],
                             [c.alpha for c in cfgs if c not in todo], read, total_w, folders)


def _check_options(o: MaterializeOptions, configs) -> list[float]:
    if configs is not None:
        if not configs:
            raise OptionsError("no configuration given", where="configs", fix="pass at least one MergeConfig")
        return []
    if not o.alphas:
        raise OptionsError("no α given", where="--alpha", fix="pass e.g. --alpha 0.6 (repeat for more)")
    for a in o.alphas:
        if not math.isfinite(a):
            raise OptionsError(f"α must be a finite number, got {a}", where="--alpha")
    MergeConfig(0.0, o.include, o.exclude)  # checks the regular expressions
    if "{alpha}" not in o.name_template and len(set(o.alphas)) > 1:
        raise OptionsError("--name-template has no {alpha}", where=o.name_template, fix="e.g. alpha-{alpha}")
    return list(dict.fromkeys(float(a) for a in o.alphas))


def _settings(c: MergeConfig, b, o, reasoner, delta, more) -> dict:
    keep = ("dtype", "config_from", "vocab", "allow_missing")
    op = {k: v for k, v in c.to_dict().items() if k not in ("alpha", "include", "exclude")}
    return {"alpha": c.alpha, "base": b.source.describe(), "reasoner": str(reasoner) if reasoner else None,
            "delta": str(delta) if delta else None, "include": c.include, "exclude": c.exclude,
            **{k: v for k, v in asdict(o).items() if k in keep},
            **({"merge": json.loads(json.dumps(op))} if op else {}), **({"more": list(more)} if more else {})}


def _complete(folder: Path, settings: dict, overwrite: bool) -> bool:
    """True when `folder` is a finished output with these settings; error if it holds something else."""
    f = folder / SETTINGS_FILE
    if f.is_file():
        try:
            if json.loads(f.read_text()).get("settings") == settings and not overwrite:
                return True
        except json.JSONDecodeError:
            pass
    if folder.exists() and not overwrite:
        raise OutputError("output folder exists with other settings or contents", where=str(folder),
                          fix="pass --overwrite, or choose another output folder")
    return False


def _write_extras(tmp: Path, files, settings, prov, c: MergeConfig, o, reasoner, delta, base, output,
                  merge: MergeOptions) -> None:
    a = c.alpha
    for fname, data in files.items():
        (tmp / fname).write_bytes(data)
    dtype = json.loads(files["config.json"]).get("torch_dtype") or json.loads(files["config.json"]).get("dtype")
    src = ["--reasoner", str(reasoner)] if reasoner else ["--delta", str(delta)]
    ops: list[str] = []
    if not c.is_plain(1 + len(settings.get("more", []))):  # the operator flags of this configuration
        ops += ["--method", c.method] + [w for v in merge.vectors for w in ("--vector", v)]
        ops += [w for k, v, d in (("density", c.density, 1.0), ("drop-p", c.p, 0.0), ("drop-seed", c.seed, 0),
                                  ("beta", c.beta, 0.0), ("gamma", c.gamma, 0.0)) if v != d for w in (f"--{k}", f"{v:g}")]
        ops += [w for r, f in c.rules for w in ("--alpha-rule", f"{r}={f:g}")]
        ops += ["--layer-schedule", f"{c.schedule[0]:g}:{c.schedule[1]:g}"] if c.schedule else []
    flags = replace(o, alphas=(a,), include=c.include, exclude=c.exclude, overwrite=False, progress=True).to_cli_args()
    cmd = shlex.join(["tvtool", "materialize", str(base), *src, *ops, *flags, "-o", str(output)])
    reasoner_src = prov.get("reasoner") if isinstance(prov.get("reasoner"), dict) else None
    card = model_card(alpha=a, base=settings["base"], reasoner=reasoner_src, delta=prov if delta else None,
                      dtype=str(dtype or o.dtype), include=c.include, exclude=c.exclude,
                      config_from=o.config_from, command=cmd, low_rank=prov.get("low_rank"))
    (tmp / "README.md").write_text(card)
    record = {"tvtool_version": __version__, "settings": settings, "delta_provenance": prov}
    (tmp / SETTINGS_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")

