"""Row sources for trace files: JSON Lines, CSV (by column name) and JSON arrays, streamed with byte offsets.

Every row comes with its *line number* (1-based, as an editor shows it; the CSV header is line 1) so that a bad
row is reported as ``FILE:LINE: field 'COLUMN': ...``. JSON arrays have no useful line numbers: their rows are
numbered by position (1-based ``item``) and reported as ``FILE: field '[ITEM].COLUMN': ...``.

Sources stream: ``scan()`` reads the file once, front to back, holding one row at a time, and yields each row's
byte offset so that the indexed mode (shuffle, wrap, multi-turn grouping) can come back to it with ``read_at``.
"""

from __future__ import annotations

import codecs
import csv
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone

import orjson

from vk.errors import RecordError, VkError

FORMATS = ("auto", "jsonl", "json", "csv")


class RowSource:
    """A trace file opened for streaming; ``kind`` is jsonl, json or csv."""

    kind = "?"

    def __init__(self, path: str, display: str | None = None):
        self.path = path
        self.src = display or path
        self.columns: list[str] | None = None
        self.size = os.path.getsize(path)

    def scan(self) -> Iterator[tuple[int, int, dict]]:
        raise NotImplementedError

    def read_at(self, offset: int, line: int) -> dict:
        raise NotImplementedError

    def error(self, line: int, field: str | None, message: str) -> RecordError:
        return RecordError(self.src, line, field, message)

    def close(self) -> None:
        pass


