"""`delta`: write the task vector Δ = θ2 − θ1 of a base/reasoner pair to disk.

Computed in float32 tensor by tensor (in row chunks), rounded once to the stored
dtype. The output carries its provenance and the reasoner's config/tokenizer files,
so `materialize --delta` can write complete models without the reasoner at hand.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tvtool._version import __version__
from tvtool.errors import OutputError
from tvtool.io.finished import META_KEY, is_finished, stage_record
from tvtool.io.finite import check_finite, warn_nonfinite
from tvtool.io.layout import DTYPES, dtype_name
from tvtool.io.lock import output_lock
from tvtool.options import CliOptions, opt
from tvtool.io.writer import human, parse_size, plan_bytes, progress, write_tensors
from tvtool.io.paths import check_output_apart
from tvtool.io.safetensors_io import row_chunks
from tvtool.vectors.source import DeltaSource
from tvtool.vectors.terms import common_dtype


@dataclass(frozen=True)
class DeltaOptions(CliOptions):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "Stored dtype of Δ. auto: the checkpoints' dtype. float32 makes α=1 give the reasoner bit for bit.")
    max_shard_size: str = opt("5GB", "Largest shard. A .safetensors output must fit in one; a folder output is sharded.")
    allow_missing: bool = opt(False, "Keep going when a tensor is in only one model (the names are recorded).")
    vocab: Literal["error", "intersect"] = opt(
        "error", "Vocabulary rows differ (embed_tokens/lm_head): error, or intersect = Δ over the shared rows only.")
    allow_pickle: bool = opt(False, "Accept *.bin pickle checkpoints, loaded with torch.load(weights_only=True).")
    allow_nonfinite: bool = opt(False, "Copy NaN/Inf values of the checkpoints into Δ (with a warning) instead of "
                                       "stopping at the first one.")
    overwrite: bool = opt(False, "Replace an existing output made from other inputs or options.")
    progress: bool = opt(True, "Show a progress bar.")


@dataclass(frozen=True)
class DeltaResult:
    output: Path
    files: list[Path]
    tensors: int
    nbytes: int
    dtype: str
    skipped: list[dict]
    missing: dict
    reused: bool = False  # already complete: the output's record matched

    def summary(self) -> str:
        s = f"wrote Δ: {self.tensors} tensors, {human(self.nbytes)} {self.dtype} → {self.output}"
        if self.reused:
            s = f"Δ already complete: {self.tensors} tensors, {human(self.nbytes)} {self.dtype} → {self.output}"
        if self.skipped:
            s += f"; skipped {len(self.skipped)} ({', '.join(d['name'] for d in self.skipped[:3])}…)"
        if self.missing:
            s += f"; {sum(map(len, self.missing.values()))} tensors in one model only (recorded)"
        return s


def delta(*, base: str | os.PathLike, reasoner: str | os.PathLike, output: str | os.PathLike,
          options: DeltaOptions = DeltaOptions()) -> DeltaResult:
    """Write Δ = reasoner − base to `output` (a .safetensors file, or a folder of shards)."""
    o = options
    source = delta_source(base=base, reasoner=reasoner, options=o)
    tv = source.open().tv
    dtype, plan = delta_plan(tv, o)
    out = Path(output)
    single = out.suffix == ".safetensors"
    max_shard = parse_size(o.max_shard_size)
    if single and plan_bytes(plan) > max_shard:
        raise OutputError(f"Δ is {human(plan_bytes(plan))}, over --max-shard-size {o.max_shard_size}",
                          where=str(out), fix="give a folder path for -o (it will be sharded) "
                                              "or raise --max-shard-size")
    check_output_apart(out, tv.sources())
    prov = tv.provenance()
    meta = {"format": "pt", "tvtool.kind": "delta", "tvtool.version": __version__,
            "tvtool.base": json.dumps(prov["base"]), "tvtool.reasoner": json.dumps(prov["reasoner"]),
            "tvtool.dtype": dtype_name(dtype), "tvtool.vocab": o.vocab,
            "tvtool.skipped": json.dumps(prov["skipped"]), "tvtool.missing": json.dumps(prov["missing"])}
    record = delta_record(source, dtype=dtype_name(dtype), allow_nonfinite=o.allow_nonfinite)
    meta[META_KEY] = json.dumps(record, sort_keys=True)  # the delta's own fingerprint travels with it
    nonfinite: dict[str, int] = {}
    where = f"{base} → {reasoner}"

    def fill(writer):
        with progress(plan_bytes(plan), "delta", o.progress) as bar:
            for i, (name, _, shape) in enumerate(plan):
                for s, e in row_chunks(shape):
                    d = tv.rows(name, s, e)  # [rows, ...] fp32
                    bad = check_finite(name, d, s, counts=nonfinite, allow=o.allow_nonfinite, where=where)
                    chunk = d.to(dtype)
                    if not bad and dtype != DTYPES["float32"]:
                        check_finite(name, chunk, s, where=where, overflow=f"Δ in {dtype_name(dtype)}")
                    bar.update(writer.write(name, chunk))
                bar.set_postfix_str(f"tensors {i + 1}/{len(plan)}", refresh=False)

    with output_lock(out):
        if is_finished(out, record, overwrite=o.overwrite, what=f"delta {out.name}"):
            files = sorted(out.glob("*.safetensors")) if out.is_dir() else [out]
            return DeltaResult(out, files, len(plan), plan_bytes(plan), dtype_name(dtype), prov["skipped"],
                               prov["missing"], reused=True)
        written = write_tensors(out=out, plan=plan, metadata=meta, files=tv.side_files(),
                                max_shard_size=max_shard, fill=fill)
    warn_nonfinite(nonfinite)
    return DeltaResult(out, written, len(plan), plan_bytes(plan), dtype_name(dtype),
                       prov["skipped"], prov["missing"])



def delta_source(*, base: str | os.PathLike, reasoner: str | os.PathLike, options: DeltaOptions) -> DeltaSource:
    """The pair `delta` reads, with its options' source settings."""
    o = options
    return DeltaSource(base=base, reasoner=reasoner, allow_missing=o.allow_missing, vocab=o.vocab,
                       allow_pickle=o.allow_pickle)


def delta_plan(tv, options: DeltaOptions) -> tuple[torch.dtype, list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """(stored dtype, [(name, dtype, shape)]) of the Δ that `delta` writes for the pair `tv` (headers only)."""
    pair = tv.pair()
    dtype = common_dtype(pair.base, pair.reasoner) if options.dtype == "auto" else DTYPES[options.dtype]
    return dtype, [(n, dtype, tv.shape(n)) for n in tv.names()]


def delta_record(source: DeltaSource, *, dtype: str, allow_nonfinite: bool) -> dict:
    """The finished-work record of a delta (stored in its metadata): options + the pair's content."""
    fp = source.fingerprint_record()
    return stage_record(stage="delta", options={**fp["options"], "dtype": dtype, "allow_nonfinite": allow_nonfinite},
                        inputs=fp["inputs"])
