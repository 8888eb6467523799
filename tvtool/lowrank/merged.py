"""What svd-rank factors: Δ, or an operator's merged task vector M (e.g. "factor the trimmed Δ").

With operator settings (`MergeOptions`: `--merge-method trim --density 0.2`, TIES over several
`--vector`s, …) svd-rank factors M, the very tensor that the one merge path scales by α
(`merge.merge_chunks` → `operators.merged_delta` with the per-tensor cuts of `operators.prepare`),
read through `operators.MergedVector`: one implementation of M, whole tensors or row chunks alike.
Without them (one task vector, weight 1, task_arithmetic) it factors Δ as before, with the same
finished-work record.

α, per-module α rules (`--alpha-rule`) and a layer schedule (`--layer-schedule`) are not part of
M: they scale M where it is applied. svd-rank refuses them rather than baking them in: the factored
M is a task vector that materialize/eval apply with their own α and rules (θ1 + α·f(tensor)·B·A), so
a baked-in factor would be applied twice by a recipe that keeps its rules, and would be invisible in
the records of the runs that use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from tvtool.errors import OptionsError
from tvtool.merge.stream import MergeConfig
from tvtool.merge.options import MergeOptions, operator_settings
from tvtool.merge.operators import MergedVector
from tvtool.vectors.source import DeltaSource
from tvtool.vectors.taskvector import TaskVector

MERGE_FLAGS = {"method": "--merge-method"}  # svd-rank's own --method picks the SVD (LowRankOptions.method)


@dataclass(frozen=True)
class LowRankInput:
    """The task vector(s) svd-rank reads and what it factors (`values`: Δ, or the operator's M)."""

    source: DeltaSource
    vectors: tuple[TaskVector, ...]
    config: MergeConfig | None  # the operator at α = 1 (None: plain Δ)

    @property
    def tv(self) -> TaskVector:
        """The first task vector: names, shapes, provenance and side files of the output."""
        return self.vectors[0]

    @property
    def values(self) -> TaskVector | MergedVector:
        return self.tv if self.config is None else MergedVector(list(self.vectors), self.config.merge)

    def settings(self) -> dict | None:
        """The operator settings as recorded (finished-work record, metadata, report); None: plain Δ."""
        return None if self.config is None else operator_settings(self.config, more=self.source.more)


def operator_config(*, merge: MergeOptions, weights: tuple[float, ...]) -> MergeConfig | None:
    """The operator svd-rank factors (at α = 1), or None for plain Δ; rules and schedules are refused
    (see the module doc). `weights`: per task vector (`merge_options.split_vectors`)."""
    for flag, given in (("--alpha-rule", merge.alpha_rules), ("--layer-schedule", merge.layer_schedule)):
        if given:
            raise OptionsError("svd-rank factors the merged task vector M; α rules and layer schedules scale α "
                               "where M is applied", where=flag,
                               fix=f"drop {flag} here and pass it to materialize/eval with the factored delta")
    (config,) = merge.configs([1.0], weights=weights)
    return None if config.is_plain(len(weights)) else config


def open_input(*, source: DeltaSource, config: MergeConfig | None) -> LowRankInput:
    """Open the task vectors (headers only); several must share one architecture."""
    vectors = tuple(source.task_vectors())
    if config is not None:
        config.merge.check(len(vectors))
        MergedVector(list(vectors), config.merge)  # checks names and shapes (one architecture)
    return LowRankInput(source, vectors, config)


def applied_configs(configs: Sequence[MergeConfig]) -> list[MergeConfig]:
    """The configurations that apply a factored M (one task vector): each one's α, tensor selection, α rules
    and schedule; its operator and weights are inside M already."""
    return list(dict.fromkeys(MergeConfig(c.alpha, c.include, c.exclude, rules=c.rules, schedule=c.schedule)
                              for c in configs))


__all__ = ["applied_configs", "LowRankInput", "MERGE_FLAGS", "open_input", "operator_config"]