class _LineSource(RowSource):
    """A source with one record per line: the indexed mode reads a row back by its byte offset."""

    _fh = None

    def _parse(self, raw: bytes, line: int) -> dict | None:
        raise NotImplementedError

    def read_at(self, offset, line):
        if self._fh is None:
            self._fh = open(self.path, "rb")
        self._fh.seek(offset)
        return self._parse(self._fh.readline(), line)

    def close(self):
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class JsonlSource(_LineSource):
    kind = "jsonl"

    def __init__(self, path, display=None):
        super().__init__(path, display)
        self._fh = None

    def _parse(self, raw: bytes, line: int) -> dict:
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise self.error(line, None, f"not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise self.error(line, None, "expected a JSON object per line")
        return obj

    def scan(self):
        off = 0
        with open(self.path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                ln = len(raw)
                if raw.strip():
                    yield n, off, self._parse(raw, n)
                off += ln



class CsvSource(_LineSource):
    """CSV read by column name. One record per physical line (quoted fields may hold commas, not newlines)."""

    kind = "csv"

    def __init__(self, path, display=None, delimiter: str = ","):
        super().__init__(path, display)
        self._fh = None
        self.delimiter = delimiter
        with open(path, "rb") as fh:
            head = fh.readline()
        text = head.decode("utf-8-sig", errors="replace").rstrip("\r\n")
        if not text.strip():
            raise VkError(f"{self.src}: empty CSV file (expected a header line with column names)")
        self.columns = [c.strip() for c in next(csv.reader([text], delimiter=delimiter))]
        self._ncol = len(self.columns)

    def _parse(self, raw: bytes, line: int) -> dict | None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.error(line, None, f"not valid UTF-8 ({e.reason})") from None
        text = text.rstrip("\r\n")
        if not text.strip():
            return None
        d = self.delimiter
        vals = text.split(d) if '"' not in text else next(csv.reader([text], delimiter=d))
        if len(vals) != self._ncol:
            what = "comma-separated" if d == "," else "tab-separated"
            raise self.error(line, None, f"expected {self._ncol} {what} fields (as in the header), got {len(vals)}")
        return dict(zip(self.columns, vals, strict=True))

    def scan(self):
        with open(self.path, "rb") as fh:
            first = fh.readline()
            off = len(first)
            for n, raw in enumerate(fh, 2):
                row = self._parse(raw, n)
                if row is not None:
                    yield n, off, row
                off += len(raw)



class JsonArraySource(RowSource):
    """A JSON array of objects (ShareGPT files), streamed: one element in memory at a time.

    Elements are cut out of the text with the C scanner of ``json.JSONDecoder.raw_decode`` over a sliding
    buffer; each element's byte offset is kept so that the indexed mode can come back to it. Rows are numbered
    by position (1-based). A top-level object holding one list of objects (``{"data": [...]}``) is read whole.
    """

    kind = "json"
    CHUNK = 1 << 22

    def __init__(self, path, display=None):
        super().__init__(path, display)
        self._items: list | None = None  # only for the {"key": [...]} shape
        self._fh = None
        import json

        self._dec = json.JSONDecoder()

    def error(self, line, field, message):
        where = f"[{line}]" + (f".{field}" if field else "")
        return RecordError(self.src, None, where, message)

    def _load_wrapped(self) -> list:
        with open(self.path, "rb") as fh:
            data = fh.read()
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise VkError(f"{self.src}: not valid JSON ({e})") from None
        if isinstance(obj, dict):
            lists = [v for v in obj.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
            if len(lists) == 1 and "conversations" not in obj and "messages" not in obj:
                return lists[0]
            return [obj]
        raise VkError(f"{self.src}: expected a JSON array of objects")

    def _elements(self, fh, start_byte: int = 0, first: bool = True):
        """(byte offset, element) from ``fh`` positioned at an element (or at the array's '[' if first)."""
        dec = self._dec
        buf = ""
        pos = 0  # char position in buf
        byte = start_byte  # byte offset of buf[pos]
        eof = False

        decoder = codecs.getincrementaldecoder("utf-8")("strict")

        def more() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            chunk = fh.read(self.CHUNK)
            if not chunk:
                eof = True
                return False
            try:
                text = decoder.decode(chunk)  # a character split between reads waits for the next read
            except UnicodeDecodeError as e:
                raise VkError(f"{self.src}: not valid UTF-8 ({e.reason})") from None
            buf = buf[pos:] + text
            pos = 0
            return True

        def skip_ws() -> str | None:
            nonlocal pos, byte
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                    byte += 1
                if pos < len(buf):
                    return buf[pos]
                if not more():
                    return None

        if first:
            c = skip_ws()
            if c != "[":
                return
            pos += 1
            byte += 1
        n = 0
        while True:
            c = skip_ws()
            if c is None:
                raise VkError(f"{self.src}: the JSON array is not closed (truncated file?)")
            if c == "]":
                return
            if c == ",":
                if n == 0 and first:
                    raise VkError(f"{self.src}: not valid JSON (a comma before the first element)")
                pos += 1
                byte += 1
                continue
            while True:
                try:
                    obj, end = dec.raw_decode(buf, pos)
                    if end == len(buf) and not eof:
                        raise ValueError("maybe truncated")
                    break
                except ValueError:
                    if not more():
                        try:
                            obj, end = dec.raw_decode(buf, pos)
                            break
                        except ValueError as e:
                            raise VkError(f"{self.src}: element {n + 1}: not valid JSON ({e})") from None
            yield byte, obj
            byte += len(buf[pos:end].encode("utf-8"))
            pos = end
            n += 1
            if not first:
                return

    def scan(self):
        with open(self.path, "rb") as fh:
            head = fh.read(64).lstrip()
            fh.seek(0)
            if not head.startswith(b"["):
                self._items = self._load_wrapped()
                for i, obj in enumerate(self._items, 1):
                    if not isinstance(obj, dict):
                        raise self.error(i, None, "expected a JSON object")
                    yield i, -i, obj
                return
            for i, (off, obj) in enumerate(self._elements(fh), 1):
                if not isinstance(obj, dict):
                    raise self.error(i, None, "expected a JSON object")
                yield i, off, obj

    def read_at(self, offset, line):
        if offset < 0:
            if self._items is None:
                self._items = self._load_wrapped()
            return self._items[-offset - 1]
        if self._fh is None:
            self._fh = open(self.path, "rb")
        self._fh.seek(offset)
        for _off, obj in self._elements(self._fh, offset, first=False):
            return obj
        raise self.error(line, None, "cannot read the element again (the file changed?)")

    def close(self):
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def sniff_format(path: str, name: str | None = None) -> str:
    """jsonl, json or csv: by the extension of ``name`` (default ``path``), else by the first bytes."""
    low = (name or path).lower()
    for ext, kind in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".csv", "csv"), (".tsv", "csv")):
        if low.endswith(ext):
            return kind
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    if head.startswith(b"["):
        return "json"
    if head.startswith(b"{"):
        # a JSONL file has one object per line; a pretty-printed JSON object spans lines
        first = head.split(b"\n", 1)[0].strip()
        try:
            orjson.loads(first)
            return "jsonl"
        except orjson.JSONDecodeError:
            return "json"
    return "csv"


class _Spool:
    """stdin, or a compressed file, copied to a temporary file (the indexed mode comes back to rows by offset)."""

    def __init__(self, stream=None, label: str = "<stdin>"):
        fd, self.path = tempfile.mkstemp(prefix="vk-trace-", suffix=".spool")
        try:
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(sys.stdin.buffer if stream is None else stream, out, 1 << 20)
        except Exception as e:  # noqa: BLE001 - gzip/bz2/lzma each raise their own kind: one line for all
            self.close()
            raise VkError(f"{label}: cannot read ({e})") from None

    def close(self):
        try:
            os.unlink(self.path)
        except OSError:
            pass


def open_source(path: str, fmt: str = "auto") -> tuple[RowSource, object | None]:
    """Open a trace file (``-`` is stdin, spooled to a temporary file). Returns (source, cleanup-handle)."""
    spool = None
    display = "<stdin>" if path == "-" else path
    inner = path
    if path == "-":
        spool = _Spool()
        path = spool.path
    elif not os.path.exists(path):
        raise VkError(f"{path}: no such file")
    elif os.path.isdir(path):
        raise VkError(f"{path}: is a directory, expected a trace file")
    else:
        low = path.lower()
        for ext, mod in ((".gz", "gzip"), (".bz2", "bz2"), (".xz", "lzma")):
            if low.endswith(ext):
                import importlib

                with importlib.import_module(mod).open(path, "rb") as z:
                    spool = _Spool(z, path)
                inner = path[: -len(ext)]
                path = spool.path
                break
    if fmt == "auto":
        kind = sniff_format(path, inner)
    else:
        kind = fmt
    if kind == "csv":
        return CsvSource(path, display, "\t" if inner.lower().endswith(".tsv") else ","), spool
    cls = {"jsonl": JsonlSource, "json": JsonArraySource}[kind]
    return cls(path, display), spool


# ----------------------------------------------------------------------------------------------------------------
# timestamps

_FRACTION = re.compile(r"^(.*?[T ]\d{2}:\d{2}:\d{2}\.)(\d+)(.*)$")
_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def parse_number(value, *, integer: bool = False):
    """A number from JSON or CSV text. Returns None for a blank/missing value; raises ValueError if malformed."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    if isinstance(value, (int, float)):
        v = value
    elif isinstance(value, str):
        s = value.strip()
        if not s:
            return None
        try:
            v = int(s)
        except ValueError:
            try:
                v = float(s)
            except ValueError:
                raise ValueError(f"expected a number, got {value!r}") from None
    else:
        raise ValueError(f"expected a number, got {type(value).__name__}")
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"expected a finite number, got {value!r}")
    if integer and not isinstance(v, int):
        if float(v).is_integer():
            v = int(v)
        else:
            raise ValueError(f"expected an integer, got {value!r}")
    return v


def parse_time(value, unit: str = "s") -> float | None:
    """Seconds on the trace's own clock: a number in ``unit`` or an ISO-8601 date-time (naive means UTC)."""
    if value is None:
        return None
    if isinstance(value, str):
        s = value.strip()
        if not s:
            return None
        try:
            return float(s) * _UNITS[unit]
        except ValueError:
            pass
        if s.endswith("Z"):
            s = s[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(s)
        except ValueError:
            # Azure writes 7 fractional digits; Python < 3.11 reads at most 6 (vk keeps microseconds)
            m = _FRACTION.match(s)
            try:
                if m is None:
                    raise ValueError
                dt = datetime.fromisoformat(m.group(1) + m.group(2)[:6].ljust(6, "0") + m.group(3))
            except ValueError:
                raise ValueError(f"expected a number or an ISO date-time, got {value!r}") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return (dt - _EPOCH).total_seconds()
    v = parse_number(value)
    return None if v is None else float(v) * _UNITS[unit]
