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
import os
import shlex
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from tvtool._version import __version__
from tvtool.io.atomic import atomic_dir
from tvtool.io.cards import model_card
from tvtool.errors import OptionsError
from tvtool.io.finished import RECORD_KEY, is_finished, stage_record
from tvtool.io.finite import check_alphas, warn_nonfinite
from tvtool.io.layout import SETTINGS_FILE
from tvtool.io.lock import output_lock
from tvtool.merge.config import MergeConfig
from tvtool.merge.options import MaterializeOptions, MergeOptions, config_name
from tvtool.merge.registry import settings as all_settings
from tvtool.merge.plan import merged_config, output_plan, plan_entries
from tvtool.merge.stream import check_config, merge_chunks
from tvtool.io.buffers import reuse
from tvtool.io.writer import ShardedWriter, WriteBehind, parse_size, progress
from tvtool.io.paths import check_inside, check_output_apart, check_writable
from tvtool.vectors.source import DeltaSource


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


def materialize(*, source: DeltaSource, output: str | os.PathLike, options: MaterializeOptions,
                merge: MergeOptions = MergeOptions(),
                configs: Sequence[MergeConfig] | None = None) -> MaterializeResult:
    """Write θ1 + α·Δ (or an operator's output at α, `merge`) for every α in `options.alphas` under `output`,
    reading each input once per pass. `source`: Δ and θ1 (`DeltaSource.build` from the source flags).
    `configs` (instead of α × `merge`) writes several operator settings in the same run.

    The tensors come from the shared merge stream (`tvtool.merge.stream.merge_chunks`), one output per configuration."""
    o = options
    if source.base is None:
        raise OptionsError("merging needs the base model", fix="pass the base (θ1)")
    folders = output_folders(output=output, options=o, merge=merge, configs=configs)
    cfgs = list(folders)
    check_alphas([c.alpha for c in cfgs])
    b, tvs = source.open()
    tv = tvs[0]
    for c in cfgs:  # settings for these vectors, a selection that merges nothing, α rules that apply to nothing
        check_config(tvs, c)
    plan = output_plan(b, tv, dtype=o.dtype)
    files = merged_config(base=b, tv=tv, plan=plan, config_from=o.config_from)
    prov = tv.provenance()
    out = Path(output)
    for f in folders.values():
        check_inside(f, out, flag=f"--name-template {o.name_template}")
        check_output_apart(f, [b.source.path, *(p for t in tvs for p in t.sources())], flag="-o/--name-template")
    if len(set(folders.values())) != len(folders):
        raise OptionsError("two configurations map to the same folder name", where=o.name_template,
                           fix="include {alpha} in --name-template")
    settings = {c: _settings(c, b, o, source) for c in cfgs}
    inputs = source.fingerprint_record()
    records = {c: materialize_record(inputs, c, o) for c in cfgs}
    entries = plan_entries(plan)
    read = total_w = 0
    nonfinite: dict[str, int] = {}
    check_writable(out)
    with contextlib.ExitStack() as stack:  # every folder is renamed into place only if all succeed
        stack.enter_context(output_lock(out))  # one writer per output folder
        todo = [c for c in cfgs if not is_finished(folders[c], records[c], overwrite=o.overwrite,
                                                   what=f"materialize {folders[c].name}", name=SETTINGS_FILE)]
        tmps = {c: stack.enter_context(atomic_dir(folders[c])) for c in todo}
        writers = {c: stack.enter_context(ShardedWriter(  # the fingerprint in the headers: a model rebuilt from
            folder=tmps[c], plan=entries, max_shard_size=parse_size(o.max_shard_size),  # other inputs differs
            metadata={"format": "pt", "tvtool.fingerprint": records[c]["fingerprint"]})) for c in todo}
        total_w = sum(w.total_size for w in writers.values())
        with progress(total_w, f"materialize {len(todo)} α", o.progress and bool(todo)) as bar, reuse():
            wb = WriteBehind(on_bytes=bar.update, lanes=min(len(todo), 8))  # a thread per output
            try:
                stream = merge_chunks(base=b, tv=tvs, configs=todo, plan=plan, allow_nonfinite=o.allow_nonfinite,
                                      nonfinite=nonfinite, outputs=[str(folders[c]) for c in todo]) if todo else ()
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
            _write_extras(tmps[c], files, settings[c], records[c], prov, c, o, source, output)
    warn_nonfinite(nonfinite)
    return MaterializeResult({c.alpha: f for c, f in folders.items()}, [c.alpha for c in todo],
                             [c.alpha for c in cfgs if c not in todo], read, total_w, folders)


