"""Tables and plots across runs (α sweeps): markdown, JSON and a PNG in the style of CoT-Valve Fig. 3.

Rows are the per-run summaries (`tvtool.evaluation.evaluate.table_row`): label, α, the merge operator and its
settings (`method`, `params`: rows of a sweep over several operators, set by `tvtool.sweep.run`), the token budget asked
for in the prompt (prompt-control rows, Table 12), accuracy (%), mean #tokens (= Table 12's
"#Token Generated"), ACU (paper units), #truncated, #samples, and the answer statistics of
`tvtool.evaluation.answers` (no-box share, hit-max share, accuracy on boxed responses, reflections per response);
for thinking models the mean thinking/answer tokens and the unfinished share (`tvtool.evaluation.thinking`);
with n > 1 samples per problem ± SE, maj@n and pass@n (`tvtool.evaluation.sampled`).
Columns that no row fills are left out. Rows that carry a difficulty level get the per-level tables and
plot of `level_tables`/`plot_levels` (`tvtool.evaluation.difficulty`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tvtool.engine.options import SamplingOptions, resolve_protocol
from tvtool.evaluation.difficulty import relative_lengths
from tvtool.io.atomic import atomic_write, write_text
from tvtool.evaluation.results import ACU_FORMULA, STAT_KEYS
from tvtool.evaluation.sampled import SAMPLED_KEYS

COLUMNS = (("label", "run"), ("method", "method"), ("params", "params"), ("alpha", "α"),
           ("prompt_budget", "tokens in prompt"), ("accuracy", "accuracy %"), ("accuracy_se", "± SE"),
           ("maj_accuracy", "maj@n %"), ("pass_at_n", "pass@n %"), ("mean_tokens", "mean #tokens"),
           ("thinking_tokens_mean", "thinking #tokens"), ("answer_tokens_mean", "answer #tokens"),
           ("acu", "ACU"), ("truncated", "#truncated"), ("n_samples", "#samples"),
           ("no_box_share", "no box %"), ("length_share", "hit max %"), ("unfinished_share", "unfinished %"),
           ("boxed_accuracy", "acc. boxed %"), ("reflections_mean", "reflections/resp."))
_OPTIONAL = {"method", "params", "prompt_budget", "no_box_share", "length_share", "boxed_accuracy", "reflections_mean",
             "accuracy_se", "maj_accuracy", "pass_at_n", "thinking_tokens_mean", "answer_tokens_mean",
             "unfinished_share", "reflective_share"}
_ONE_DECIMAL = {"accuracy", "mean_tokens", "no_box_share", "length_share", "boxed_accuracy", "accuracy_se",
                "maj_accuracy", "pass_at_n", "thinking_tokens_mean", "answer_tokens_mean", "unfinished_share",
                "reflective_share"}


def _cell(key: str, v) -> str:
    if v is None:
        return "–"
    if key == "alpha":
        return f"{v:g}"
    if key in _ONE_DECIMAL:
        return f"{v:.1f}"
    if key in ("reflections_mean", "relative"):
        return f"{v:.2f}"
    if key == "acu":
        return f"{v:.2f}" if abs(v) < 1000 else f"{v:.3g}"  # tiny models give huge ACU
    return str(v)


def markdown_table(*, rows: Sequence[dict], columns: Sequence[tuple[str, str]] = COLUMNS) -> str:
    """One line per run; ACU = accuracy[%] / (params[B] × mean #tokens) × 10²."""
    cols = [(k, t) for k, t in columns if k not in _OPTIONAL or any(r.get(k) is not None for r in rows)]
    head = "| " + " | ".join(t for _, t in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(_cell(k, r.get(k)) for k, _ in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_table(*, rows: Sequence[dict], folder: str | os.PathLike, name: str = "summary") -> dict[str, Path]:
    """`<name>.md`, `<name>.json` and `<name>.png` in `folder` (each written atomically); their paths by kind."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    md, js, png = out / f"{name}.md", out / f"{name}.json", out / f"{name}.png"
    levels = level_tables(rows=rows)
    write_text(md, markdown_table(rows=rows) + f"\n\n{ACU_FORMULA}\n" + (f"\n{levels}\n" if levels else ""))
    write_text(js, json.dumps({"rows": list(rows), "acu_formula": ACU_FORMULA}, indent=2) + "\n")
    plot(rows=rows, path=png)
    paths = {"markdown": md, "json": js, "png": png}
    if plot_levels(rows=rows, path=out / f"{name}-levels.png") is not None:
        paths["levels_png"] = out / f"{name}-levels.png"
    return paths


def plot(*, rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Left: mean #tokens vs α (runs with an α). Right: accuracy vs mean #tokens, labelled by run (PNG, atomic).

    Rows of several merge operators (a `method` column) give one series per operator setting
    (method + params) in both panels, each point of the right panel labelled by its α."""
    import matplotlib  # optional dependency (tvtool[eval]): imported only to plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = series(rows=rows)
    many = len(groups) > 1
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5) if many else (10, 4))
    for name, part in groups.items():
        ar = sorted((r for r in part if r.get("alpha") is not None and r.get("mean_tokens") is not None),
                    key=lambda r: r["alpha"])
        ax1.plot([r["alpha"] for r in ar], [r["mean_tokens"] for r in ar], "o-", label=name)
    if many:
        ax1.legend(fontsize=7)
    ax1.set_xlabel("α")
    ax1.set_ylabel("#Token")
    ax1.set_title("#tokens vs α")
    scored = lambda r: r.get("accuracy") is not None and r.get("mean_tokens") is not None  # noqa: E731
    budgets = [r for r in rows if r.get("prompt_budget") is not None]
    pts, labels = [], []
    for name, part, budget in [*((n, p, False) for n, p in groups.items()), ("prompt budget", budgets, True)]:
        part = sorted(filter(scored, part), key=lambda r: r["mean_tokens"])
        if part:
            ax2.plot([r["mean_tokens"] for r in part], [r["accuracy"] for r in part], "s--" if budget else "o-",
                     label=name)
        for r in part:
            pts.append((r["mean_tokens"], r["accuracy"]))
            labels.append(f"{r['prompt_budget']} tok" if budget else
                          f"α={r['alpha']:g}" if r.get("alpha") is not None else r["label"])
    if any(map(scored, budgets)) or many:
        ax2.legend(fontsize=7)
    ax2.set_xlabel("#Token")
    ax2.set_ylabel("Accuracy")
    ax2.set_title("accuracy vs #tokens")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    place_labels(ax2, pts=pts, labels=labels)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)


