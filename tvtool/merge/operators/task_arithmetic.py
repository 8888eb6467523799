"""task_arithmetic: M = Σ_i w_i·Δ_i (optionally over Σ_i w_i): CoT-Valve's θ1 + α·Δ for one task vector."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from tvtool.merge.gta import GTA, as_delta
from tvtool.merge.registry import Rows, TensorInfo, register


@register
@dataclass(frozen=True)
class TaskArithmetic(GTA):
    """Task arithmetic (mergekit `task_arithmetic`), no sparsification."""

    name: ClassVar[str] = "task_arithmetic"
    summary: ClassVar[str] = "θ1 + α·Σ w_i·Δ_i (one task vector: θ1 + α·Δ)"

    def is_identity(self, n_vectors: int) -> bool:
        return n_vectors == 1 and self.weights in ((), (1.0,)) and not self.normalized

    def fused(self, state, tensor: TensorInfo, n: int) -> dict:
        return {}

    def merged(self, state, rows: Rows, tensor: TensorInfo) -> torch.Tensor:
        if len(rows.deltas) == 1 and self.per("weights", 1)[0] == 1.0 and not self.normalized:
            return as_delta(rows.deltas[0])  # θ1 + α·Δ exactly as the plain path
        return super().merged(state, rows, tensor)