def output_folders(*, output: str | os.PathLike, options: MaterializeOptions, merge: MergeOptions = MergeOptions(),
                   configs: Sequence[MergeConfig] | None = None) -> dict[MergeConfig, Path]:
    """Each configuration `materialize` writes (α × `merge`, or `configs`) and its folder under `output`."""
    alphas = _check_options(options, configs)
    cfgs = list(dict.fromkeys(configs)) if configs is not None else \
        merge.configs(alphas, include=options.include, exclude=options.exclude)
    return {c: Path(output) / _folder_name(options.name_template, c) for c in cfgs}


def _check_options(o: MaterializeOptions, configs) -> list[float]:
    if configs is not None:
        if not configs:
            raise OptionsError("no configuration given", where="configs", fix="pass at least one MergeConfig")
        return []
    if not o.alphas:
        raise OptionsError("no α given", where="--alpha", fix="pass e.g. --alpha 0.6 (repeat for more)")
    check_alphas(o.alphas)
    MergeConfig(0.0, o.include, o.exclude)  # checks the regular expressions
    if "{alpha}" not in o.name_template and len(set(o.alphas)) > 1:
        raise OptionsError("--name-template has no {alpha}", where=o.name_template, fix="e.g. alpha-{alpha}")
    return list(dict.fromkeys(float(a) for a in o.alphas))


def materialize_record(inputs: dict, config: MergeConfig, o: MaterializeOptions) -> dict:
    """The finished-work record of one folder: the merge settings (operator included) and the inputs'
    content (`DeltaSource.fingerprint_record`)."""
    keep = ("dtype", "config_from", "allow_nonfinite")
    return stage_record(stage="materialize", options={**inputs["options"], **json.loads(json.dumps(config.record())),
                                                      **{k: getattr(o, k) for k in keep}}, inputs=inputs["inputs"])


def _folder_name(template: str, c: MergeConfig) -> str:
    """The folder's name from --name-template; an unknown {key} is a one-line error."""
    try:
        return config_name(c, template)
    except (KeyError, IndexError, ValueError) as e:
        raise OptionsError(f"--name-template has an unknown or malformed field ({type(e).__name__}: {e})",
                           where=template, fix="the only field is {alpha}, e.g. alpha-{alpha}") from None


def _settings(c: MergeConfig, b, o: MaterializeOptions, source: DeltaSource) -> dict:
    keep = ("dtype", "config_from")
    op = {k: v for k, v in c.to_dict().items() if k not in ("alpha", "include", "exclude")}
    return {"alpha": c.alpha, "base": b.source.describe(), "reasoner": source.reasoner, "delta": source.delta,
            "include": c.include, "exclude": c.exclude, **{k: v for k, v in asdict(o).items() if k in keep},
            "vocab": source.vocab, "allow_missing": source.allow_missing,
            **({"merge": json.loads(json.dumps(op))} if op else {}),
            **({"more": list(source.more)} if source.more else {})}


def _write_extras(tmp: Path, files, settings, record, prov, c: MergeConfig, o: MaterializeOptions,
                  source: DeltaSource, output) -> None:
    a = c.alpha
    for fname, data in files.items():
        (tmp / fname).write_bytes(data)
    dtype = json.loads(files["config.json"]).get("torch_dtype") or json.loads(files["config.json"]).get("dtype")
    plain = c.is_plain(1 + len(source.more))
    ops = [] if plain else ["--method", c.method]  # the operator flags of this configuration
    src = source.cli_args(weights=() if plain else c.weights)
    ops += [w for name, v in c.settings for w in _setting_args(name, v)]
    ops += [w for r, f in c.rules for w in ("--alpha-rule", f"{r}={f:g}")]
    ops += ["--layer-schedule", f"{c.schedule[0]:g}:{c.schedule[1]:g}"] if c.schedule else []
    flags = replace(o, alphas=(a,), include=c.include, exclude=c.exclude, overwrite=False, progress=True).to_cli_args()
    cmd = shlex.join(["tvtool", "materialize", str(source.base), *ops[:2], *src, *ops[2:], *flags, "-o", str(output)])
    reasoner_src = prov.get("reasoner") if isinstance(prov.get("reasoner"), dict) else None
    card = model_card(alpha=a, base=settings["base"], reasoner=reasoner_src, delta=prov if source.delta else None,
                      dtype=str(dtype or o.dtype), include=c.include, exclude=c.exclude,
                      config_from=o.config_from, command=cmd, low_rank=prov.get("low_rank"))
    (tmp / "README.md").write_text(card)
    info = {"tvtool_version": __version__, "settings": settings, "delta_provenance": prov, RECORD_KEY: record}
    (tmp / SETTINGS_FILE).write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")


def _setting_args(name: str, value) -> list[str]:
    """The flag that sets an operator setting (none for those without one, e.g. weights: --vector)."""
    s = next(s for s in all_settings() if s.name == name)
    if not s.option:
        return []
    text = ",".join(f"{x:g}" for x in value) if isinstance(value, tuple) else \
        f"{value:g}" if isinstance(value, float) else str(value)
    return [s.flag or "--" + name.replace("_", "-"), text]
