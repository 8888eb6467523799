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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from . import __version__
from .atomic import atomic_dir
from .card import model_card
from .errors import OptionsError
from .finished import RECORD_KEY, is_finished, stage_record
from .finite import check_alphas, warn_nonfinite
from .layout import SETTINGS_FILE, alpha_name, format_alpha
from .lock import output_lock
from .merge import MergeConfig, check_selection, merge_chunks, merged_config, output_plan, plan_entries
from .options import opt
from .output import ShardedWriter, WriteBehind, parse_size, progress
from .paths import check_inside, check_output_apart, check_writable
from .source import DeltaSource

@dataclass(frozen=True)
class MaterializeOptions:
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
    allow_nonfinite: bool = opt(False, "Copy NaN/Inf values of the inputs into the merges (with a warning) instead "
                                       "of stopping at the first one.")
    overwrite: bool = opt(False, "Replace existing α folders made with other settings.")
    progress: bool = opt(True, "Show a progress bar.")


@dataclass(frozen=True)
class MaterializeResult:
    folders: dict[float, Path]
    written: list[float]
    skipped: list[float]
    bytes_read: int
    bytes_written: int

    def summary(self) -> str:
        s = [f"α={a:g} → {self.folders[a]}" + (" (already complete)" if a in self.skipped else "")
             for a in self.folders]
        return "\n".join(s)


def materialize(*, base: str | os.PathLike, output: str | os.PathLike, delta: str | os.PathLike | None = None,
                reasoner: str | os.PathLike | None = None, options: MaterializeOptions) -> MaterializeResult:
    """Write θ1 + α·Δ for every α in `options.alphas` under `output`, reading each input once.

    The tensors come from the shared merge stream (`tvtool.merge.merge_chunks`), one output per α."""
    o = options
    source = DeltaSource(base=base, delta=delta, reasoner=reasoner, allow_missing=o.allow_missing, vocab=o.vocab,
                         allow_pickle=o.allow_pickle)
    alphas = _check_options(o)
    configs = {a: MergeConfig(a, o.include, o.exclude) for a in alphas}
    b, tv = source.open()
    check_selection(tv, configs[alphas[0]])
    plan = output_plan(b, tv, dtype=o.dtype)
    files = merged_config(base=b, tv=tv, plan=plan, config_from=o.config_from)
    prov = tv.provenance()
    out = Path(output)
    folders = {a: out / _folder_name(o.name_template, a) for a in alphas}
    for f in folders.values():
        check_inside(f, out, flag=f"--name-template {o.name_template}")
        check_output_apart(f, [b.source.path, *tv.sources()], flag="-o/--name-template")
    if len(set(folders.values())) != len(folders):
        raise OptionsError("two α values map to the same folder name", where=o.name_template,
                           fix="include {alpha} in --name-template")
    settings = {a: _settings(a, b, o, reasoner, delta) for a in alphas}
    inputs = source.fingerprint_record()
    records = {a: materialize_record(inputs, configs[a], o) for a in alphas}
    entries = plan_entries(plan)
    read = total_w = 0
    nonfinite: dict[str, int] = {}
    check_writable(out)
    with contextlib.ExitStack() as stack:  # every α folder is renamed into place only if all succeed
        stack.enter_context(output_lock(out))  # one writer per output folder
        todo = [a for a in alphas if not is_finished(folders[a], records[a], overwrite=o.overwrite,
                                                     what=f"materialize {folders[a].name}", name=SETTINGS_FILE)]
        tmps = {a: stack.enter_context(atomic_dir(folders[a])) for a in todo}
        writers = {a: stack.enter_context(ShardedWriter(  # the fingerprint in the headers: a model rebuilt from
            folder=tmps[a], plan=entries, max_shard_size=parse_size(o.max_shard_size),  # other inputs differs
            metadata={"format": "pt", "tvtool.fingerprint": records[a]["fingerprint"]})) for a in todo}
        total_w = sum(w.total_size for w in writers.values())
        with progress(total_w, f"materialize {len(todo)} α", o.progress and bool(todo)) as bar:
            wb = WriteBehind(on_bytes=bar.update)
            try:
                stream = merge_chunks(base=b, tv=tv, configs=[configs[a] for a in todo], plan=plan,
                                      allow_nonfinite=o.allow_nonfinite, nonfinite=nonfinite,
                                      outputs=[str(folders[a]) for a in todo]) if todo else ()
                for chunk in stream:
                    read += chunk.bytes_read
                    for a, t in zip(todo, chunk.outputs):
                        wb.submit(writers[a], chunk.name, t)
                    bar.set_postfix_str(f"tensors {chunk.index + 1}/{len(plan)}", refresh=False)
                wb.flush()
            finally:
                wb.close()
        for a in todo:
            writers[a].close()
            _write_extras(tmps[a], files, settings[a], records[a], prov, a, o, reasoner, delta, base, output)
    warn_nonfinite(nonfinite)
    return MaterializeResult(folders, todo, [a for a in alphas if a not in todo], read, total_w)


