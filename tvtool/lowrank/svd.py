"""`svd_rank`: replace Δ by low-rank factors, Δ[X] ≈ X.lora_B @ X.lora_A, per 2-D weight.

CoT-Valve applies Δ through LoRA (rank 2 for QwQ-32B, 32 for Llama), so a low-rank Δ
is both smaller and servable as an adapter. Each selected 2-D tensor is factorized
in float32 with a truncated SVD: B = U_k·√S_k [out, k], A = √S_k·V_kᵀ [k, in]. The
rank is fixed (`rank`) or the smallest k with ΣS²[:k]/‖Δ‖²_F ≥ `energy` (capped by
`max_rank`). Randomized SVD (torch.svd_lowrank) is the default; `exact` is a full SVD.

Energy with randomized SVD: ‖Δ‖²_F is exact and cheap, and a sketch of width
k_try + oversample gives the top k_try singular values (power iterations make them
accurate; they are lower bounds, so the chosen k never undershoots the threshold).
If the threshold is not met within k_try, k_try doubles; once the sketch would be
wider than min(shape)/2 a full SVD is cheaper and is used instead.

Two passes, each input tensor read once: pass 1 factorizes and holds only the
factors (rank·(in+out) per tensor, a few % of the model at rank ≤ 64); pass 2 knows
the whole layout, so it streams factors and kept-full tensors into the atomic output.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from tvtool._version import __version__
from tvtool.io.atomic import write_text
from tvtool.errors import CheckpointError, OptionsError, OutputError
from tvtool.io.finished import META_KEY, RECORD_KEY, is_finished, read_record, stage_record
from tvtool.io.finite import check_alphas, check_finite
from tvtool.io.layout import DTYPES, FACTOR_A, FACTOR_B, is_vocab_tensor
from tvtool.io.lock import output_lock
from tvtool.lowrank.merged import LowRankInput, open_input, operator_config
from tvtool.lowrank.report import TensorReport, adapter_shares, compact, plot_spectra, totals
from tvtool.merge.options import MergeOptions
from tvtool.options import CliOptions, check_regex, opt
from tvtool.io.writer import check_free, human, parse_size, plan_bytes, write_tensors
from tvtool.io.paths import check_output_apart
from tvtool.lowrank.peft_adapter import adapter_folders, write_peft_adapters
from tvtool.io.safetensors_io import row_chunks
from tvtool.vectors.source import DeltaSource
from tvtool.vectors.taskvector import TaskVector


@dataclass(frozen=True)
class LowRankOptions(CliOptions):
    rank: int | None = opt(None, "Rank of every factorized tensor (exclusive with --energy).", short="-r")
    energy: float | None = opt(None, "Per tensor, the smallest rank keeping this share of ‖Δ‖² (0 < E ≤ 1).")
    max_rank: int | None = opt(None, "With --energy: never exceed this rank.")
    method: Literal["randomized", "exact"] = opt("randomized", "randomized: torch.svd_lowrank; exact: full SVD.")
    oversample: int = opt(16, "Randomized SVD: extra sketch columns beyond the rank.")
    niter: int = opt(4, "Randomized SVD: power iterations.")
    include: str | None = opt(None, "Factorize only 2-D tensors matching this regex (default: all 2-D tensors "
                                    "except embeddings/lm_head, which are kept full unless matched here).")
    exclude: str | None = opt(None, "Never factorize tensors matching this regex (they are kept full or dropped).")
    drop_unfactored: bool = opt(False, "Drop 1-D and unselected tensors (recorded; materialize leaves them at base).")
    dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "Stored dtype of factors and kept tensors.")
    peft: str | None = opt(None, "Also write a PEFT/vLLM LoRA adapter folder here (one sub-folder per --peft-alpha).")
    peft_alpha: tuple[float, ...] = opt((1.0,), "α baked into each adapter (B is scaled by α).")
    plot: bool = opt(False, "Write a PNG of the singular-value spectra next to the report.")
    seed: int = opt(0, "Seed of the randomized SVD.")
    threads: int = opt(0, "torch threads for the SVDs (0: torch's default, all cores).")
    max_shard_size: str = opt("5GB", "Largest shard. A .safetensors output must fit in one; a folder is sharded.")
    overwrite: bool = opt(False, "Replace an existing output.")
    progress: bool = opt(True, "Show a progress bar.")


@dataclass(frozen=True)
class LowRankResult:
    output: Path
    files: list[Path]
    report_path: Path
    plot_path: Path | None
    tensors: list[TensorReport]
    totals: dict
    adapters: dict[float, Path] = field(default_factory=dict)

    def table(self) -> str:
        """Per-tensor table with totals, as printed by the CLI."""
        rows = [f"{'tensor':<52} {'shape':>13} {'rank':>5} {'energy':>8} {'rel.err':>8}"]
        for t in self.tensors:
            shape = "×".join(map(str, t.shape))
            if t.kind == "factored":
                rows.append(f"{t.name:<52} {shape:>13} {t.rank:>5} {t.energy:>8.4f} {t.rel_error:>8.4f}")
            else:
                rows.append(f"{t.name:<52} {shape:>13} {t.kind:>5}")
        s = self.totals
        rows.append(f"total: {s['factored']} factored, {s['full']} kept full, {s['dropped']} dropped; "
                    f"‖Δ‖² kept {s['energy_kept']:.4f} (rel. error {s['rel_error']:.4f}); "
                    f"{human(s['bytes'])} written → {self.output}")
        ad = s["adapter"]
        rows.append(f"a LoRA adapter carries {100 * ad['kept']:.2f}% of ‖Δ‖² "
                    f"(truncation {100 * ad['truncation']:.2f}%, "
                    f"not carried {100 * ad['not_carried']:.3f}%: "
                    + ", ".join(f"{k} {100 * v:.3f}%" for k, v in ad["not_carried_by_kind"].items()) + ")")
        for a, p in self.adapters.items():
            rows.append(f"adapter α={a:g} → {p}")
        return "\n".join(rows)

    summary = table


def svd_rank(*, source: DeltaSource | None, output: str | os.PathLike, options: LowRankOptions,
             merge: MergeOptions = MergeOptions()) -> LowRankResult:
    """Write a factored delta (and optionally LoRA adapters) from a delta or a base/reasoner pair (`source`);
    with operator settings (`merge`, several task vectors), of the operator's merged M (`tvtool.lowrank.merged`)."""
    o = options
    _check_options(o, source)
    config = operator_config(merge=merge, n_vectors=1 + len(source.more))
    inp = open_input(source=source, config=config)
    tv = inp.tv
    src = str(source.delta) if source.delta is not None else f"{source.base} → {source.reasoner}"
    src += f" ({config.tag()} of {len(inp.vectors)} task vectors)" if config is not None else ""
    names = tv.names()
    choice = select(names=names, shapes={n: tv.shape(n) for n in names}, options=o, where=src)
    out = Path(output)
    inputs = [p for t in inp.vectors for p in t.sources()]
    check_output_apart(out, inputs)
    if o.peft:
        check_output_apart(o.peft, [*inputs, out], flag="--peft")
    record = lowrank_record(source, o, operator=inp.settings())
    with output_lock(out):
        if is_finished(report_path(out), record, overwrite=o.overwrite, what=f"svd-rank {out.name}"):
            return _reuse(out, o)
        if out.exists() and not report_path(out).exists() and \
                (read_record(out) or {}).get("fingerprint") != record["fingerprint"]:
            is_finished(out, record, overwrite=o.overwrite, what=f"svd-rank {out.name}")  # refuses, or says why
        return _svd_rank(inp, src, names, choice, out, o, record)


