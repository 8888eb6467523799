"""What svd-rank factors: Δ, or an operator's merged task vector M (e.g. "factor the trimmed Δ").

With operator settings (`MergeOptions`: `--merge-method trim --density 0.2`, TIES over several
`--vector`s, …) svd-rank factors M, the very tensor that the one merge path scales by α
(`Operator.merged` with the per-tensor state of `tvtool.merge.stream.prepare`), read through
`tvtool.merge.merged.MergedVector`: one implementation of M, whole tensors or row chunks alike.
Only operators of the form θ1 + α·M have such an M (`Operator.alpha_free`; not slerp): the others are
refused in one line. Without operator settings (one task vector, weight 1, task_arithmetic) it
factors Δ as before, with the same finished-work record.

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
from tvtool.merge.config import MergeConfig
from tvtool.merge.merged import MergedVector
from tvtool.merge.options import MergeOptions, operator_settings
from tvtool.merge.registry import operators
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
        return self.tv if self.config is None else MergedVector(list(self.vectors), self.config.operator)

    def settings(self) -> dict | None:
        """The operator settings as recorded (finished-work record, metadata, report); None: plain Δ."""
        return None if self.config is None else operator_settings(self.config, more=self.source.more)


def operator_config(*, merge: MergeOptions, n_vectors: int) -> MergeConfig | None:
    """The operator svd-rank factors (at α = 1) over `n_vectors` task vectors, or None for plain Δ; operators
    without an α-free M, rules and schedules are refused (see the module doc)."""
    if not operators()[merge.method].alpha_free:
        free = [n for n, cls in operators().items() if cls.alpha_free]
        raise OptionsError(f"{merge.method} has no merged task vector M to factor (α enters it otherwise than "
                           "θ1 + α·M)", where="--merge-method",
                           fix=f"use one of {', '.join(free)}, or materialize {merge.method} models instead")
    for flag, given in (("--alpha-rule", merge.rules), ("--layer-schedule", merge.layer_schedule)):
        if given:
            raise OptionsError("svd-rank factors the merged task vector M; α rules and layer schedules scale α "
                               "where M is applied", where=flag,
                               fix=f"drop {flag} here and pass it to materialize/eval with the factored delta")
    (config,) = merge.configs([1.0])
    return None if config.is_plain(n_vectors) else config


def open_input(*, source: DeltaSource, config: MergeConfig | None) -> LowRankInput:
    """Open the task vectors (headers only); several must share one architecture."""
    vectors = tuple(source.open().vectors)
    if config is not None:
        MergedVector(list(vectors), config.operator)  # checks the settings, names and shapes (one architecture)
    return LowRankInput(source, vectors, config)


def applied_configs(configs: Sequence[MergeConfig]) -> list[MergeConfig]:
    """The configurations that apply a factored M (one task vector): each one's α, tensor selection, α rules
    and schedule; its operator and weights are inside M already."""
    return list(dict.fromkeys(MergeConfig(c.alpha, c.include, c.exclude, rules=c.rules, schedule=c.schedule)
                              for c in configs))


__all__ = ["applied_configs", "LowRankInput", "MERGE_FLAGS", "open_input", "operator_config"]
