"""Measure the toy bar on the shipped bf16 checkpoints (transformers, greedy, float32).

For α = 0, 0.1, ..., 1.0 the merged weights are bf16(f32(θ1) + α·(f32(θ2) − f32(θ1)));
prints α, accuracy and mean generated tokens on test.jsonl, then whether the bar holds:
lengths non-decreasing, ≥4× from α=0 to 1, ≥4 α values strictly inside the endpoints
with a 10% margin, accuracy ≥85% everywhere. Exit code 1 if the bar fails.

    /work/venv/bin/python scripts/check_toy.py [--dir tvtool/assets/toy] [--limit N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads crawl on a shared box

import torch  # noqa: E402

from tvtool import toy  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=toy.ASSET_DIR)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N test problems")
    ap.add_argument("--alphas", type=str, default=",".join(f"{i / 10:.1f}" for i in range(11)))
    args = ap.parse_args()
    torch.set_num_threads(2)
    alphas = [float(a) for a in args.alphas.split(",")]
    t0 = time.time()
    table = toy.greedy_lengths(alphas=alphas, base_dir=args.dir / "base", reasoner_dir=args.dir / "reasoner",
                               test_path=args.dir / "test.jsonl", limit=args.limit)
    print(f"{'alpha':>5}  {'accuracy':>8}  {'mean_tokens':>11}   (n={table[0]['n']}, {time.time() - t0:.0f}s)")
    for r in table:
        print(f"{r['alpha']:5.2f}  {r['accuracy']:8.3f}  {r['mean_tokens']:11.1f}")
    if len(alphas) != 11:
        return 0
    fails = toy.check_bar(table=table)
    print("bar: PASS" if not fails else "bar: FAIL\n  " + "\n  ".join(fails))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
