"""Streaming JSON Lines in and out: ``-`` is stdin/stdout, records flushed line by line.

Every stage reads and writes through these helpers so that error messages (file, line, field) and flushing
behave the same everywhere.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import sys
from collections.abc import Iterable, Iterator
from typing import IO, Any

import orjson

from vk import records
from vk.errors import RecordError, VkError

# Exit status of every command whose output could not be written because the disk (or the file-size limit, or
# the quota) is full: sysexits' EX_IOERR.
EXIT_NO_SPACE = 74
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class NoSpaceError(VkError):
    """The output could not be written: no space left (ENOSPC), file too large (EFBIG) or quota (EDQUOT)."""

    exit_code = EXIT_NO_SPACE


def no_space_message(path: str, e: OSError) -> str:
    why = {errno.EFBIG: " (file size limit reached)", errno.EDQUOT: " (disk quota exceeded)"}.get(e.errno, "")
    return f"{path}: no space left{why}; the output ends after its last whole record"


def cut_to_last_line(fd: int) -> bool:
    """Truncate a regular file after its last newline, so that a write cut short by a full disk leaves whole
    records only. False when ``fd`` is not a regular file (nothing to do) or cannot be truncated."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        end = st.st_size
        pos = end
        # a fresh descriptor to read with: standard output is usually opened write-only
        rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
        try:
            while pos > 0:
                n = min(1 << 16, pos)
                chunk = os.pread(rfd, n, pos - n)
                i = chunk.rfind(b"\n")
                if i >= 0:
                    pos = pos - n + i + 1
                    break
                pos -= n
        finally:
            os.close(rfd)
        if pos != end:
            os.ftruncate(fd, pos)
        return True
    except OSError:
        return False


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
        self.failed: OSError | None = None

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
        try:
            self.fh.write(line)
            if self.flush_each:
                self.fh.flush()
        except OSError as e:
            self._failed(e)

    def write_lines(self, data: bytes) -> None:
        """Write several whole lines and flush them."""
        try:
            self.fh.write(data)
            self.fh.flush()
        except OSError as e:
            self._failed(e)

    def _failed(self, e: OSError) -> None:
        """A write failed. A full disk: cut the file back to its last whole record, send whatever is still
        buffered nowhere (so that closing it cannot fail a second time) and raise NoSpaceError naming the file."""
        if e.errno not in NO_SPACE_ERRNOS or isinstance(e, BrokenPipeError):
            raise e
        self.failed = e
        self._discard()
        raise NoSpaceError(no_space_message(source_name(self.path) if self.path != "-" else "<stdout>", e)) from None

    def _discard(self) -> None:
        try:
            fd = self.fh.fileno()
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            return
        cut_to_last_line(fd)
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)
        except OSError:
            pass

    def flush(self) -> None:
        try:
            self.fh.flush()
        except (BrokenPipeError, ValueError):
            pass
        except OSError as e:
            self._failed(e)

    def close(self) -> None:
        if self.failed is None:
            self.flush()
        if self._own:
            try:
                self.fh.close()
            except OSError:
                if self.failed is None:
                    raise

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