def series(*, rows: Sequence[dict]) -> dict[str, list[dict]]:
    """The plot's series of the non-budget rows, in row order: one per operator setting, named
    "method params" (e.g. "ties density=0.2"), or a single "α (task vector)" without operators."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("prompt_budget") is not None:
            continue
        m = r.get("method")
        name = " ".join(x for x in (m.replace("_", " "), r.get("params")) if x) if m else "α (task vector)"
        out.setdefault(name, []).append(r)
    return out


RULES = {"paper": "last complete \\boxed{}, else the last number in the response (CoT-Valve A.1)",
         "boxed-only": "last complete \\boxed{}, else no answer",
         "strict-match": "lm-eval-harness GSM8K strict-match, `#### N` (A.1, LLaMA-3.1-8B)",
         "flexible-extract": "lm-eval-harness GSM8K flexible-extract, the last number (A.1, LLaMA-3.2-1B)"}


# Label positions around a point (offset in points, alignment), tried nearest first, then farther out.
_SPOTS = [((5, 4), "left", "bottom"), ((5, -4), "left", "top"), ((-5, 4), "right", "bottom"),
          ((-5, -4), "right", "top"), ((0, 7), "center", "bottom"), ((0, -7), "center", "top")]


def place_labels(ax, *, pts: Sequence[tuple[float, float]], labels: Sequence[str]) -> list:
    """Annotate each point so that no label overlaps another label, a data point or the axes edge
    when that can be helped: greedy, each label takes the free spot (of 6 directions × 4 distances)
    with the least overlap; a label moved away from its point gets a thin leader line."""
    fig = ax.figure
    fig.canvas.draw()
    rend = fig.canvas.get_renderer()
    frame = ax.get_window_extent(rend)
    px = ax.transData.transform(pts) if len(pts) else []
    legend = ax.get_legend()
    placed, texts = ([legend.get_window_extent(rend)] if legend else []), []

    def overlap(a, b) -> float:
        w = min(a.x1, b.x1) - max(a.x0, b.x0)
        h = min(a.y1, b.y1) - max(a.y0, b.y0)
        return w * h if w > 0 and h > 0 else 0.0

    for i, ((x, y), lab) in enumerate(zip(pts, labels)):
        best = None
        for ring, scale in enumerate((1, 2.5, 4.5, 7)):
            for (dx, dy), ha, va in _SPOTS:
                t = ax.annotate(lab, (x, y), xytext=(dx * scale, dy * scale), textcoords="offset points",
                                ha=ha, va=va, fontsize=8)
                bb = t.get_window_extent(rend)
                cost = 10 * sum(overlap(bb, o) for o in placed) + 4 * ring
                cost += sum(400 for j, (u, v) in enumerate(px) if bb.x0 - 3 <= u <= bb.x1 + 3 and bb.y0 - 3 <= v <= bb.y1 + 3)
                cost += 1000 * (bb.x0 < frame.x0 or bb.x1 > frame.x1 or bb.y0 < frame.y0 or bb.y1 > frame.y1)
                if best is None or cost < best[0]:
                    if best is not None:
                        best[1].remove()
                    best = (cost, t, bb, ring)
                else:
                    t.remove()
        _, t, bb, ring = best
        if ring:
            t.arrow_patch = None
            t.remove()
            t = ax.annotate(lab, (x, y), xytext=t.xyann, textcoords="offset points", ha=t.get_ha(), va=t.get_va(),
                            fontsize=8, arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5"})
        placed.append(bb)
        texts.append(t)
    return texts


def answer_rule_line(rule: str, *, budgets=(), template: str = "qwq", alpha: float = 1.0) -> str:
    """One REPORT.md line: how answers were read, and the prompt-budget rows if any."""
    line = f"Answer rule: **{rule}**, {RULES[rule]}. \"no box %\": responses without a complete box; " \
           "\"hit max %\": responses that reached max_tokens; \"acc. boxed %\": accuracy on the boxed ones; " \
           "\"reflections/resp.\": reflection phrases per response (tvtool.evaluation.reflection)."
    if budgets:
        line += (f" Rows `budget-N`: prompt control at α = {alpha:g}, the paper's {template} template asking for "
                 "fewer than N tokens (appendix B, Table 12: tokens in prompt vs mean #tokens generated).")
    return line



@dataclass(frozen=True)
class RunResult:
    label: str
    alpha: float | None
    folder: Path
    summary: dict
    budget: int | None = None  # the token budget in the prompt (Table 12 baseline), None for plain runs



@dataclass
class EvalResult:
    runs: list[RunResult] = field(default_factory=list)
    table: dict[str, Path] = field(default_factory=dict)  # md/json/png of a multi-run evaluation
    engine_starts: int = 0  # vLLM engines started (0 when every run was already complete)
    answer_rule: str | None = None  # how answers were read (None: not scored)

    def summary(self) -> str:
        rows = [table_row(r) for r in self.runs]
        lines = [markdown_table(rows=rows), "", ACU_FORMULA]
        lines += [answer_rule_line(self.answer_rule)] if self.answer_rule else []
        lines += reading_notes(rows=rows)
        levels = level_tables(rows=rows)
        lines += ["", levels] if levels else []
        lines += [f"{k}: {v}" for k, v in self.table.items()]
        return "\n".join(lines)


def table_row(run: RunResult) -> dict:
    """A run's row: its summary's table figures (`COLUMNS`), pass@n, and its per-level rows if any."""
    s = run.summary
    row = {"label": run.label, "alpha": run.alpha, "accuracy": s["accuracy"], "mean_tokens": s["mean_tokens"],
           "acu": s["acu"], "truncated": s["truncated"], "n_samples": s["n_samples"],
           "prompt_budget": run.budget, **{k: s.get(k) for k in STAT_KEYS if k not in SAMPLED_KEYS or k in s}}
    if s.get("pass_at_k"):
        row["pass_at_n"] = s["pass_at_k"][str(s["n_per_problem"])]
    if s.get("think_end") is not None:
        row["think_end"] = s["think_end"]
    if s.get("by_level"):
        row.update(difficulty_field=s["difficulty_field"], by_level=s["by_level"])
    return row


# --- how answers were read, and the decoding (REPORT.md header lines) ------------------------------


def decoding_line(sampling: SamplingOptions) -> str:
    """The decoding of a sweep's runs: "greedy=True, max_tokens=200", or the protocol and its settings."""
    s = resolve_protocol(sampling)
    line = f"greedy={s.temperature == 0}" if s.protocol is None else \
        f"protocol **{s.protocol}** (temperature {s.temperature:g}, top-p {s.top_p:g})"
    return line + f", max_tokens={s.max_tokens}" + (f", n={s.n} samples per problem" if s.n > 1 else "")