def _check_options(o: MaterializeOptions) -> list[float]:
    if not o.alphas:
        raise OptionsError("no α given", where="--alpha", fix="pass e.g. --alpha 0.6 (repeat for more)")
    check_alphas(o.alphas)
    MergeConfig(0.0, o.include, o.exclude)  # checks the regular expressions
    if "{alpha}" not in o.name_template and len(set(o.alphas)) > 1:
        raise OptionsError("--name-template has no {alpha}", where=o.name_template, fix="e.g. alpha-{alpha}")
    return list(dict.fromkeys(float(a) for a in o.alphas))


def materialize_record(inputs: dict, config: MergeConfig, o: MaterializeOptions) -> dict:
    """The finished-work record of one α folder: the merge settings and the inputs' content (`DeltaSource`)."""
    keep = ("dtype", "config_from", "allow_nonfinite")
    return stage_record(stage="materialize", options={**inputs["options"], **config.to_dict(),
                                                      **{k: getattr(o, k) for k in keep}}, inputs=inputs["inputs"])


def _folder_name(template: str, a: float) -> str:
    """The α folder's name from --name-template; an unknown {key} is a one-line error."""
    try:
        return alpha_name(a, template)
    except (KeyError, IndexError, ValueError) as e:
        raise OptionsError(f"--name-template has an unknown or malformed field ({type(e).__name__}: {e})",
                           where=template, fix="the only field is {alpha}, e.g. alpha-{alpha}") from None


def _settings(a, b, o, reasoner, delta) -> dict:
    keep = ("dtype", "config_from", "include", "exclude", "vocab", "allow_missing")
    return {"alpha": a, "base": b.source.describe(), "reasoner": str(reasoner) if reasoner else None,
            "delta": str(delta) if delta else None, **{k: v for k, v in asdict(o).items() if k in keep}}


def _write_extras(tmp: Path, files, settings, record, prov, a, o, reasoner, delta, base, output) -> None:
    for fname, data in files.items():
        (tmp / fname).write_bytes(data)
    dtype = json.loads(files["config.json"]).get("torch_dtype") or json.loads(files["config.json"]).get("dtype")
    src = f"--reasoner {reasoner}" if reasoner else f"--delta {delta}"
    cmd = f"tvtool materialize {base} {src} --alpha {format_alpha(a)} -o {output}"
    cmd += "".join(f" --{k.replace('_', '-')} {v}" for k, v in (("include", o.include), ("exclude", o.exclude),
                                                                ("dtype", o.dtype), ("config_from", o.config_from))
                   if v and v not in ("auto", "reasoner"))
    reasoner_src = prov.get("reasoner") if isinstance(prov.get("reasoner"), dict) else None
    card = model_card(alpha=a, base=settings["base"], reasoner=reasoner_src, delta=prov if delta else None,
                      dtype=str(dtype or o.dtype), include=o.include, exclude=o.exclude,
                      config_from=o.config_from, command=cmd, low_rank=prov.get("low_rank"))
    (tmp / "README.md").write_text(card)
    info = {"tvtool_version": __version__, "settings": settings, "delta_provenance": prov, RECORD_KEY: record}
    (tmp / SETTINGS_FILE).write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")

