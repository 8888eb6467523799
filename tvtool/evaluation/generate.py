"""`generate_responses`: the `tvtool generate` verb, `evaluate` without scoring.

The same inputs and resumable outputs as `tvtool.evaluation.evaluate`: responses, token ids and
finish reasons in samples.jsonl, token statistics in summary.json; e.g. to build
MixChain-style data. The options it takes are re-exported here for convenience.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from tvtool.engine.options import EngineOptions, SamplingOptions
from tvtool.evaluation.evaluate import evaluate
from tvtool.evaluation.report import EvalResult
from tvtool.engine.prompting import PromptOptions
from tvtool.evaluation.runs import EvalOptions


def generate_responses(*, output: str | os.PathLike, options: EvalOptions = EvalOptions(), **kw: Any) -> EvalResult:
    """`evaluate` with scoring off; `kw` are `evaluate`'s other arguments (model, base, alphas, …)."""
    return evaluate(output=output, options=replace(options, score=False), **kw)


__all__ = ["EngineOptions", "EvalOptions", "PromptOptions", "SamplingOptions", "generate_responses"]
