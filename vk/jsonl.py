"""Streaming JSON Lines in and out: ``-`` is stdin/stdout, records flushed line by line.

Every stage reads and writes through these helpers so that error messages (file, line, field) and flushing
behave the same everywhere.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterable, Iterator
from typing import IO, Any

import orjson

from vk import records
from vk.errors import RecordError, VkError


def source_name(path: str | os.PathLike) -> str:
    return "<stdin>" if str(path) == "-" else str(path)


def open_input(path: str | os.PathLike) -> IO[bytes]:
    """Open a file for reading bytes; ``-`` is stdin. A missing file is a VkError."""
    if str(path) == "-":
        return sys.stdin.buffer
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise VkError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise VkError(f"{path}: is a directory, expected a file") from None
    except PermissionError:
        raise VkError(f"{path}: permission denied") from None


def iter_lines(path: str | os.PathLike, fh: IO[bytes] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file. Bad JSON raises RecordError."""
    src = source_name(path)
    own = fh is None
    if fh is None:
        fh = open_input(path)
    try:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                raise RecordError(src, n, None, f"not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise RecordError(src, n, None, "expected a JSON object")
            yield n, obj
    finally:
        if own and fh is not sys.stdin.buffer:
            fh.close()


def read_records(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    kinds: tuple[str, ...] | None = None,
    *,
    validate: bool = True,
) -> Iterator[tuple[str, int, dict]]:
    """Yield ``(source, line, record)`` from one or more JSONL files, validating each record's kind."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for path in paths:
        src = source_name(path)
        for n, obj in iter_lines(path):
            if validate:
                records.validate(obj, src, n, kinds)
            elif kinds is not None and obj.get("kind") not in kinds:
                raise RecordError(src, n, "kind", f"expected {' or '.join(kinds)}, got {obj.get('kind')!r}")
            yield src, n, obj


def dumps(rec: Any) -> bytes:
    """One record as a JSON line (bytes, with the newline)."""
    return orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY)


class Writer:
    """Write records as JSON lines to a file or stdout (``-``), flushing after every record by default."""

    def __init__(self, path: str | os.PathLike | None = "-", *, flush_each: bool = True, append: bool = False):
        self.path = "-" if path is None else str(path)
        self.flush_each = flush_each
        if self.path == "-":
            self.fh: IO[bytes] = sys.stdout.buffer
            self._own = False
        else:
            try:
                self.fh = open(self.path, "ab" if append else "wb")
            except OSError as e:
                raise VkError(f"{self.path}: cannot write ({e.strerror})") from None
            self._own = True

    @property
    def is_regular_file(self) -> bool:
        try:
            return self._own and os.path.isfile(self.path)
        except OSError:
            return False

    def write(self, rec: Any) -> None:
        self.write_raw(dumps(rec))

    def write_raw(self, line: bytes) -> None:
        """Write an already-encoded line (must end with a newline)."""
        self.fh.write(line)
        if self.flush_each:
            self.fh.flush()

    def flush(self) -> None:
        try:
            self.fh.flush()
        except (BrokenPipeError, ValueError):
            pass

    def close(self) -> None:
        self.flush()
        if self._own:
            self.fh.close()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ListWriter(Writer):
    """A Writer that keeps records in memory (for the in-process Python API and tests)."""

    def __init__(self):  # noqa: D401 - no file
        self.path = "<memory>"
        self.flush_each = False
        self.fh = io.BytesIO()
        self._own = False
        self.records: list[dict] = []

    def write(self, rec: Any) -> None:
        self.records.append(orjson.loads(dumps(rec)))

    def write_raw(self, line: bytes) -> None:
        self.records.append(orjson.loads(line))
