"""Operators against mergekit run for real (`mergekit-yaml`, dtype float32, bf16 output).

Our side streams every tensor in small row chunks (4096 elements) so that the selection
passes, the tie cut and the per-chunk math are all exercised across chunk boundaries.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_bit_equal, bits
from tiny import state_dict
from tvtool.merge import kernels
from tvtool.merge.config import MergeConfig

from operator_ref import ours


def mergekit(tmp: Path, method: str, base: Path, models: list[tuple[Path, dict]], params: dict) -> dict:
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for m, p in models:
        lines += [f"  - model: {m}", "    parameters:"] + [f"      {k}: {v}" for k, v in p.items()]
    if params:
        lines += ["parameters:"] + [f"  {k}: {v}" for k, v in params.items()]
    lines += ["dtype: float32", "out_dtype: bfloat16"]
    cfg = tmp / f"{method}.yml"
    cfg.write_text("\n".join(lines) + "\n")
    out = tmp / f"mk-{method}"
    exe = Path(sys.executable).with_name("mergekit-yaml")
    p = subprocess.run([str(exe), str(cfg), str(out), "--quiet", "--no-copy-tokenizer"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return state_dict(out)


def test_task_arithmetic_several_vectors_bit_for_bit(trio, tmp_path):
    base, r1, r2 = trio
    (got,), _ = ours(base, [r1, r2], [MergeConfig(0.9, method="task_arithmetic", weights=(0.7, -0.35))])
    ref = mergekit(tmp_path, "task_arithmetic", base, [(r1, {"weight": 0.7}), (r2, {"weight": -0.35})],
                   {"lambda": 0.9})
    assert set(got) == set(ref)
    assert_bit_equal(got, ref)


def _tied_differences(got: dict, ref: dict, preps, deltas: dict[str, list[torch.Tensor]], c: MergeConfig
                      ) -> tuple[int, int]:
    """(#elements that differ, #elements at some vector's magnitude cut); asserts every difference is tied."""
    n_diff = n_tied = 0
    for name in ref:
        diff = bits(got[name]) != bits(ref[name])
        tied = torch.zeros_like(diff)
        for v, d in enumerate(deltas[name]):
            cut = preps[name].states[c.operator][v][0]
            tied |= (d.abs().view(torch.int32) & 0x7FFFFFFF) == cut.key
        assert not (diff & ~tied).any(), f"{name}: {(diff & ~tied).sum()} untied elements differ"
        n_diff += int(diff.sum())
        n_tied += int(tied.sum())
    return n_diff, n_tied


@pytest.mark.parametrize("n_vectors", [1, 2])
def test_ties_bit_for_bit_except_tied_magnitudes(trio, tmp_path, n_vectors):
    """Equal except where |Δ_i| equals vector i's cut value: mergekit's non-stable argsort keeps an
    arbitrary k of those ties, we keep them in index order. Both keep exactly k per tensor."""
    base, *rs = trio
    rs = rs[:n_vectors]
    weights, density = (0.8, 0.5)[:n_vectors], (0.25, 0.6)[:n_vectors]
    m = MergeConfig(0.55, method="ties", weights=weights, density=density)
    (got,), preps = ours(base, rs, [m])
    ref = mergekit(tmp_path, "ties", base, [(r, {"weight": w, "density": d}) for r, w, d in zip(rs, weights, density)],
                   {"lambda": 0.55})
    b = state_dict(base)
    deltas = {n: [state_dict(r)[n].float() - b[n].float() for r in rs] for n in ref}
    n_diff, n_tied = _tied_differences(got, ref, preps, deltas, m)
    total = sum(t.numel() for t in ref.values())
    print(f"ties n={n_vectors}: {n_diff} of {total} elements differ, all among {n_tied} tied at a cut")
    assert n_diff <= n_tied  # (differences themselves were asserted tied above)


def test_dare_kept_fraction_rescale_and_mask_stability(trio, tmp_path):
    """No shared RNG with mergekit: the kept set follows our hash; mergekit's kept fraction is checked alike."""
    base, r1, r2 = trio
    p = 0.6
    m = MergeConfig(1.0, method="dare_linear", p=p, seed=3, weights=(1.0, 1.0))
    (got,), _ = ours(base, [r1], [MergeConfig(1.0, method="dare_linear", p=p, seed=3)])
    b, r = state_dict(base), state_dict(r1)
    kept = total = 0
    for name, t in got.items():
        d = r[name].float() - b[name].float()
        keep = kernels.dare_keep(seed=3, name=name, p=p, flat_start=0, shape=d.shape)
        ref = (b[name].float() + (d.double() * keep / (1 - p)).float()).to(torch.bfloat16)
        assert torch.equal(bits(t), bits(ref)), name
        kept, total = kept + int(keep.sum()), total + keep.numel()
    assert abs(kept / total - (1 - p)) < 4.5 * (p * (1 - p) / total) ** 0.5
    # mergekit's dare_linear (its own RNG, rescale off): kept elements there are θ1 + Δ exactly
    mk = mergekit(tmp_path, "dare_linear", base, [(r1, {"weight": 1.0, "density": 1 - p})], {"rescale": "false"})
    mk_kept = sum(int(((mk[n].float() != b[n].float()) & (r[n].float() != b[n].float())).sum()) for n in mk)
    changed = sum(int((r[n].float() != b[n].float()).sum()) for n in mk)
    assert abs(mk_kept / changed - (1 - p)) < 0.02
    # the same seed gives the same output in one chunk per tensor; another seed another mask
    (two,), _ = ours(base, [r1, r2], [m])
    kernels_whole = {n: kernels.dare_keep(seed=3, name=n, p=p, flat_start=0, shape=t.shape) for n, t in two.items()}
    other = {n: kernels.dare_keep(seed=4, name=n, p=p, flat_start=0, shape=t.shape) for n, t in two.items()}
    assert sum(int((kernels_whole[n] != other[n]).sum()) for n in two) > 0.3 * total