def lowrank_record(source: DeltaSource, o: LowRankOptions, *, operator: dict | None = None) -> dict:
    """The finished-work record of svd-rank: the options that change its outputs, the operator whose M
    is factored (`LowRankInput.settings`; none for plain Δ), and the inputs' content."""
    fp = source.fingerprint_record()
    skip = {"peft", "threads", "max_shard_size", "overwrite", "progress"}
    opts = {k: v for k, v in asdict(o).items() if k not in skip}
    return stage_record(stage="svd-rank", options={**fp["options"], **opts, "adapters": bool(o.peft),
                                                   **({"merge": operator} if operator else {})}, inputs=fp["inputs"])


def report_path(out: Path) -> Path:
    """Where svd-rank writes its report (last): `X.lowrank.json` beside a file, `lowrank.json` in a folder."""
    return out.with_suffix(".lowrank.json") if out.suffix == ".safetensors" else out / "lowrank.json"


def _reuse(out: Path, o: LowRankOptions) -> LowRankResult:
    """The result of a finished svd-rank, from its report."""
    rp = report_path(out)
    rec = json.loads(rp.read_text())
    tensors = [TensorReport(**{**t, "shape": tuple(t["shape"])}) for t in rec["tensors"]]
    files = sorted(out.glob("*.safetensors")) if out.is_dir() else [out]
    plot = rp.with_suffix(".png") if o.plot else None
    return LowRankResult(out, files, rp, plot, tensors, rec["totals"],
                         {float(a): Path(p) for a, p in rec.get("adapters", {}).items()})


