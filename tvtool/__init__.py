"""tvtool: task-vector arithmetic on LLM checkpoints, for reasoning-length control (CoT-Valve).

Python API (the same functions the CLI calls):
    tvtool.delta(base=..., reasoner=..., output=...)          Δ = θ2 − θ1 to disk
    tvtool.materialize(source=DeltaSource(base=..., delta=|reasoner=...),
                       output=..., options=MaterializeOptions(alphas=(0.6,)))
    tvtool.TaskVector.between(base, reasoner) / TaskVector.load(path)
    tvtool.DeltaSource(base=..., delta=|reasoner=...)              where Δ comes from (fingerprint(), open())
    tvtool.merge_chunks(base=..., tv=..., configs=[MergeConfig(alpha=0.6)])   the one merge stream
See ARCHITECTURE.md for the modules and data paths.
"""

from tvtool._version import __version__  # noqa: E402

from tvtool.io.checkpoint import Checkpoint  # noqa: E402
from tvtool.vectors.delta import DeltaOptions, delta  # noqa: E402
from tvtool.errors import TvtoolError  # noqa: E402
from tvtool.lowrank.svd import LowRankOptions, svd_rank  # noqa: E402
from tvtool.merge.materialize import MaterializeOptions, materialize  # noqa: E402
from tvtool.merge.config import MergeConfig  # noqa: E402
from tvtool.merge.plan import merged_config  # noqa: E402
from tvtool.merge.stream import merge_chunks, merged_tensors  # noqa: E402
from tvtool.vectors.source import DeltaSource  # noqa: E402
from tvtool.vectors.taskvector import TaskVector  # noqa: E402

__all__ = ["Checkpoint", "DeltaOptions", "DeltaSource", "MaterializeOptions", "MergeConfig", "TaskVector",
           "TvtoolError", "__version__", "LowRankOptions", "delta", "materialize", "merge_chunks", "merged_config",
           "merged_tensors", "svd_rank"]
