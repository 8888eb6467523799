"""tvtool: task-vector arithmetic on LLM checkpoints, for reasoning-length control (CoT-Valve).

Python API (the same functions the CLI calls):
    tvtool.delta(base=..., reasoner=..., output=...)          Δ = θ2 − θ1 to disk
    tvtool.materialize(base=..., delta=|reasoner=..., output=..., options=MaterializeOptions(alphas=(0.6,)))
    tvtool.TaskVector.between(base, reasoner) / TaskVector.load(path)
    tvtool.DeltaSource(base=..., delta=|reasoner=...)              where Δ comes from (fingerprint(), open())
    tvtool.merge_chunks(base=..., tv=..., configs=[MergeConfig(alpha=0.6)])   the one merge stream
    tvtool.evaluate(base=..., reasoner=..., alphas=(0, 0.5, 1), output=..., options=EvalOptions(dataset="gsm8k"))
                                                                    an α sweep in one vLLM engine, scored
    tvtool.Engine(model=...) / Engine.for_source(source=DeltaSource(...))   the engine, to reuse across calls
See ARCHITECTURE.md for the modules and data paths.
"""

from tvtool._version import __version__  # noqa: E402

from tvtool.engine.engine import Engine  # noqa: E402
from tvtool.evaluation.evaluate import evaluate  # noqa: E402
from tvtool.evaluation.runs import EvalOptions  # noqa: E402
from tvtool.io.checkpoint import Checkpoint  # noqa: E402
from tvtool.vectors.delta import DeltaOptions, delta  # noqa: E402
from tvtool.errors import TvtoolError  # noqa: E402
from tvtool.lowrank.svd import LowRankOptions, svd_rank  # noqa: E402
from tvtool.merge.materialize import MaterializeOptions, materialize  # noqa: E402
from tvtool.merge.stream import MergeConfig, merge_chunks, merged_config, merged_tensors  # noqa: E402
from tvtool.vectors.source import DeltaSource  # noqa: E402
from tvtool.vectors.taskvector import TaskVector  # noqa: E402

__all__ = ["Checkpoint", "DeltaOptions", "DeltaSource", "Engine", "EvalOptions", "MaterializeOptions", "MergeConfig",
           "TaskVector", "TvtoolError", "__version__", "LowRankOptions", "delta", "evaluate", "materialize",
           "merge_chunks", "merged_config", "merged_tensors", "svd_rank"]
