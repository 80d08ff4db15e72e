"""Errors that reach the user as one line on stderr and exit code 2."""

from __future__ import annotations


class VkError(Exception):
    """A problem with the user's input or options.

    The command-line layer prints ``str(err)`` as one line, prefixed with the command's name, and exits with
    ``err.exit_code`` (2 unless said otherwise). Library callers can catch it like any exception.
    """

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class RecordError(VkError):
    """A malformed record: names the source, the line number and the field."""

    def __init__(self, source: str, line: int | None, field: str | None, message: str):
        self.source = source
        self.line = line
        self.field = field
        self.reason = message
        where = source if line is None else f"{source}:{line}"
        what = f"field '{field}': {message}" if field else message
        super().__init__(f"{where}: {what}")
