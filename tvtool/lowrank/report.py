"""What `svd_rank` did to each tensor, and what a LoRA adapter made from it carries.

`TensorReport` rows are kept in the factored delta's metadata (`compact`) so that
`tvtool.lowrank.peft_adapter` can state, without the original Δ, which share of ‖Δ‖² an adapter
carries and which tensors it cannot carry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tvtool.io.atomic import atomic_write
from tvtool.io.layout import is_vocab_tensor


@dataclass(frozen=True)
class TensorReport:
    """One tensor's fate: factored (rank, retained energy, relative error), full or dropped."""

    name: str
    shape: tuple[int, ...]
    kind: Literal["factored", "full", "dropped"]
    norm_sq: float  # ‖Δ‖²_F
    rank: int | None = None
    energy: float | None = None  # ΣS²[:rank] / ‖Δ‖²_F
    rel_error: float | None = None  # ‖Δ − BA‖_F / ‖Δ‖_F, computed directly
    method: str | None = None
    seconds: float | None = None  # SVD and error computation
    reason: str | None = None


# -- reporting ----------------------------------------------------------------------------
def totals(tensors: list[TensorReport], nbytes: int) -> dict:
    total = sum(t.norm_sq for t in tensors) or 1.0
    lost = sum(t.norm_sq * t.rel_error ** 2 for t in tensors if t.kind == "factored")
    lost += sum(t.norm_sq for t in tensors if t.kind == "dropped")
    count = {k: sum(t.kind == k for t in tensors) for k in ("factored", "full", "dropped")}
    return {**count, "norm_sq": total, "energy_kept": 1 - lost / total, "rel_error": math.sqrt(lost / total),
            "bytes": nbytes}


def adapter_shares(tensors: list[TensorReport]) -> dict:
    """What a LoRA adapter carries: share of ‖Δ‖² kept, lost to truncation, and not carried (by tensor)."""
    total = sum(t.norm_sq for t in tensors) or 1.0
    carried = [t for t in tensors if carried_by_adapter(t)]
    kept = sum(t.norm_sq * (1 - t.rel_error ** 2) for t in carried)
    trunc = sum(t.norm_sq * t.rel_error ** 2 for t in carried)
    missing = [t for t in tensors if not carried_by_adapter(t)]
    groups: dict[str, float] = {}
    for t in missing:
        g = ("1-D (norms, biases)" if len(t.shape) == 1 else "embeddings/lm_head" if is_vocab_tensor(t.name)
             else "other 2-D (excluded)")
        groups[g] = groups.get(g, 0.0) + t.norm_sq / total
    return {"kept": kept / total, "truncation": trunc / total, "not_carried": sum(groups.values()),
            "not_carried_by_kind": groups, "not_carried_tensors": [t.name for t in missing]}


def carried_by_adapter(t: TensorReport) -> bool:
    """An adapter carries factorized `X.weight` linear layers; not embeddings/lm_head, 1-D or full tensors."""
    return t.kind == "factored" and t.name.endswith(".weight") and not is_vocab_tensor(t.name)


def plot_spectra(*, spectra: dict[str, torch.Tensor], reports: dict[str, TensorReport], path: Path) -> None:
    """Normalized singular values σ_i/‖Δ‖ per factorized tensor (log scale), one line each, rank marked."""
    import matplotlib  # optional dependency (tvtool[eval]): imported only to plot
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for n, s in spectra.items():
        r = reports[n]
        y = (s.double() / math.sqrt(r.norm_sq or 1.0)).numpy()
        (line,) = ax.semilogy(range(1, len(y) + 1), y, lw=0.8, alpha=0.7)
        if r.rank:
            ax.plot([r.rank], [y[r.rank - 1]], "o", ms=3, color=line.get_color())
    ax.set_xlabel("index i")
    ax.set_ylabel("σ_i / ‖Δ‖_F")
    ax.set_title(f"singular values of Δ ({len(spectra)} tensors; dots: chosen rank)")
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def compact(t: TensorReport) -> dict:
    """The per-tensor summary stored in the factored delta's `tvtool.low_rank` metadata."""
    d = {"kind": t.kind, "shape": list(t.shape), "norm_sq": t.norm_sq}
    if t.kind == "factored":
        d.update(rank=t.rank, energy=round(t.energy, 6), rel_error=round(t.rel_error, 6), method=t.method)
    return d


def reports_from_metadata(low_rank: dict) -> list[TensorReport]:
    """TensorReports back from a factored delta's `tvtool.low_rank` metadata (see `compact`)."""
    return [TensorReport(n, tuple(d["shape"]), d["kind"], d["norm_sq"], rank=d.get("rank"), energy=d.get("energy"),
                         rel_error=d.get("rel_error"), method=d.get("method"))
            for n, d in low_rank.get("report", {}).items()]


