"""Benchmark: per-tensor operators, streaming (tvtool) vs whole-tensor (mergekit's sparsify), time and peak RSS.

One Llama-8B-shaped tensor pair (gate_proj, 14336×4096 bf16, Δ = θ2 − θ1 in float32), each tool in
its own process (peak RSS from /usr/bin/time -v, imports included; the Δ build is the same in both):
  - magnitude trim (TIES's trim, density 0.2): tvtool's two-pass radix select and masked chunks
    vs mergekit's `sparsify.magnitude` (argsort of the whole tensor);
  - DARE (p = 0.9): tvtool's hash mask per chunk vs mergekit's `sparsify.bernoulli`;
  - fused many-α merge of 5 α vs torch's per-α arithmetic (`merge_rows`), same process.
Ratios are within one run. `python bench/bench_operators.py`
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

ROWS, COLS = 14336, 4096
SETUP = f"""
import time, torch, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
g = torch.Generator().manual_seed(0)
base = (torch.randn({ROWS}, {COLS}, generator=g) * 0.02).to(torch.bfloat16)
reasoner = (base.float() + torch.randn({ROWS}, {COLS}, generator=g) * 1e-3).to(torch.bfloat16)
def delta(s, e):  # float32 Δ rows [s, e), as the stream reads them
    return reasoner[s:e].float() - base[s:e].float()
t0 = time.perf_counter()
"""
CASES = {
    "trim density 0.2, tvtool streaming": """
from tvtool.merge.config import MergeConfig
from tvtool.merge.prepare import prepare
from tvtool.merge.registry import Rows, TensorInfo
from tvtool.io.safetensors_io import row_chunks
m = MergeConfig(1.0, method="trim", density=0.2).operator; ranges = row_chunks(({R}, {C}))
rows = lambda s, e: Rows(None, [delta(s, e)], start=s)
prep = prepare([m], tensor=TensorInfo("w", ({R}, {C}), 1), ranges=ranges, read=rows)
kept = sum(int((m.merged(prep.states[m], rows(s, e), prep.tensor) != 0).sum()) for s, e in ranges)
""",
    "trim density 0.2, mergekit magnitude": """
from mergekit.sparsify import magnitude
kept = int((magnitude(delta(0, {R}), density=0.2) != 0).sum())
""",
    "DARE p 0.9, tvtool streaming": """
from tvtool.merge.config import MergeConfig
from tvtool.merge.prepare import prepare
from tvtool.merge.registry import Rows, TensorInfo
from tvtool.io.safetensors_io import row_chunks
m = MergeConfig(1.0, method="dare_linear", p=0.9).operator; ranges = row_chunks(({R}, {C}))
rows = lambda s, e: Rows(None, [delta(s, e)], start=s)
prep = prepare([m], tensor=TensorInfo("w", ({R}, {C}), 1), ranges=ranges, read=rows)
kept = sum(int((m.merged(prep.states[m], rows(s, e), prep.tensor) != 0).sum()) for s, e in ranges)
""",
    "DARE p 0.9, mergekit bernoulli": """
from mergekit.sparsify import bernoulli
kept = int((bernoulli(delta(0, {R}), density=0.1) != 0).sum())
""",
    "5 α, fused kernel": """
from tvtool.merge.kernels import merge_many
from tvtool.io.safetensors_io import row_chunks
for s, e in row_chunks(({R}, {C})):
    outs = merge_many(base=base[s:e], delta=delta(s, e), alphas=[0.2, 0.4, 0.6, 0.8, 1.2], dtype=torch.bfloat16)
kept = 0
""",
    "5 α, torch merge_rows": """
from tvtool.merge.kernels import merge_rows
from tvtool.io.safetensors_io import row_chunks
for s, e in row_chunks(({R}, {C})):
    b32, d = base[s:e].float(), delta(s, e)
    outs = [merge_rows(base[s:e], d, a, torch.bfloat16, base32=b32) for a in [0.2, 0.4, 0.6, 0.8, 1.2]]
kept = 0
""",
}


def run(code: str) -> tuple[float, int, str]:
    script = SETUP + code.format(R=ROWS, C=COLS) + "\nprint('SECONDS', time.perf_counter() - t0, 'KEPT', kept)\n"
    p = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", script], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    secs = float(re.search(r"SECONDS (\S+)", p.stdout).group(1))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) * 1024
    return secs, rss, re.search(r"KEPT (\S+)", p.stdout).group(1)


def main() -> None:
    run(CASES["5 α, fused kernel"])  # compile and cache the numba kernels first
    res = {}
    for label, code in CASES.items():
        res[label] = run(code)
        print(f"{label}: {res[label][0]:.2f} s, peak RSS {res[label][1] / 2**20:.0f} MB, kept {res[label][2]}",
              flush=True)
    print(f"\nTensor {ROWS}×{COLS} (Δ {ROWS * COLS * 4 / 2**20:.0f} MB float32); time excludes imports and the Δ "
          "build, peak RSS includes the bf16 inputs (2×112 MB) and Python.\n")
    print("| operation | tvtool s | other s | other / tvtool time | tvtool RSS | other RSS | RSS ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for op, a, b in (("trim density 0.2 (vs mergekit magnitude)", "trim density 0.2, tvtool streaming",
                      "trim density 0.2, mergekit magnitude"),
                     ("DARE p 0.9 (vs mergekit bernoulli)", "DARE p 0.9, tvtool streaming",
                      "DARE p 0.9, mergekit bernoulli"),
                     ("5 α merge (fused vs torch)", "5 α, fused kernel", "5 α, torch merge_rows")):
        (ta, ra, _), (tb, rb, _) = res[a], res[b]
        print(f"| {op} | {ta:.2f} | {tb:.2f} | {tb / ta:.2f}× | {ra / 2**20:.0f} MB | {rb / 2**20:.0f} MB | "
              f"{rb / ra:.2f}× |")


if __name__ == "__main__":
    t = time.time()
    main()
    print(f"\n(total {time.time() - t:.0f} s)")
