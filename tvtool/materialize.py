"""`materialize`: write θ1 + α·Δ for many α in one pass over the inputs.

Each input tensor is read once, in row chunks, however many α are asked for; the
sum is float32 and rounded once. Every α becomes a complete model folder (shards,
index, config/tokenizer files, model card) written under `<name>.partial/` and
renamed only when complete, so an interrupted run never leaves a folder that
looks done, and re-running finishes the job.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from . import __version__
from .card import model_card
from .checkpoint import Checkpoint
from .delta import DTYPES
from .errors import MismatchError, OptionsError, OutputError
from .finite import check_alphas, check_finite, warn_nonfinite
from .lock import output_lock
from .options import check_regex, opt
from .output import ShardedWriter, WriteBehind, discard, finish_dir, parse_size, prefetch, progress, start_dir
from .paths import check_inside, check_output_apart
from .safetensors_io import row_chunks
from .taskvector import LM_HEAD, TaskVector, is_vocab_tensor, merge_plan, merge_rows

SETTINGS_FILE = "tvtool.json"


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


def format_alpha(a: float) -> str:
    """0.6 → '0.6', 1.0 → '1', -0.5 → '-0.5'."""
    return f"{a:g}" if abs(a) < 1e16 else repr(a)


def materialize(*, base: str | os.PathLike, output: str | os.PathLike, delta: str | os.PathLike | None = None,
                reasoner: str | os.PathLike | None = None, options: MaterializeOptions) -> MaterializeResult:
    """Write θ1 + α·Δ for every α in `options.alphas` under `output`, reading each input once."""
    o = options
    alphas = _check_options(o, delta, reasoner)
    if reasoner is not None:
        tv = TaskVector.between(base, reasoner, allow_missing=o.allow_missing, vocab=o.vocab,
                                allow_pickle=o.allow_pickle)
        b = tv.pair.base
    else:
        b = Checkpoint.open(base, allow_pickle=o.allow_pickle)
        tv = TaskVector.load(delta)
    plan = merge_plan(b, tv)
    inc, exc = (re.compile(o.include) if o.include else None), (re.compile(o.exclude) if o.exclude else None)
    selected = {n for n, _ in plan if n in tv and (not inc or inc.search(n)) and not (exc and exc.search(n))}
    _check_selection(tv, inc, exc, selected)
    dtype_of = {n: (DTYPES[o.dtype] if o.dtype != "auto" and b.info(src).dtype.is_floating_point
                    else b.info(src).dtype) for n, src in plan}
    wplan = [(n, dtype_of[n], b.info(src).shape) for n, src in plan]
    files = _side_files(b, tv, o, wplan)
    prov = tv.provenance()
    out = Path(output)
    folders = {a: out / _folder_name(o.name_template, a) for a in alphas}
    for f in folders.values():
        check_inside(f, out, flag=f"--name-template {o.name_template}")
        check_output_apart(f, [b.source.path, *tv.sources()], flag="-o/--name-template")
    if len(set(folders.values())) != len(folders):
        raise OptionsError("two α values map to the same folder name", where=o.name_template,
                           fix="include {alpha} in --name-template")
    nonfinite: dict[str, int] = {}
    with output_lock(out):
        settings = {a: _settings(a, b, tv, o, reasoner, delta) for a in alphas}
        todo = [a for a in alphas if not _complete(folders[a], settings[a], o.overwrite)]
        tmps = {a: start_dir(folders[a]) for a in todo}
        writers = {a: ShardedWriter(folder=tmps[a], plan=wplan, metadata={"format": "pt"},
                                    max_shard_size=parse_size(o.max_shard_size)) for a in todo}
        total_w = sum(w.total_size for w in writers.values())
        read = 0

        def reads():  # (tensor index, name, base rows, Δ rows, θ2 rows), in a prefetch thread
            for i, (name, src) in enumerate(plan if todo else []):
                shape = b.info(src).shape
                n_delta = tv.shape(name)[0] if name in selected and shape else None
                for s, e in _chunks(shape, n_delta):
                    use = name in selected and (n_delta is None or s < n_delta)
                    if use:  # in the prefetch thread
                        yield (i, name, s, *tv.merge_inputs(b, name, src, s, e))
                    else:
                        yield i, name, s, b.read(src, s, e), None, None, None

        try:
            with progress(total_w, f"materialize {len(todo)} α", o.progress and bool(todo)) as bar:
                wb = WriteBehind(on_bytes=bar.update)
                try:
                    for i, name, s, base_rows, base32, d, end in prefetch(reads()):
                        read += base_rows.numel() * base_rows.element_size() * (2 if end is not None else 1)
                        bad = check_finite(name, base_rows, s, counts=nonfinite, allow=o.allow_nonfinite,
                                           what="the base", where=str(base))
                        if d is not None:
                            bad += check_finite(name, d, s, counts=nonfinite, allow=o.allow_nonfinite,
                                                where=str(reasoner or delta))
                        for a in todo:
                            if a == 1.0 and end is not None:
                                chunk = end.to(dtype_of[name])  # θ2 as stored: α=1 is the reasoner bit for bit
                            else:
                                chunk = merge_rows(base_rows, d, a, dtype_of[name], base32=base32)
                                if not bad:
                                    check_finite(name, chunk, s, where=str(folders[a]), overflow=(
                                        f"θ1 + α·Δ in {str(dtype_of[name]).removeprefix('torch.')} at α={a:g}"),
                                        overflow_fix="use a smaller |α|, or --dtype float32")
                            wb.submit(writers[a], name, chunk)
                        bar.set_postfix_str(f"tensors {i + 1}/{len(plan)}", refresh=False)
                    wb.flush()
                finally:
                    wb.close()
                for a in todo:
                    writers[a].close()
                    _write_extras(tmps[a], files, settings[a], prov, a, o, reasoner, delta, base, output)
        except BaseException:
            for a in todo:
                writers[a].abort()
                discard(tmps[a])
            raise
        for a in todo:
            finish_dir(tmps[a], folders[a])
    warn_nonfinite(nonfinite)
    return MaterializeResult(folders, todo, [a for a in alphas if a not in todo], read, total_w)


def _check_options(o: MaterializeOptions, delta, reasoner) -> list[float]:
    if (delta is None) == (reasoner is None):
        raise OptionsError("give exactly one of --delta and --reasoner", fix="Δ comes from a delta file or a reasoner")
    if not o.alphas:
        raise OptionsError("no α given", where="--alpha", fix="pass e.g. --alpha 0.6 (repeat for more)")
    check_alphas(o.alphas)
    check_regex("--include", o.include)
    check_regex("--exclude", o.exclude)
    if "{alpha}" not in o.name_template and len(set(o.alphas)) > 1:
        raise OptionsError("--name-template has no {alpha}", where=o.name_template, fix="e.g. alpha-{alpha}")
    return list(dict.fromkeys(float(a) for a in o.alphas))


def _folder_name(template: str, a: float) -> str:
    """The α folder's name from --name-template; an unknown {key} is a one-line error."""
    try:
        return template.format(alpha=format_alpha(a))
    except (KeyError, IndexError, ValueError) as e:
        raise OptionsError(f"--name-template has an unknown or malformed field ({type(e).__name__}: {e})",
                           where=template, fix="the only field is {alpha}, e.g. alpha-{alpha}") from None


