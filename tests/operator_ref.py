"""Operators applied chunk by chunk, outside the merge stream: the reference the operator tests compare against.

Every tensor is streamed in small row chunks (CHUNK elements) so that the selection passes, the tie cut
and the per-chunk math are all exercised across chunk boundaries.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tvtool.io.checkpoint import Checkpoint
from tvtool.io.safetensors_io import row_chunks
from tvtool.merge.operators import Config, outputs, prepare
from tvtool.vectors.taskvector import TaskVector

CHUNK = 4096


def ours(base: Path, reasoners: list[Path], configs: list[Config]):
    """Every configuration's bf16 state dict, streamed in CHUNK-element row chunks; plus the Prepared cuts."""
    b = Checkpoint.open(base)
    tvs = [TaskVector.between(b, r) for r in reasoners]
    names = b.names()
    alphas = [c.alphas(names) for c in configs]
    out, preps = [{} for _ in configs], {}
    for name in names:
        shape = tuple(b.info(name).shape)
        ranges = row_chunks(shape, CHUNK)

        def read(s, e):
            return [tv.rows(name, s, e) for tv in tvs]

        prep = prepare([c.merge for c in configs], name=name, shape=shape, n_vectors=len(tvs), ranges=ranges,
                       read=read)
        preps[name] = prep
        parts = [[] for _ in configs]
        for s, e in ranges:
            res = outputs(configs, [a[name] for a in alphas], prep, base_rows=b.read(name, s, e), deltas=read(s, e),
                          start_row=s, dtype=torch.bfloat16)
            for j, r in enumerate(res):
                parts[j].append(r)
        for j in range(len(configs)):
            out[j][name] = torch.cat(parts[j]) if len(shape) > 1 else parts[j][0]
    return out, preps
