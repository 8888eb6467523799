"""Projection: the QwQ-32B recipe's α sweep on N engines, units per α (× dataset) vs shards of problems.

No engine runs here: `tvtool.evaluation.units.plan_units` plans the recipe (8 α × GSM8K 1319 @ 4192,
MATH-500 500 @ 8192, ASDiv 2000 @ 4192 tokens) as the Ray pool would, and the pool's schedule is
simulated: units in plan order, each to the engine that frees first. A unit's generation time is
proportional to problems × max_tokens × (0.25 + 0.75·α/1.5) (chains grow with α, CoT-Valve Fig. 3;
the scale is `--tokens-per-s` of one engine, TP 2, and `--fill` of max_tokens actually generated); an
engine pays one α swap whenever its next unit has another α than it holds: streaming (each of its 2
workers reads both 65.5 GB checkpoints and merges the whole model) or resident (its shard from memory),
in seconds from bench/bench_resident.py's per-byte costs (`--stream-s`, `--resident-s`).
Writes bench/results/project_ray.md. Run: python bench/project_ray.py [--stream-s S] [--resident-s S]
"""

from __future__ import annotations

import argparse
import heapq
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SETS = [("gsm8k", "gsm8k", 1319, 4192), ("math500", "math500", 500, 8192), ("asdiv", "asdiv", 2000, 4192)]
ALPHAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5)


def runs():
    from tvtool.engine.options import SamplingOptions
    from tvtool.evaluation.data import Problem, ProblemSet
    from tvtool.evaluation.runs import EvalOptions
    from tvtool.evaluation.units import RunSpec
    from tvtool.merge.config import MergeConfig
    from tvtool.vectors.source import DeltaSource

    src = DeltaSource(base="Qwen/Qwen2.5-32B-Instruct", reasoner="Qwen/QwQ-32B-Preview")

    def problems(d, k, n):
        return ProblemSet(name=d, kind=k, source=d, split="test", excluded={}, description="",
                          problems=tuple(Problem(id=str(i), question="", gold="") for i in range(n)))

    return [RunSpec(folder=f"/q/alpha-{a:g}/{d}", source=src, config=MergeConfig(a), options=EvalOptions(),
                    sampling=SamplingOptions(max_tokens=m), problems=problems(d, k, n), model={}, settings={})
            for d, k, n, m in SETS for a in ALPHAS]


def simulate(units, n: int, *, tokens_per_s: float, fill: float, swap_s: float) -> tuple[float, int]:
    """(makespan s, α swaps) of the pool's schedule: units in order, each to the engine that frees first."""
    free = [(0.0, i, None) for i in range(n)]  # (time free, engine, α held)
    heapq.heapify(free)
    swaps = 0
    for u in units:
        t, i, held = heapq.heappop(free)
        gen = u.expected_tokens * fill * (0.25 + 0.75 * u.alpha / 1.5) / tokens_per_s
        cost = 0.0 if held == u.alpha else swap_s
        swaps += held != u.alpha
        heapq.heappush(free, (t + cost + gen, i, u.alpha))
    return max(t for t, _, _ in free), swaps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens-per-s", type=float, default=2000.0, help="one engine's decode throughput (TP 2)")
    ap.add_argument("--fill", type=float, default=0.5, help="share of max_tokens generated on average")
    ap.add_argument("--stream-s", type=float, required=True, help="streaming α swap, QwQ-32B TP 2, seconds")
    ap.add_argument("--resident-s", type=float, required=True, help="resident α swap, QwQ-32B TP 2, seconds")
    ap.add_argument("--out", default=str(HERE / "results" / "project_ray.md"))
    args = ap.parse_args()
    from tvtool.evaluation.units import plan_units

    rs = runs()
    kw = dict(tokens_per_s=args.tokens_per_s, fill=args.fill)
    one, _ = simulate(plan_units(runs=rs, engines=1, complete=lambda r: False).units, 1, swap_s=args.resident_s, **kw)
    lines = ["# Projection: QwQ-32B α sweep on a pool of engines (`bench/project_ray.py`)", "",
             f"8 α × 3 datasets (24 runs); one engine = TP 2 ({args.tokens_per_s:g} tokens/s, {args.fill:g} of "
             f"max_tokens generated); α swap {args.stream_s:.0f} s streaming, {args.resident_s:.2f} s resident. "
             f"One engine, resident: {one / 3600:.1f} h.", "",
             "| engines (GPUs) | units per α (× dataset), streaming | same, resident | shards, resident | "
             "shards, streaming |", "|---|---|---|---|---|"]
    for n in (8, 32, 64):
        old = plan_units(runs=rs, engines=n, per="alpha" if n <= len(ALPHAS) else "run", complete=lambda r: False)
        new = plan_units(runs=rs, engines=n, per="shard", complete=lambda r: False)
        cells = []
        for plan, swap in ((old, args.stream_s), (old, args.resident_s), (new, args.resident_s),
                           (new, args.stream_s)):
            mk, swaps = simulate(plan.units, n, swap_s=swap, **kw)
            cells.append(f"{one / mk:.1f}× ({len(plan.units)} units, {swaps} swaps)")
        lines.append(f"| {n} ({2 * n}) | " + " | ".join(cells) + " |")
    lines += ["", "Speed-up vs one resident engine. Units per α stop scaling at 24 (one per run, the longest "
              "bounding the makespan); shards keep the pool busy, and the resident swap keeps their α switches "
              "cheap (with streaming, every switch re-reads and re-merges the whole model in every worker).", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