def _svd_rank(inp: LowRankInput, src: str, names: list[str], choice: dict[str, str], out: Path,
              o: LowRankOptions, record: dict) -> LowRankResult:
    tv, values = inp.tv, inp.values  # values: Δ, or the operator's M (names and shapes of Δ)
    if o.peft:
        for f in adapter_folders(output=o.peft, alphas=o.peft_alpha).values():
            check_free(f, overwrite=o.overwrite, what="adapter folder")
    dtype = DTYPES[o.dtype]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    spectra: dict[str, torch.Tensor] = {}
    reports: dict[str, TensorReport] = {}
    threads = torch.get_num_threads()
    if o.threads > 0:
        torch.set_num_threads(o.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(o.seed)
            for name in tqdm(names, desc="svd-rank", disable=not o.progress, leave=False):
                if choice[name] != "factor":
                    kind = "full" if choice[name] == "full" else "dropped"
                    reason = _drop_reason(tv.shape(name)) if kind == "dropped" else None
                    reports[name] = TensorReport(name, tv.shape(name), kind, _norm_sq(values, name), reason=reason)
                    continue
                d = values.get(name)  # [out, in] fp32
                check_finite(name, d, where=src)  # an SVD of NaN/Inf fails with a LinAlgError naming nothing
                t0 = time.perf_counter()
                B, A, S, norm_sq, method = factorize(d, rank=o.rank, energy=o.energy, max_rank=o.max_rank,
                                                     method=o.method, oversample=o.oversample, niter=o.niter)
                k = A.shape[0]
                reports[name] = TensorReport(
                    name, tuple(d.shape), "factored", norm_sq, rank=k, method=method,
                    energy=float((S[:k].double() ** 2).sum() / norm_sq) if norm_sq else 1.0,
                    rel_error=math.sqrt(residual_sq(d, B, A) / norm_sq) if norm_sq else 0.0,
                    seconds=round(time.perf_counter() - t0, 4))
                factors[name] = (B.to(dtype), A.to(dtype))
                spectra[name] = S
                del d
    finally:
        torch.set_num_threads(threads)
    tensors = [reports[n] for n in names]
    prov = tv.provenance()
    skipped = list(prov.get("skipped") or []) + [{"name": t.name, "reason": t.reason}
                                                 for t in tensors if t.kind == "dropped"]
    low_rank = {"rank": o.rank, "energy": o.energy, "max_rank": o.max_rank, "method": o.method,
                "oversample": o.oversample, "niter": o.niter, "dtype": o.dtype,
                "report": {t.name: compact(t) for t in tensors}}
    meta = {"format": "pt", "tvtool.kind": "factored-delta", "tvtool.version": __version__,
            "tvtool.base": json.dumps(prov.get("base")), "tvtool.reasoner": json.dumps(prov.get("reasoner")),
            "tvtool.dtype": str(prov.get("dtype")), "tvtool.skipped": json.dumps(skipped),
            "tvtool.missing": json.dumps(prov.get("missing") or {}), "tvtool.low_rank": json.dumps(low_rank)}
    if prov.get("zero_elsewhere"):  # from a PEFT adapter: Δ = 0 on the tensors it does not name
        meta["tvtool.zero_elsewhere"] = "true"
    if "delta" in prov:
        meta["tvtool.source_delta"] = json.dumps(prov["delta"])
    if inp.settings():  # M = the operator's merge of the task vectors, not Δ
        meta["tvtool.merge"] = json.dumps(inp.settings())
    meta[META_KEY] = json.dumps(record, sort_keys=True)  # the factored delta's own fingerprint
    plan = []
    for n in names:
        if choice[n] == "factor":
            B, A = factors[n]
            plan += [(n + FACTOR_A, dtype, tuple(A.shape)), (n + FACTOR_B, dtype, tuple(B.shape))]
        elif choice[n] == "full":
            plan.append((n, dtype, tv.shape(n)))
    files = _write(out, plan, meta, tv, values, factors, choice, o)
    tot = totals(tensors, plan_bytes(plan))
    rp = report_path(out)
    plot_path = rp.with_suffix(".png") if o.plot else None
    adapters: dict[float, Path] = {}
    if o.peft:
        adapters = write_peft_adapters(factored=out, output=o.peft, alphas=o.peft_alpha, overwrite=o.overwrite)
    tot["adapter"] = adapter_shares(tensors)
    info = {"tvtool_version": __version__, "source": src, "options": asdict(o), "merge": inp.settings(), "totals": tot,
              "adapters": {str(a): str(p) for a, p in adapters.items()},
              "tensors": [asdict(t) for t in tensors]}
    if plot_path is not None:
        plot_spectra(spectra=spectra, reports=reports, path=plot_path)
    write_text(rp, json.dumps({**info, RECORD_KEY: record}, indent=2, default=str) + "\n")  # last: finished
    return LowRankResult(out, files, rp, plot_path, tensors, tot, adapters)


# -- choosing and factorizing -------------------------------------------------------------
def select(*, names: list[str], shapes: dict[str, tuple[int, ...]], options: LowRankOptions,
           where: str) -> dict[str, str]:
    """name → "factor" | "full" | "drop"; validates the rank against every factorized shape."""
    o = options
    inc = re.compile(o.include) if o.include else None
    exc = re.compile(o.exclude) if o.exclude else None
    out = {}
    for n in names:
        s = shapes[n]
        picked = len(s) == 2 and (inc.search(n) if inc else not is_vocab_tensor(n)) and not (exc and exc.search(n))
        out[n] = "factor" if picked else ("drop" if o.drop_unfactored else "full")
    chosen = [n for n in names if out[n] == "factor"]
    if not any(len(shapes[n]) == 2 for n in names):
        raise CheckpointError("the delta has no 2-D tensors to factorize", where=where,
                              fix="give a delta of a transformer checkpoint")
    if not chosen:
        raise OptionsError("no 2-D tensor is selected for factorization",
                           where=f"--include {o.include!r} --exclude {o.exclude!r}",
                           fix="loosen --include/--exclude (embeddings/lm_head need an explicit --include)")
    if o.rank is not None:
        for n in chosen:
            if o.rank > min(shapes[n]):
                raise OptionsError(f"rank {o.rank} exceeds min(shape) = {min(shapes[n])} of tensor {n!r} "
                                   f"{tuple(shapes[n])}", where="--rank",
                                   fix="lower --rank, or --exclude that tensor")
    return out


def factorize(d: torch.Tensor, *, rank: int | None, energy: float | None, max_rank: int | None = None,
              method: str = "randomized", oversample: int = 16, niter: int = 4
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, str]:
    """Δ [m, n] fp32 → (B [m, k], A [k, n], singular values computed, ‖Δ‖²_F, method used)."""
    m, n = d.shape
    small = min(m, n)
    norm_sq = float(torch.linalg.vector_norm(d, dtype=torch.float64) ** 2)
    cap = min(small, max_rank or small)
    k_try = rank if rank is not None else min(16, cap)
    while True:
        q = min(k_try + oversample, small)
        if method == "exact" or 2 * q > small:
            U, S, Vh = torch.linalg.svd(d, full_matrices=False)  # [m, s], [s], [s, n]
            used = "exact"
        else:
            U, S, V = torch.svd_lowrank(d, q=q, niter=niter)  # [m, q], [q], [n, q]
            Vh, used = V.mT, "randomized"
        if rank is not None:
            k = rank
            break
        k = choose_rank(S, norm_sq, energy)
        if used == "exact" or k_try >= cap:  # all values seen, or capped: float rounding may miss E=1
            k = cap if k is None else min(k, cap)
            break
        if k is not None and k <= k_try:  # met within the trusted (non-oversampled) values
            break
        k_try = min(2 * k_try, cap)
    root = S[:k].sqrt()  # [k]
    B = U[:, :k] * root  # [m, k]
    A = root[:, None] * Vh[:k]  # [k, n]
    return B.contiguous(), A.contiguous(), S, norm_sq, used


def choose_rank(s: torch.Tensor, norm_sq: float, energy: float) -> int | None:
    """Smallest k with Σs²[:k] / ‖Δ‖² ≥ energy, or None if the values given do not reach it."""
    if norm_sq == 0.0:
        return 0
    cum = torch.cumsum(s.double() ** 2, 0) / norm_sq  # [len(s)]
    hit = torch.nonzero(cum >= energy - 1e-12)
    return int(hit[0]) + 1 if len(hit) else None


def residual_sq(d: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> float:
    """‖Δ − B·A‖²_F, in row chunks (never a second full-size tensor)."""
    total = 0.0
    for s, e in row_chunks(tuple(d.shape), 1 << 22):
        r = d[s:e] - B[s:e] @ A  # [rows, n]
        total += float(torch.linalg.vector_norm(r, dtype=torch.float64) ** 2)
    return total


# -- writing ------------------------------------------------------------------------------
def _write(out: Path, plan, meta: dict, tv: TaskVector, values, factors, choice, o: LowRankOptions):
    """Pass 2: stream factors and kept-full tensors into `out` atomically; returns the files written."""
    single = out.suffix == ".safetensors"
    max_shard = parse_size(o.max_shard_size)
    if single and plan_bytes(plan) > max_shard:
        raise OutputError(f"the factored delta is {human(plan_bytes(plan))}, over --max-shard-size "
                          f"{o.max_shard_size}", where=str(out), fix="give a folder path for -o or raise it")
    dtype = DTYPES[o.dtype]

    def fill(writer):
        for n, c in choice.items():
            if c == "factor":
                B, A = factors[n]
                writer.write(n + FACTOR_A, A)
                writer.write(n + FACTOR_B, B)
            elif c == "full":
                for s, e in row_chunks(tv.shape(n)):
                    writer.write(n, values.rows(n, s, e).to(dtype))  # [rows, ...] fp32 → dtype

    return write_tensors(out=out, plan=plan, metadata=meta, files=tv.side_files(), max_shard_size=max_shard,
                         fill=fill)


def _norm_sq(tv, name: str) -> float:
    """‖Δ[name]‖²_F, streamed in row chunks."""
    return sum(float(torch.linalg.vector_norm(tv.rows(name, s, e), dtype=torch.float64) ** 2)
               for s, e in row_chunks(tv.shape(name)))


def _drop_reason(shape: tuple[int, ...]) -> str:
    if len(shape) != 2:
        return f"{len(shape)}-D tensor, not factorized (--drop-unfactored)"
    return "not selected for factorization (--drop-unfactored)"


def _check_options(o: LowRankOptions, source: DeltaSource | None) -> None:
    if source is None:
        raise OptionsError("give either a DELTA or both --base and --reasoner", fix="Δ comes from a delta file "
                                                                                    "or a base/reasoner pair")
    if (o.rank is None) == (o.energy is None):
        raise OptionsError("give exactly one of --rank and --energy", fix="e.g. --rank 32 or --energy 0.9")
    if o.rank is not None and o.rank <= 0:
        raise OptionsError(f"rank must be a positive integer, got {o.rank}", where="--rank")
    if o.energy is not None and not 0.0 < o.energy <= 1.0:
        raise OptionsError(f"energy must be in (0, 1], got {o.energy}", where="--energy",
                           fix="e.g. 0.9 keeps 90% of ‖Δ‖² per tensor")
    if o.max_rank is not None and (o.max_rank <= 0 or o.rank is not None):
        raise OptionsError(f"--max-rank must be a positive integer used with --energy, got {o.max_rank}",
                           where="--max-rank")
    if o.oversample < 0 or o.niter < 0:
        raise OptionsError("--oversample and --niter must be ≥ 0", where=f"{o.oversample=} {o.niter=}")
    check_regex("--include", o.include)
    check_regex("--exclude", o.exclude)
    if o.peft:
        check_alphas(o.peft_alpha, where="--peft-alpha")
    if o.peft and not o.peft_alpha:
        raise OptionsError("no --peft-alpha given", where="--peft-alpha", fix="pass e.g. --peft-alpha 0.6")
