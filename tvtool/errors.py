"""One error hierarchy for tvtool.

Every error carries what went wrong, where (file, tensor, field) and what to do
about it. The CLI turns any `TvtoolError` into a single line on stderr and a
non-zero exit, in one place (`tvtool.cli`); nothing else catches or parses them.
"""

from __future__ import annotations


class TvtoolError(Exception):
    """Base class. `str(err)` is one line: "<what> (<where>). <fix>"."""

    exit_code = 2

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None, **data):
        self.what, self.where, self.fix, self.data = what, where, fix, data
        super().__init__(str(self))

    def __str__(self) -> str:
        msg = self.what
        if self.where:
            msg += f" ({self.where})"
        if self.fix:
            msg += f". {self.fix[:1].upper()}{self.fix[1:]}"
        return msg.replace("\n", " ")


class OptionsError(TvtoolError):
    """An option or argument has a bad value."""


class CheckpointError(TvtoolError):
    """A checkpoint (or delta) on disk is missing, malformed or unsupported."""


class MismatchError(TvtoolError):
    """Base and reasoner (or base and delta) do not line up: names, shapes, vocab."""


class OutputError(TvtoolError):
    """The output location cannot be used as asked."""


class DatasetError(TvtoolError):
    """An evaluation or training dataset cannot be read."""


class ScoringError(TvtoolError):
    """An answer cannot be scored (bad kind or rule, math-verify missing or its worker broken)."""


class EngineError(TvtoolError):
    """vLLM is missing or could not run the request."""


class RecipeError(TvtoolError):
    """A sweep recipe does not validate."""


class HubError(TvtoolError):
    """The Hugging Face Hub (or a Hub-compatible server) refused or failed."""
