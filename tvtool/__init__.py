"""tvtool: task-vector arithmetic on LLM checkpoints, for reasoning-length control (CoT-Valve).

Python API (the same functions the CLI calls):
    tvtool.delta(base=..., reasoner=..., output=...)          Δ = θ2 − θ1 to disk
    tvtool.materialize(source=DeltaSource(base=..., delta=|reasoner=...),
                       output=..., options=MaterializeOptions(alphas=(0.6,)))
    tvtool.TaskVector.between(base, reasoner) / TaskVector.load(path)
    tvtool.DeltaSource(base=..., delta=|reasoner=...)              where Δ comes from (fingerprint(), open())
    tvtool.merge_chunks(base=..., tv=..., configs=[MergeConfig(alpha=0.6)])   the one merge stream
    tvtool.evaluate(source=DeltaSource(base=..., reasoner=...), alphas=(0, 0.5, 1), output=..., options=EvalOptions(dataset="gsm8k"))
                                                                    an α sweep in one vLLM engine, scored
    tvtool.Engine(model=...) / Engine.for_source(source=DeltaSource(...))   the engine, to reuse across calls
See ARCHITECTURE.md for the modules and data paths.
"""

import importlib

from tvtool._version import __version__

# The exports load on first use (PEP 562 `__getattr__`), so `import tvtool` is fast: the `tvtool` command
# and `python -m tvtool` import this package before they can turn a Ctrl-C during the heavy imports
# (torch, transformers) into one line (tvtool.__main__).
_EXPORTS = {
    "Checkpoint": "tvtool.io.checkpoint",
    "DeltaOptions": "tvtool.vectors.delta", "delta": "tvtool.vectors.delta",
    "TvtoolError": "tvtool.errors",
    "LowRankOptions": "tvtool.lowrank.svd", "svd_rank": "tvtool.lowrank.svd",
    "MaterializeOptions": "tvtool.merge.options", "materialize": "tvtool.merge.materialize",
    "MergeConfig": "tvtool.merge.config", "merge_chunks": "tvtool.merge.stream",
    "merged_config": "tvtool.merge.plan", "merged_tensors": "tvtool.merge.stream",
    "DeltaSource": "tvtool.vectors.source",
    "TaskVector": "tvtool.vectors.taskvector",
    "Engine": "tvtool.engine.engine",
    "evaluate": "tvtool.evaluation.evaluate", "EvalOptions": "tvtool.evaluation.runs",
}

__all__ = ["Checkpoint", "DeltaOptions", "DeltaSource", "Engine", "EvalOptions", "MaterializeOptions", "MergeConfig",
           "TaskVector", "TvtoolError", "__version__", "LowRankOptions", "delta", "evaluate", "materialize",
           "merge_chunks", "merged_config", "merged_tensors", "svd_rank"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tvtool' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
