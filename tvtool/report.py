"""Tables and plots across runs (α sweeps): markdown, JSON and a PNG in the style of CoT-Valve Fig. 3.

Rows are the per-run summaries (`tvtool.evaluate.table_row`): label, α, accuracy (%),
mean #tokens, ACU (paper units), #truncated, #samples.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from .atomic import atomic_write, write_text
from .results import ACU_FORMULA

COLUMNS = (("label", "run"), ("alpha", "α"), ("accuracy", "accuracy %"), ("mean_tokens", "mean #tokens"),
           ("acu", "ACU"), ("truncated", "#truncated"), ("n_samples", "#samples"))


def _cell(key: str, v) -> str:
    if v is None:
        return "–"
    if key == "alpha":
        return f"{v:g}"
    if key in ("accuracy", "mean_tokens"):
        return f"{v:.1f}"
    if key == "acu":
        return f"{v:.2f}" if abs(v) < 1000 else f"{v:.3g}"  # tiny models give huge ACU
    return str(v)


def markdown_table(*, rows: Sequence[dict]) -> str:
    """One line per run; ACU = accuracy[%] / (params[B] × mean #tokens) × 10²."""
    head = "| " + " | ".join(t for _, t in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(k, r.get(k)) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_table(*, rows: Sequence[dict], folder: str | os.PathLike, name: str = "summary") -> dict[str, Path]:
    """`<name>.md`, `<name>.json` and `<name>.png` in `folder` (each written atomically); their paths by kind."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    md, js, png = out / f"{name}.md", out / f"{name}.json", out / f"{name}.png"
    write_text(md, markdown_table(rows=rows) + f"\n\n{ACU_FORMULA}\n")
    write_text(js, json.dumps({"rows": list(rows), "acu_formula": ACU_FORMULA}, indent=2) + "\n")
    plot(rows=rows, path=png)
    return {"markdown": md, "json": js, "png": png}


def plot(*, rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Left: mean #tokens vs α (runs with an α). Right: accuracy vs mean #tokens, labelled by run (PNG, atomic)."""
    import matplotlib  # optional dependency (tvtool[eval]): imported only to plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ar = sorted((r for r in rows if r.get("alpha") is not None and r.get("mean_tokens") is not None),
                key=lambda r: r["alpha"])
    ax1.plot([r["alpha"] for r in ar], [r["mean_tokens"] for r in ar], "o-")
    ax1.set_xlabel("α")
    ax1.set_ylabel("#Token")
    ax1.set_title("#tokens vs α")
    sr = [r for r in rows if r.get("accuracy") is not None and r.get("mean_tokens") is not None]
    sr = sorted(sr, key=lambda r: r["mean_tokens"])
    ax2.plot([r["mean_tokens"] for r in sr], [r["accuracy"] for r in sr], "o-")
    for r in sr:
        lab = f"α={r['alpha']:g}" if r.get("alpha") is not None else r["label"]
        ax2.annotate(lab, (r["mean_tokens"], r["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax2.set_xlabel("#Token")
    ax2.set_ylabel("Accuracy")
    ax2.set_title("accuracy vs #tokens")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)