def reading_notes(*, rows: Sequence[dict]) -> list[str]:
    """REPORT.md lines on the thinking split and the n > 1 columns, only where some row has them."""
    out = []
    tags = sorted({r["think_end"] for r in rows if r.get("think_end")})
    if tags:
        out.append(f"Thinking: the answer rule read the text after the last {' / '.join(f'`{t}`' for t in tags)} "
                   "(tvtool.evaluation.thinking); \"thinking/answer #tokens\": mean tokens up to and after it, "
                   "from the engine's token ids; \"unfinished %\": responses whose thinking never closed, scored "
                   "on their whole text (CoT-Valve A.1).")
    if any(r.get("maj_accuracy") is not None for r in rows):
        out.append("Several samples per problem: \"accuracy %\" is the mean over samples (pass@1 averaged), "
                   "\"± SE\" its standard error across problems; \"maj@n %\": majority vote of the extracted "
                   "answers (ties: first occurrence); \"pass@n %\": the unbiased pass@k estimator at k = n "
                   "(smaller k in summary.json) (tvtool.evaluation.sampled).")
    return [x for line in out for x in ("", line)]


# --- per difficulty level (tvtool.evaluation.difficulty) ------------------------------------------

LEVEL_COLUMNS = (("label", "run"), ("alpha", "α"), ("level", "level"), ("n_problems", "#problems"),
                 ("accuracy", "accuracy %"), ("mean_tokens", "mean #tokens"),
                 ("thinking_tokens_mean", "thinking #tokens"), ("answer_tokens_mean", "answer #tokens"),
                 ("reflections_mean", "reflections/resp."), ("reflective_share", "reflective %"),
                 ("unfinished_share", "unfinished %"))


