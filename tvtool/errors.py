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


# errno → (what happened, what to do) for OS errors met while writing outputs.
_OS_ERRORS = {
    "ENOSPC": ("no space left on the device", "free some space or write the output elsewhere, then re-run "
                                              "(partial outputs were removed; finished ones are kept)"),
    "EDQUOT": ("disk quota exceeded", "free some space or write the output elsewhere, then re-run"),
    "EFBIG": ("file too large for this file system", "lower --max-shard-size, or write to a file system "
                                                     "without a file size limit"),
    "EROFS": ("read-only file system", "write the output to a writable location"),
    "EACCES": ("permission denied", "check the permissions, or choose another output path"),
    "EPERM": ("operation not permitted", "check the permissions, or choose another output path"),
    "ENOTDIR": ("a path component is a file, not a folder", "remove that file or choose another output path"),
    "EISDIR": ("a folder is in the way of a file", "remove that folder or choose another output path"),
    "EEXIST": ("the path already exists", "remove it or choose another output path"),
    "ENOENT": ("no such file or folder", "check the path"),
    "EMFILE": ("too many open files", "raise the limit (ulimit -n) and re-run"),
}


def os_error(err: OSError) -> TvtoolError:
    """An OSError as one TvtoolError line: what (by errno), where (the file), what to do."""
    import errno as _errno

    name = _errno.errorcode.get(err.errno or 0, "")
    what, fix = _OS_ERRORS.get(name, (err.strerror or type(err).__name__, "check the path and re-run"))
    where = " → ".join(str(f) for f in (err.filename, err.filename2) if f is not None) or None
    return OutputError(f"{what} [{name or type(err).__name__}]", where=where, fix=fix)


class ClusterError(TvtoolError):
    """A Ray cluster cannot run the work: a node cannot see the inputs or output, or units failed."""
