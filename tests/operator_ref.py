"""Operators applied chunk by chunk, outside the merge stream: the reference the operator tests compare against.

Every tensor is streamed in small row chunks (CHUNK elements) so that the selection passes, the tie cut
and the per-chunk math are all exercised across chunk boundaries. The per-chunk step is the stream's own
`_merge_one` (every configuration's rows of one chunk); the reading, planning and prefetching around it are
this harness's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tvtool.io.checkpoint import Checkpoint
from tvtool.io.safetensors_io import row_chunks
from tvtool.merge.config import MergeConfig
from tvtool.merge.prepare import prepare
from tvtool.merge.registry import Rows, TensorInfo
from tvtool.merge.stream import _merge_one
from tvtool.vectors.taskvector import TaskVector

CHUNK = 4096


def ours(base: Path, reasoners: list[Path], configs: list[MergeConfig]):
    """Every configuration's bf16 state dict, streamed in CHUNK-element row chunks; plus the Prepared state."""
    b = Checkpoint.open(base)
    tvs = [TaskVector.between(b, r) for r in reasoners]
    names = b.names()
    alphas = [c.alphas(names) for c in configs]
    out, preps = [{} for _ in configs], {}
    for name in names:
        shape = tuple(b.info(name).shape)
        ranges = row_chunks(shape, CHUNK)

        def read(s, e):
            return Rows(b.read(name, s, e), [tv.rows(name, s, e) for tv in tvs], start=s)

        prep = prepare([c.operator for c in configs], tensor=TensorInfo(name, shape, len(tvs)), ranges=ranges,
                       read=read)
        preps[name] = prep
        parts = [[] for _ in configs]
        for s, e in ranges:
            rows = read(s, e)
            res = _merge_one(configs, alphas, name, s, rows.base, None, rows.deltas, None, prep, torch.bfloat16)
            for j, r in enumerate(res):
                parts[j].append(r)
        for j in range(len(configs)):
            out[j][name] = torch.cat(parts[j]) if len(shape) > 1 else parts[j][0]
    return out, preps
