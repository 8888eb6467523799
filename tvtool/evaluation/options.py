"""How responses are read and grouped: the thinking delimiter and the difficulty field.

One definition, shared by `tvtool eval`/`generate` (fields of `EvalOptions`) and a recipe's `eval:`
section. Neither changes what is generated, so neither is in a run's finished-work record: a changed
value re-reads the samples already written (`tvtool.evaluation.answers.reread_file`) and re-summarises.
Light to import (no engine, no scoring).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvtool.options import CliOptions, opt

AUTO, NONE = "auto", "none"


@dataclass(frozen=True)
class AnswerOptions(CliOptions):
    think_end: str = opt(AUTO, "Thinking delimiter: the answer rule reads only the text after its last occurrence; "
                               "a response without it is unfinished thinking (scored on its whole text, counted "
                               "apart). auto: </think> when the chat template or the outputs carry it; none: off.")
    difficulty_field: str = opt(AUTO, "Problem field of the per-difficulty tables: level (MATH-500), steps (GSM8K "
                                      "proxy: lines of the gold solution, bucketed), grade (ASDiv), or any field of "
                                      "the dataset's records. auto: the first of level, steps, grade with 2+ values; "
                                      "none: off.")
