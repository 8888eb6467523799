"""Reused chunk buffers for the streaming passes: `empty` instead of `torch.empty` for large chunks.

Measured reason (BENCHMARKS.md, perf on the 2.5 GB Llama-8B-shaped pair): a materialize pass
allocates a fresh 16–80 MB buffer per read and per output chunk; glibc serves those with mmap,
so every chunk page-faults its pages in (the kernel zeroes each 4 KiB page) and unmaps them
again. That was ~15% of the 5-α pass's CPU time. Inside `reuse()`, `empty` hands out buffers
that come back to a free list when the last tensor viewing them is freed (whichever thread
frees it), so a pass touches each page once. Outside `reuse()` it is `torch.empty`: a vLLM worker
that loads merged tensors keeps no pool.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from typing import Iterator

import numpy as np
import torch

_MIN = 1 << 20  # smaller buffers are cheap to allocate: plain torch.empty
_lock = threading.Lock()
_free: dict[int, list[np.ndarray]] | None = None  # size class (bytes, a power of two) → idle buffers
_KEEP = 16  # idle buffers kept per size class


@contextlib.contextmanager
def reuse() -> Iterator[None]:
    """Within this block (one pass, any threads), `empty` recycles large buffers; all are released after."""
    global _free
    with _lock:
        outer, _free = _free, ({} if _free is None else _free)
    try:
        yield
    finally:
        with _lock:
            _free = outer


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor: from the free list inside `reuse()` (large ones), else `torch.empty`."""
    nbytes = math.prod(shape) * dtype.itemsize
    if _free is None or nbytes < _MIN:
        return torch.empty(shape, dtype=dtype)
    size = 1 << (nbytes - 1).bit_length()  # pages past nbytes are never touched: virtual only
    with _lock:
        pool = _free
        raw = pool.get(size, []).pop() if pool is not None and pool.get(size) else None
    if raw is None:
        raw = np.empty(size, dtype=np.uint8)
    view = raw[:nbytes]  # its own ndarray object: torch.from_numpy holds it until the storage dies
    weakref.finalize(view, _give_back, pool, size, raw)
    return torch.from_numpy(view).view(dtype).view(shape)


def _give_back(pool: dict | None, size: int, raw: np.ndarray) -> None:
    with _lock:
        if pool is not None and pool is _free and len(pool.setdefault(size, [])) < _KEEP:
            pool[size].append(raw)