def _check_selection(tv: TaskVector, inc, exc, selected: set[str]) -> None:
    """--include must match some Δ tensor and --exclude must leave some: else the 'merges' are base copies."""
    names = tv.names()
    hint = ", ".join(repr(n) for n in names[:4])
    if inc is not None and not any(inc.search(n) for n in names):
        raise OptionsError(f"--include matches no tensor of the delta ({len(names)} tensors, e.g. {hint})",
                           where=f"--include {inc.pattern}", fix="use a regex that matches some of these names")
    if not selected:
        raise OptionsError(f"--exclude leaves no tensor to merge ({len(names)} tensors, e.g. {hint})",
                           where=f"--exclude {exc.pattern if exc else None}",
                           fix="loosen --exclude (or --include) so that some tensors get α·Δ")


def _chunks(shape, n_delta):
    """Row chunks that never straddle the end of Δ's rows (vocab intersect)."""
    if n_delta is None or not shape or n_delta >= shape[0]:
        return row_chunks(shape)
    return row_chunks((n_delta, *shape[1:])) + [(s + n_delta, e + n_delta)
                                               for s, e in row_chunks((shape[0] - n_delta, *shape[1:]))]


def _side_files(b: Checkpoint, tv: TaskVector, o: MaterializeOptions, wplan) -> dict[str, bytes]:
    files = tv.side_files() if o.config_from == "reasoner" else b.side_files()
    if "config.json" not in files:
        raise MismatchError(f"no config.json in the {o.config_from}'s files",
                            fix="use --config-from base" if o.config_from == "reasoner" else "add a config.json")
    cfg = json.loads(files["config.json"])
    names = {n: s for n, _, s in wplan}
    for n, shape in names.items():
        vs = cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")
        if is_vocab_tensor(n) and vs and shape[0] != vs:
            raise MismatchError(f"output tensor {n!r} has {shape[0]} vocabulary rows but the {o.config_from}'s "
                                f"config.json says vocab_size {vs}", fix="use --config-from base")
    dtypes = {d for _, d, _ in wplan if d.is_floating_point}
    if len(dtypes) == 1:
        name = str(dtypes.pop()).removeprefix("torch.")
        for key in ("torch_dtype", "dtype"):
            if key in cfg:
                cfg[key] = name
    if LM_HEAD in names and cfg.get("tie_word_embeddings"):
        cfg["tie_word_embeddings"] = False  # the output has its own lm_head
    files["config.json"] = (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()
    return files


def _settings(a, b, tv, o, reasoner, delta) -> dict:
    keep = ("dtype", "config_from", "include", "exclude", "vocab", "allow_missing")
    return {"alpha": a, "base": b.source.describe(), "reasoner": str(reasoner) if reasoner else None,
            "delta": str(delta) if delta else None, **{k: v for k, v in asdict(o).items() if k in keep}}


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


def _write_extras(tmp: Path, files, settings, prov, a, o, reasoner, delta, base, output) -> None:
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
    record = {"tvtool_version": __version__, "settings": settings, "delta_provenance": prov}
    (tmp / SETTINGS_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")

