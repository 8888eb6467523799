"""Non-finite values (NaN, ±Inf) are errors unless allowed: in inputs, in Δ, in rounded outputs, in α.

A NaN in a checkpoint would be copied into Δ and every merge; an α so large that
θ1 + α·Δ overflows the output dtype would write an all-Inf model. Both pass silently
through plain arithmetic, so every chunk that streams through delta/materialize/svd-rank
goes through `check_finite`: it counts the non-finite elements per tensor and, unless
they are allowed, raises naming the tensor and the first bad index.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import warnings
from typing import Iterable

import numpy as np
import torch

from tvtool.errors import CheckpointError, OptionsError

_FUSED = os.environ.get("TVTOOL_FUSED", "1") != "0"  # 0: torch only (benchmark comparison; tvtool.merge.kernels)
_EXP = {torch.float32: (torch.int32, np.uint32, 0x7F800000), torch.bfloat16: (torch.int16, np.uint16, 0x7F80),
        torch.float16: (torch.int16, np.uint16, 0x7C00)}


@functools.cache
def _nk():
    """The compiled kernels (`tvtool.merge._numba_kernels`), imported on first use: a vLLM CPU worker
    with llvmlite loaded when it starts fails (the measured reason, in `tvtool.merge.kernels._nk`)."""
    return importlib.import_module("tvtool.merge._numba_kernels")


def count_nonfinite(x: torch.Tensor) -> int | None:
    """#NaN/±Inf elements of a float32/bf16/fp16 tensor by one pass over its bits, no temporaries
    (None for other dtypes). Measured reason: torch's `~isfinite(x)` + `sum` makes two full-size
    temporaries and three passes; on the 2.5 GB pair, TIES at 5 α spent 62 s of 217 s there."""
    if not _FUSED or x.dtype not in _EXP or not x.is_contiguous():
        return None
    it, nt, mask = _EXP[x.dtype]
    return int(_nk()._count_exp_all_ones(x.reshape(-1).view(it).numpy().view(nt), nt(mask)))


ALLOW_FIX = "fix or re-download the checkpoint, or pass --allow-nonfinite to keep them (with a warning)"


def check_finite(name: str, chunk: torch.Tensor, offset: int = 0, *, counts: dict[str, int] | None = None,
                 allow: bool = False, what: str = "Δ", where: str | None = None,
                 overflow: str | None = None, overflow_fix: str = "use --dtype float32") -> int:
    """Count the non-finite elements of `chunk` (rows `offset…` of tensor `name`); raise unless allowed.

    `counts` accumulates the per-tensor total. `overflow` (e.g. "θ1 + α·Δ in bfloat16 at α=1e+300") says
    the chunk is a rounded output of finite inputs: then any non-finite value is an overflow error.
    """
    if not chunk.dtype.is_floating_point or chunk.numel() == 0 or count_nonfinite(chunk) == 0:
        return 0  # (the fast count; torch below locates the first bad element, or checks other dtypes)
    bad = ~torch.isfinite(chunk)
    n = int(bad.sum())
    if n == 0:
        return 0
    first = torch.nonzero(bad.reshape(chunk.shape) if chunk.dim() else bad.reshape(1))[0].tolist()
    if chunk.dim():
        first[0] += offset
    index = tuple(first) if chunk.dim() else ()
    value = chunk.reshape(-1)[int(torch.nonzero(bad.reshape(-1))[0])].item()
    if overflow is not None:
        raise OptionsError(f"{overflow} overflows in tensor {name!r} (first at index {index}: {value})",
                           where=where, fix=overflow_fix)
    if counts is not None:
        counts[name] = counts.get(name, 0) + n
    if not allow:
        raise CheckpointError(f"non-finite value {value} in {what} of tensor {name!r} at index {index}",
                              where=where, fix=ALLOW_FIX)
    return n


def warn_nonfinite(counts: dict[str, int], *, what: str = "Δ") -> None:
    """One warning line listing the tensors with non-finite values that were kept (--allow-nonfinite)."""
    if counts:
        top = ", ".join(f"{k}: {v}" for k, v in list(counts.items())[:5])
        warnings.warn(f"kept {sum(counts.values())} non-finite values in {what} of {len(counts)} tensors "
                      f"({top}{', …' if len(counts) > 5 else ''})", RuntimeWarning, stacklevel=2)


def check_alphas(alphas: Iterable[float], *, where: str = "--alpha") -> None:
    """Every α must be a finite number (NaN or ±Inf would give a NaN/Inf model that still 'works')."""
    for a in alphas:
        if not isinstance(a, (int, float)) or not math.isfinite(a):
            raise OptionsError(f"α must be a finite number, got {a}", where=where,
                               fix="pass real numbers such as 0.2,0.6,1")
