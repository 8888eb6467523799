"""On a GPU: the resident swap's arithmetic gives the CPU merge's bytes, bit for bit. Torch only (the GPU
machine has no vLLM, maybe not tvtool's other dependencies). NOT RUN YET: no GPU was available.

`gpu()` below is `tvtool.engine.resident.finish_torch` and `cpu()` is `tvtool.merge.kernels.merge_rows`
(the streaming merge's reference; its numba kernels equal it bit for bit), copied verbatim;
tests/engine/test_resident.py checks the copies still match the code. For bf16, fp16 and fp32 outputs,
plain M and pair (θ2) inputs, random tensors with edge values (±0, subnormals of both dtypes, values near
the dtype's largest finite, round-half-even ties) and α including 1, −1, tiny, huge-but-finite, 1/3: every
output of `gpu` on CUDA equals `cpu` on the CPU, and a fused multiply-add (torch.addcmul) differs
somewhere (the check can fail). Exit 1 on any difference.

    python scripts/check_gpu_alpha.py [--n 4000000] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys

import torch


def gpu(theta1: torch.Tensor, x: torch.Tensor, pair: bool, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    b32 = theta1.float()
    delta = x.to(torch.float32, copy=True).sub_(b32) if pair else x.float()
    step = torch.mul(delta, alpha)
    return step.add_(b32).to(dtype)


def cpu(base: torch.Tensor, delta: torch.Tensor | None, alpha: float, dtype: torch.dtype, *,
        base32: torch.Tensor | None = None) -> torch.Tensor:
    if delta is None or alpha == 0.0 or not base.dtype.is_floating_point:
        return base.to(dtype)
    b32 = base.float() if base32 is None else base32
    step = torch.mul(delta, alpha)  # [n, ...] fp32
    n = delta.shape[0] if delta.dim() else None
    if n is None or n == b32.shape[0]:
        return step.add_(b32).to(dtype)
    out = b32.clone()
    out[:n] += step
    return out.to(dtype)


def edge_values(dtype: torch.dtype, n: int, g: torch.Generator) -> torch.Tensor:
    """Random values of `dtype` with edge cases mixed in: ±0, subnormals, near-largest, ties."""
    fi = torch.finfo(dtype)
    x = (torch.randn(n, generator=g) * 0.05).to(dtype)
    k = n // 16
    specials = torch.tensor([0.0, -0.0, fi.tiny, -fi.tiny, fi.tiny / 4, -fi.tiny / 8, fi.smallest_normal,
                             fi.max / 4, -fi.max / 4, 1.0, -1.0, 0.5, 3.0], dtype=torch.float32).to(dtype)
    idx = torch.randint(0, n, (k,), generator=g)
    x[idx] = specials[torch.randint(0, len(specials), (k,), generator=g)]
    return x


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4_000_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing checked")
        return 1
    g = torch.Generator().manual_seed(args.seed)
    alphas = [0.5, 1.0, -1.0, 1e-30, 1 / 3, 0.7, 2.5, -0.25, 1e30]
    bad = 0
    fma_differs = False
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for pair in (False, True):
            theta1 = edge_values(dtype, args.n, g)
            x = edge_values(dtype, args.n, g) if pair else edge_values(torch.float32, args.n, g)
            delta = x.float() - theta1.float() if pair else x
            for a in alphas:
                want = cpu(theta1, delta, a, dtype)
                with torch.no_grad():
                    got = gpu(theta1.cuda(), x.cuda(), pair, a, dtype).cpu()
                    fma = torch.addcmul(theta1.cuda().float(), delta.cuda(), torch.tensor(a, device="cuda")).to(dtype)
                finite = torch.isfinite(want.float())  # an overflowing α is an error on both paths, not compared
                w, o = want[finite], got[finite]
                ints = {2: torch.int16, 4: torch.int32}[w.element_size()]
                diff = int((w.view(ints) != o.view(ints)).sum())
                fma_differs |= bool((fma.cpu()[finite].float() != w.float()).any())
                print(f"{str(dtype):15} pair={pair!s:5} α={a:<10g} differing: {diff}")
                bad += diff
    print(f"fused multiply-add differs somewhere: {fma_differs} (it should: otherwise the check proves little)")
    print("OK: bit for bit" if bad == 0 else f"FAIL: {bad} elements differ")
    return 0 if bad == 0 and fma_differs else 1


if __name__ == "__main__":
    sys.exit(main())
