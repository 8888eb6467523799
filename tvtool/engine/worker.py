"""The methods vLLM adds to each of its workers (`worker_extension_cls`): in-place weight loads.

Called through `collective_rpc` by `tvtool.engine.engine.Engine`; they run in the worker
process, build the weights there from paths, and hand vLLM a stream of
(name, tensor), so no tensor crosses a process boundary:

    Engine.load_alpha → collective_rpc("tvtool_load_alpha", source, config)
      → WorkerExtension.tvtool_load_alpha → tvtool.merge.stream.merged_tensors → reload_weights

The opened inputs (headers and the task vector's plan) are kept per worker for the last
source, so a sweep does not re-open and re-plan them for every α.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch

from tvtool.io.checkpoint import Checkpoint
from tvtool.merge.config import MergeConfig
from tvtool.merge.stream import merged_tensors
from tvtool.vectors.source import DeltaSource

_opened: dict[tuple, tuple] = {}  # this worker's last opened (source, stamp) → (θ1, Δ)


class WorkerExtension:
    """Mixed into vLLM's worker class; `self.reload_weights` is the worker's own."""

    def tvtool_load_alpha(self, source: dict, config: dict) -> int:
        """Load θ1 + α·Δ (the shared merge stream) into this worker; returns the number of tensors."""
        src, cfg = DeltaSource.from_dict(source), MergeConfig.from_dict(config)
        base, tvs = _open(src)
        counter = _Counted(merged_tensors(base=base, tv=tvs, config=cfg))
        self.reload_weights(weights_iterator=iter(counter))
        return counter.n

    def tvtool_load_folder(self, path: str) -> int:
        """Load a model folder's weights into this worker; returns the number of tensors."""
        ckpt = Checkpoint.open(path)
        counter = _Counted(ckpt.iter_stored())  # as stored: an fp8 folder's engine takes its fp8 weights and scales
        self.reload_weights(weights_iterator=iter(counter))
        return counter.n


def _open(src: DeltaSource):
    """(θ1, [Δ_i]) of `src`, re-opened when an input path was replaced or touched since."""
    key = (src, tuple(_stamp(p) for p in (src.base, src.delta, src.reasoner, *src.more)))
    if key not in _opened:
        _opened.clear()
        _opened[key] = src.open()
    return _opened[key]


def _stamp(path: str | None):
    try:
        st = os.stat(path) if path else None
    except OSError:  # a Hub id
        return None
    return st and (st.st_ino, st.st_mtime_ns, st.st_size)


class _Counted:
    def __init__(self, items: Iterator[tuple[str, torch.Tensor]]):
        self.items, self.n = items, 0

    def __iter__(self):
        for item in self.items:
            self.n += 1
            yield item
