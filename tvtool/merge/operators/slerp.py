"""slerp: per-tensor spherical interpolation between θ1 and θ2 at t = α (mergekit's `slerp`).

For each tensor, with a = θ1 and b = θ2 = θ1 + Δ flattened:

    cos ω = ⟨a/‖a‖, b/‖b‖⟩ (clamped to [−1, 1])    ‖·‖ with tiny norms (≤ 1e-8) taken as 1
    out   = sin((1 − t)·ω)/sin ω · a + sin(t·ω)/sin ω · b      (|cos ω| > 0.9995: (1 − t)·a + t·b)

in float32 and mergekit's operation order (norms as the norm of per-block norms, the dot product of
the normalized blocks summed over blocks; `tvtool.merge.prepare.Blocks`), rounded once to the output
dtype. t is α_eff, so --alpha-rule and --layer-schedule give t per tensor as mergekit's gradients do.
α = 0 gives θ1 and α = 1 gives θ2.

It is the first operator that is not θ1 + α·M: α enters through the coefficients, so it owns `outputs`
(every α of a chunk from one read of θ1 and θ2) and has no α-free M (svd-rank refuses it). Passes: the
norms, then the dot product, then the output (one read for a tensor of one chunk, three otherwise).
One task vector only; no weights (mergekit: a base and one other model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from tvtool.errors import OptionsError
from tvtool.merge.gta import as_delta
from tvtool.merge.prepare import Blocks
from tvtool.merge.registry import Operator, Read, Rows, TensorInfo, register

DOT_THRESHOLD, EPS = 0.9995, 1e-8  # mergekit's: interpolate linearly above this |cos ω|; tiny norms count as 1


def _endpoints(rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """θ1 and θ2 rows in float32 over Δ's rows: θ2 as stored for a pair read with θ1 (same rows), else θ1 + Δ."""
    if rows.end is not None:
        return rows.base.float(), rows.end.float()
    d = as_delta(rows.deltas[0])
    a = rows.base[: d.shape[0]].float()
    return a, a + d


@register
@dataclass(frozen=True)
class Slerp(Operator):
    """Spherical linear interpolation of θ1 and θ2 per tensor, at t = α."""

    name: ClassVar[str] = "slerp"
    summary: ClassVar[str] = "spherical interpolation of θ1 and θ2 per tensor at t = α (one task vector)"
    alpha_free: ClassVar[bool] = False

    def check(self, n_vectors: int) -> None:
        if n_vectors != 1:
            raise OptionsError(f"slerp interpolates θ1 and one θ2, got {n_vectors} task vectors",
                               where="merge.method", fix="give one --reasoner (or --delta) and no --vector")

    def prepare(self, tensor: TensorInfo, cuts, ranges: list[tuple[int, int]], read: Read) -> Any:
        """cos ω of the tensor ([1, 1] float32), as mergekit computes it."""
        if tensor.numel == 0:
            return None
        norms = Blocks(lambda x, y: (torch.linalg.vector_norm(x.view(1, -1), dim=1, keepdim=True),
                                     torch.linalg.vector_norm(y.view(1, -1), dim=1, keepdim=True)))
        for s, e in ranges:
            norms.feed(*_endpoints(read(s, e)))
        na, nb = zip(*norms.close())
        norm_a = torch.linalg.vector_norm(torch.stack(na), dim=0)  # [1, 1]: the norm of the block norms
        norm_b = torch.linalg.vector_norm(torch.stack(nb), dim=0)
        norm_a = torch.where(norm_a > EPS, norm_a, 1)
        norm_b = torch.where(norm_b > EPS, norm_b, 1)
        dots = Blocks(lambda x, y: ((x.view(1, -1) / norm_a) * (y.view(1, -1) / norm_b)).sum(dim=1, keepdim=True))
        for s, e in ranges:
            dots.feed(*_endpoints(read(s, e)))
        return torch.stack(dots.close()).sum(dim=0).clamp(-1, 1)

    def outputs(self, state: Any, rows: Rows, tensor: TensorInfo, alphas: Sequence[float],
                dtype: torch.dtype) -> list[torch.Tensor]:
        a, b = _endpoints(rows)  # [n, ...] fp32, n = Δ's rows (vocab intersect: the rest stay θ1)
        out = []
        for alpha in alphas:
            if state is None:  # an empty tensor
                res = a
            else:
                t = torch.tensor([float(alpha)], dtype=torch.float32).reshape(-1, 1)
                linear = state.abs() > DOT_THRESHOLD
                theta = torch.acos(torch.where(linear, 0, state))
                sin_theta = torch.sin(theta)
                coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
                coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
                res = (coef_a * a.view(1, -1) + coef_b * b.view(1, -1)).view(a.shape)
            if res.shape[0] == rows.base.shape[0]:
                out.append(res.to(dtype))
            else:  # rows past Δ's keep θ1 as stored
                full = rows.base.to(dtype)
                full[: res.shape[0]] = res.to(dtype)
                out.append(full)
        return out