def _levels(rows: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(lev for r in rows for lev in r["by_level"]))


def _pivot(rows: Sequence[dict], levels: Sequence[str], value, key: str) -> str:
    """Runs × levels."""
    head = "| run | α | " + " | ".join(levels) + " |"
    body = [f"| {r['label']} | {_cell('alpha', r.get('alpha'))} | "
            + " | ".join(_cell(key, value(r, lev)) for lev in levels) + " |" for r in rows]
    return "\n".join([head, "|" + "|".join("---" for _ in range(len(levels) + 2)) + "|", *body])


def level_tables(*, rows: Sequence[dict]) -> str:
    """Markdown per difficulty level ("" when no row has levels): with several α, mean #tokens and the
    length relative to α = 1 (per operator series) as runs × levels; then every run × level row."""
    rows = [r for r in rows if r.get("by_level")]
    if not rows:
        return ""
    field, levels = rows[0]["difficulty_field"], _levels(rows)
    parts = [f"By difficulty (`{field}`):"]
    curve = [r for r in rows if r.get("alpha") is not None and r.get("prompt_budget") is None]
    if len(curve) > 1:
        parts += ["Mean #tokens per level:", _pivot(curve, levels, lambda r, lev: r["by_level"].get(lev, {}).get(
            "mean_tokens"), "mean_tokens")]
        groups = series(rows=curve)
        for name, part in groups.items():
            ref, rel = relative_lengths(part)
            if ref is not None and len(part) > 1:
                what = f" ({name})" if len(groups) > 1 else ""
                parts += [f"Length relative to {ref['label']}{what}: mean #tokens per level ÷ {ref['label']}'s "
                          "(below 1: compressed):", _pivot(part, levels, lambda r, lev: rel[r["label"]].get(lev),
                                                          "relative")]
    flat = [{"label": r["label"], "alpha": r.get("alpha"), "level": lev, **s} for r in rows
            for lev, s in r["by_level"].items()]
    parts.append(markdown_table(rows=flat, columns=LEVEL_COLUMNS))
    return "\n\n".join(parts)


def plot_levels(*, rows: Sequence[dict], path: str | os.PathLike) -> Path | None:
    """Mean #tokens vs α, one line per difficulty level (per operator series); None (nothing written)
    when fewer than two runs with an α carry levels."""
    curve = [r for r in rows if r.get("by_level") and r.get("alpha") is not None and r.get("prompt_budget") is None]
    if len(curve) < 2:
        return None
    import matplotlib  # optional dependency (tvtool[eval]): imported only to plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, levels = series(rows=curve), _levels(curve)
    colors = plt.get_cmap("viridis")([i / max(1, len(levels) - 1) for i in range(len(levels))])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, part), style in zip(groups.items(), ("o-", "s--", "^-.", "d:", "v-", "x--") * 8):
        part = sorted(part, key=lambda r: r["alpha"])
        for lev, color in zip(levels, colors):
            pts = [(r["alpha"], r["by_level"][lev]["mean_tokens"]) for r in part if lev in r["by_level"]]
            ax.plot(*zip(*pts), style, color=color,
                    label=f"{curve[0]['difficulty_field']} {lev}" + (f" ({name})" if len(groups) > 1 else ""))
    ax.set_xlabel("α")
    ax.set_ylabel("#Token")
    ax.set_title("#tokens vs α per difficulty level")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)


def level_section(*, name: str, rows: Sequence[dict], folder: str | os.PathLike) -> tuple[list[str], Path | None]:
    """A sweep report's per-level part for one dataset: (REPORT.md lines, the plot `plot-<name>-levels.png`);
    ([], None) when its rows carry no levels."""
    tables = level_tables(rows=rows)
    if not tables:
        return [], None
    png = plot_levels(rows=rows, path=Path(folder) / f"plot-{name}-levels.png")
    return [f"### {name} by difficulty", "", tables, "", *([f"![{name} by level]({png.name})", ""] if png else [])], png
