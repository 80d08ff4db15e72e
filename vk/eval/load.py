"""Loading vk-send output into DuckDB, validated, fast.

The fast path reads every file with DuckDB's ``read_ndjson`` (parallel, typed columns) and checks the kind and
version of every line in SQL. Whenever that check, or DuckDB's parser, finds a problem, the files are read again
line by line with ``vk.records.validate`` so that the error names the file, the line and the field. Small inputs
(under ``FULL_VALIDATION_BYTES``) are always validated record by record.

Without a saved database the table is lean (``LEAN_EVENT_COLUMNS``): the event lists are not stored, and the
event times are read from the files a second time (``event_source``) straight into numpy.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import duckdb
import orjson

from vk import records
from vk.errors import RecordError, VkError
from vk.jsonl import iter_lines, source_name

INPUT_KINDS = ("run", "response", "run_end", "server_metric")
FULL_VALIDATION_BYTES = 32 * 1024 * 1024

# Fields of response records vk-eval reads, with their DuckDB types. Any other top-level field can still be
# used with --group-by: it is read as an extra VARCHAR column on demand.
TIME_COLS = records.TIME_FIELDS
RESPONSE_COLUMNS: dict[str, str] = {
    "kind": "VARCHAR",
    "v": "BIGINT",
    "run_id": "VARCHAR",
    "session_id": "VARCHAR",
    "request_id": "VARCHAR",
    "session_index": "BIGINT",
    "warmup": "BOOLEAN",
    "worker": "VARCHAR",
    "status": "VARCHAR",
    "http_status": "BIGINT",
    "error": "VARCHAR",
    **{f: "DOUBLE" for f in TIME_COLS},
    "events": "STRUCT(t DOUBLE[], tokens BIGINT[], kind VARCHAR, server_t DOUBLE[])",
    "usage": "STRUCT(prompt_tokens BIGINT, completion_tokens BIGINT, cached_tokens BIGINT, reasoning_tokens BIGINT)",
    "finish_reason": "VARCHAR",
    "target_input_tokens": "BIGINT",
    "target_output_tokens": "BIGINT",
    "prefix_tokens": "BIGINT",
    "target_prefix_tokens": "BIGINT",
    "task": "VARCHAR",  # tasks beyond chat: vk.eval.tasks
    "document_count": "BIGINT",
    "body_bytes": "BIGINT",
    "t_first_body": "DOUBLE",
    # run header and run_end fields (few lines; JSON keeps them as they are)
    "start_epoch": "DOUBLE",
    "api": "VARCHAR",
    "model": "VARCHAR",
    "endpoint": "VARCHAR",
    "vk_version": "VARCHAR",
    "host": "VARCHAR",
    "lagged": "BOOLEAN",
    "schedule": "JSON",
    "argv": "JSON",
    "totals": "JSON",
    "lag": "JSON",
    "reason": "JSON",
    "ended": "JSON",
    "end_reason": "JSON",
    "stop_reason": "JSON",
    "lag_threshold": "JSON",
    "dispatch_lag_p99": "JSON",
    "attempts": "BIGINT",
    "warning": "VARCHAR",
    "server": "JSON",
    "ray": "JSON",
    "ray_nodes": "JSON",
    "retried": "JSON",
}

RUN_FIELDS = ("run_id", "start_epoch", "api", "model", "endpoint", "vk_version", "host", "lagged", "schedule",
              "argv", "server", "ray")
RUN_END_FIELDS = ("run_id", "lagged", "totals", "lag", "reason", "ended", "end_reason", "stop_reason", "lag_threshold",
                  "dispatch_lag_p99", "ray_nodes", "retried")
# the columns of raw that only run headers and footers fill (left out of the responses view)
RUN_ONLY_COLUMNS = ("kind, start_epoch, api, model, endpoint, vk_version, host, lagged, schedule, argv, totals, lag, "
                    "reason, ended, end_reason, stop_reason, lag_threshold, dispatch_lag_p99, server, ray, ray_nodes, retried")


def _sql_str(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


class Inputs:
    """Input files ready for DuckDB: records given as dicts or on stdin are spooled to a temporary file."""

    def __init__(self, inputs: Any):
        self._tmp: str | None = None
        self.checked = False  # validated record by record
        self.object_size: int | None = None  # DuckDB's maximum_object_size that read the files
        self.paths: list[str] = []
        self.names: list[str] = []
        self.warnings: list[str] = []  # about the input as read (a cut last line), printed once on stderr
        if isinstance(inputs, (str, os.PathLike)):
            inputs = [inputs]
        items = list(inputs) if not isinstance(inputs, list) else inputs
        if not items:
            raise VkError("no input: give one or more vk-send output files")
        if all(isinstance(x, (str, os.PathLike)) for x in items):
            for p in items:
                if str(p) == "-":
                    self.paths.append(self._spool_stdin())
                    self.names.append("<stdin>")
                else:
                    path = Path(p)
                    if not path.exists():
                        raise VkError(f"{p}: no such file")
                    if path.is_dir():
                        raise VkError(f"{p}: is a directory, expected a vk-send output file")
                    self.paths.append(str(path))
                    self.names.append(str(p))
        elif all(isinstance(x, dict) for x in items):
            self.paths.append(self._spool_records(items))
            self.names.append("<records>")
        else:
            raise VkError("inputs must be file paths or record dicts")
        for i in range(len(self.paths)):
            self._cut_last_line(i)

    def _cut_last_line(self, i: int, block: int = 1 << 16) -> None:
        """A file whose last line was cut (a killed writer, a full disk) is read up to its last whole line: a
        copy without the fragment is read instead, with one warning naming the line."""
        path = self.paths[i]
        try:
            size = os.path.getsize(path)
            if size == 0:
                return
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) == b"\n":
                    return
                pos = size
                tail = b""
                while pos > 0 and b"\n" not in tail:
                    step = min(block, pos)
                    pos -= step
                    f.seek(pos)
                    tail = f.read(step) + tail
                cut = pos + tail.rfind(b"\n") + 1  # 0 when the file is one line
                fragment = tail[tail.rfind(b"\n") + 1:]
                if not fragment.strip():
                    return
                try:
                    orjson.loads(fragment)
                    return  # a whole record without its newline
                except orjson.JSONDecodeError:
                    pass
                f.seek(0)
                line = 1
                left = cut
                while left > 0:
                    chunk = f.read(min(1 << 20, left))
                    if not chunk:
                        break
                    line += chunk.count(b"\n")
                    left -= len(chunk)
                copy = os.path.join(self._tmpdir(), f"whole-lines-{i}.jsonl")
                f.seek(0)
                with open(copy, "wb") as out:
                    left = cut
                    while left > 0:
                        chunk = f.read(min(1 << 20, left))
                        if not chunk:
                            break
                        out.write(chunk)
                        left -= len(chunk)
        except OSError as e:
            raise VkError(f"{self.names[i]}: cannot read ({e.strerror})") from None
        self.paths[i] = copy
        self.warnings.append(f"{self.names[i]}:{line}: the last line is cut ({len(fragment)} bytes without a newline, "
                             f"not a whole record); read the {line - 1} whole lines before it")

    def _tmpdir(self) -> str:
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="vk-eval-")
        return self._tmp

    def _spool_stdin(self) -> str:
        path = os.path.join(self._tmpdir(), f"stdin-{len(self.paths)}.jsonl")
        with open(path, "wb") as f:
            shutil.copyfileobj(sys.stdin.buffer, f, 1 << 20)
        return path

    def _spool_records(self, recs: list[dict]) -> str:
        path = os.path.join(self._tmpdir(), f"records-{len(self.paths)}.jsonl")
        with open(path, "wb") as f:
            for r in recs:
                f.write(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY))
        return path

    def name_of(self, path: str) -> str:
        return self.names[self.paths.index(path)] if path in self.paths else path

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __del__(self):  # temporary files never outlive the evaluation
        self.close()


# the times of a response that must not run backwards (seconds since the run start, none negative), up to
# CLOCK_SLACK: kernel receive timestamps (CLOCK_REALTIME) are converted onto the run's monotonic clock, and
# a conversion may put them a little early
ORDERED_TIMES = (("t_sent", "t_first_token"), ("t_sent", "t_done"), ("t_first_token", "t_last_token"))
CLOCK_SLACK = 1e-3


def check_times(rec: dict, name: str, line: int) -> None:
    """What vk-eval needs of a response beyond the record validators: numeric event times, no negative time, no
    time before t_sent that must come after it."""
    ev = rec.get("events")
    if isinstance(ev, dict):
        for x in ev.get("t") or ():
            if not isinstance(x, (int, float)) or isinstance(x, bool):
                raise RecordError(name, line, "events.t", f"expected numbers (seconds), got {x!r}")
            if x < 0:
                raise RecordError(name, line, "events.t", f"negative time {x!r} (seconds since the run start)")
    for f in TIME_COLS:
        v = rec.get(f)
        if isinstance(v, (int, float)) and v < 0 and f not in ("t_intended", "t_dispatched"):
            raise RecordError(name, line, f, f"negative time {v!r} (seconds since the run start)")
    for a, b in ORDERED_TIMES:
        va, vb = rec.get(a), rec.get(b)
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and vb < va - CLOCK_SLACK:
            raise RecordError(name, line, b, f"{b} {vb!r} is before {a} {va!r}: the record's times run backwards")


def validate_files(inputs: Inputs) -> None:
    """Read every line with the record validators; raise the first RecordError (file, line, field)."""
    for path, name in zip(inputs.paths, inputs.names, strict=False):
        seen_any = False
        with open(path, "rb") as fh:
            for n, obj in iter_lines(name, fh):
                kind = obj.get("kind")
                if kind in ("session", "schedule", "scheduled_session"):
                    raise RecordError(name, n, "kind", f"got a '{kind}' record: vk-eval reads vk-send output "
                                                       "(run, response, run_end, server_metric records)")
                records.validate(obj, name, n, INPUT_KINDS)
                if kind == "response":
                    check_times(obj, name, n)
                seen_any = True
        if not seen_any:
            raise VkError(f"{name}: no records (is it vk-send output?)")


# The lean table (``load(..., lean=True)``, what evaluate, plot, compare and report use) keeps every top-level
# field but replaces the events struct (64 numbers per event-heavy record, the bulk of the input) by a few
# per-record figures computed while parsing; the event times are read later straight from the files
# (``event_source``). Parsing JSON twice is cheaper than storing and re-reading millions of list entries.
NTOK_OF = "length(replace(replace(coalesce({k}, ''), 'e', ''), 'u', ''))"
LEAN_EVENT_COLUMNS = {
    # token events (event kinds other than e and u carry tokens: c, r, t)
    "ev_ntok": NTOK_OF.format(k="events.kind"),
    "ev_n": "coalesce(length(events.kind), 0)",
    "ev_has_server_t": "events.server_t IS NOT NULL",
    "ev_tokens_null": "events.tokens IS NULL",
    # a response whose per-event token counts are not simply 1 for each token event (only those keep their
    # counts, fetched one by one): as many counts as token events summing to as many tokens
    "ev_sparse": "(events.tokens IS NOT NULL AND NOT coalesce(list_count(events.tokens) = {nt} AND "
                 "list_sum(events.tokens) = {nt}, false))",
    "ev_bad": "(events IS NOT NULL AND ((events.tokens IS NOT NULL AND len(events.tokens) != ev_n) "
              "OR (events.server_t IS NOT NULL AND len(events.server_t) != ev_n)))",
}
LEAN_SKIPPED = ("session_index", "worker", "http_status", "error", "finish_reason")
FILES_OPTIONS = ", format='newline_delimited'"


def _read_sql(inputs: Inputs, cols: dict[str, str], size: int | None, filename: bool = False) -> str:
    col_sql = "{" + ", ".join(f"{_sql_str(k)}: {_sql_str(v)}" for k, v in cols.items()) + "}"
    files = "[" + ", ".join(_sql_str(p) for p in inputs.paths) + "]"
    opt = f", maximum_object_size={size}" if size else ""
    return f"read_ndjson({files}, columns={col_sql}{FILES_OPTIONS}{', filename=true' if filename else ''}{opt})"


def _full_columns(extra_fields: Iterable[str]) -> dict[str, str]:
    cols = dict(RESPONSE_COLUMNS)
    for f in extra_fields:
        if f not in cols:
            cols[f] = "VARCHAR"
    return cols


def _lean_columns(extra_fields: Iterable[str]) -> dict[str, str]:
    # response fields vk-eval does not read are parsed only when --group-by names them
    extra_fields = list(extra_fields)
    cols = {k: v for k, v in RESPONSE_COLUMNS.items() if k not in LEAN_SKIPPED or k in extra_fields}
    for f in extra_fields:
        if f not in cols:
            cols[f] = "VARCHAR"
    return cols


def load(con: duckdb.DuckDBPyConnection, inputs: Inputs, extra_fields: Iterable[str] = (),
         validate: str = "auto", lean: bool = False, cache: bool = False) -> Cache | None:
    """Create the table ``raw`` (every line of every input, typed) in ``con``.

    ``validate``: ``auto`` (record by record for small inputs, SQL checks for large ones), ``full`` or ``fast``.
    ``lean``: without the events struct (see LEAN_EVENT_COLUMNS); the SQL views need the full table.
    ``cache`` (lean only): read the table from the inputs' cache when it is valid, else write it there; returns
    the Cache (``hit`` tells which), for the event times.
    """
    con.execute("SET enable_progress_bar = false")
    if cache and lean and inputs._tmp is None:
        c = Cache(inputs, _lean_columns(extra_fields), orjson.dumps(LEAN_EVENT_COLUMNS).decode())
        if c.hit:
            con.execute(f"CREATE OR REPLACE TABLE raw AS SELECT * FROM read_parquet({_sql_str(c.path('raw.parquet'))})")
            inputs.checked = True  # validated when the cache was written
            return c
        load(con, inputs, extra_fields, validate, lean)
        c.start()
        from vk.eval.outputs import writing

        with writing(c.dir, "cannot write the cache"):
            con.execute(f"COPY raw TO {_sql_str(c.path('raw.parquet'))} (FORMAT parquet)")
        return c
    total = sum(os.path.getsize(p) for p in inputs.paths)
    if validate == "full" or (validate == "auto" and total <= FULL_VALIDATION_BYTES):
        validate_files(inputs)
        checked = True
    else:
        checked = False
    inputs.checked = checked
    cols = _lean_columns(extra_fields) if lean else _full_columns(extra_fields)
    if lean:
        cols["events"] = "STRUCT(tokens BIGINT[], kind VARCHAR, server_t DOUBLE[])"
        nt = LEAN_EVENT_COLUMNS["ev_ntok"]
        derived = {k: v.format(nt=nt) for k, v in LEAN_EVENT_COLUMNS.items()}
        derived["ev_bad"] = derived["ev_bad"].replace("ev_n", derived["ev_n"])
        sel = ("* EXCLUDE (events), " + ", ".join(f"{v} AS {k}" for k, v in derived.items())
               + f", CASE WHEN {derived['ev_sparse']} THEN events.tokens END AS ev_tokens"
               + f", CASE WHEN {derived['ev_sparse']} THEN events.kind END AS ev_kind")
    else:
        sel = "*"
    # DuckDB's default maximum object size (16 MB) keeps the reader parallel; a larger one (records with very
    # long texts) is tried only when needed, as it reads with fewer threads
    for size in (None, 1 << 30):
        try:
            con.execute(f"CREATE OR REPLACE TABLE raw AS SELECT {sel} FROM {_read_sql(inputs, cols, size, True)}")
            inputs.object_size = size
            break
        except duckdb.Error as e:
            if size is None and "maximum_object_size" in str(e):
                continue
            if any(t in str(e).lower() for t in ("no space left", "could not write all bytes", "file too large")):
                raise  # the database file (--db) is full: vk.eval.outputs.writing names it
            if not checked:
                validate_files(inputs)  # raises the precise error when the input is at fault
            raise VkError(f"cannot read the input: {str(e).splitlines()[0]}") from None
    if not checked:
        _sql_checks(con, inputs, lean)


CACHE_VERSION = 1


class Cache:
    """``--cache``: the lean table (Parquet) and the token-event times (.npy) of the inputs, in a directory next
    to the first input (``FILE.vk-eval-cache``), valid while every input keeps its path, size and modification
    time and the table its columns. Only for files (not stdin or record lists)."""

    def __init__(self, inputs: Inputs, cols: dict[str, str], lean_sel: str):
        self.dir = inputs.paths[0] + ".vk-eval-cache"
        key = {"v": CACHE_VERSION, "columns": cols, "select": lean_sel, "inputs": []}
        for p in inputs.paths:
            st = os.stat(p)
            key["inputs"].append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
        self.key = key
        self.hit = False
        try:
            with open(os.path.join(self.dir, "key.json"), "rb") as f:
                self.hit = orjson.loads(f.read()) == orjson.loads(orjson.dumps(key))
        except (OSError, ValueError):
            self.hit = False

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def start(self) -> None:
        """Before writing: the old key goes first, so that a half-written cache is never taken as valid."""
        try:
            os.makedirs(self.dir, exist_ok=True)
            if os.path.exists(self.path("key.json")):
                os.remove(self.path("key.json"))
        except OSError as e:
            from vk.eval.outputs import writing

            with writing(self.dir, "cannot write the cache"):
                raise e from None

    def finish(self) -> None:
        with open(self.path("key.json"), "wb") as f:
            f.write(orjson.dumps(self.key))


def event_source(inputs: Inputs, server_t: bool = False) -> str:
    """The event times (``events.t``, with ``events.server_t`` when asked) and kinds of the response records
    of the inputs, in input order: the rows of ``raw WHERE kind = 'response'``, one for one."""
    ev = "STRUCT(t DOUBLE[], kind VARCHAR" + (", server_t DOUBLE[])" if server_t else ")")
    return (f"(SELECT events FROM {_read_sql(inputs, {'kind': 'VARCHAR', 'events': ev}, inputs.object_size)} "
            "WHERE kind = 'response')")


def _sql_checks(con: duckdb.DuckDBPyConnection, inputs: Inputs, lean: bool = False) -> None:
    versions = " ".join(f"WHEN {_sql_str(k)} THEN {records.VERSIONS[k]}" for k in INPUT_KINDS)
    statuses = ", ".join(_sql_str(s) for s in records.STATUSES)
    # the lean table checks the lengths of events.tokens and events.server_t against events.kind here, and
    # events.t against events.kind when the event times are read
    events_bad = "ev_bad" if lean else """(events IS NOT NULL AND (len(events.t) != length(events.kind)
                    OR (events.tokens IS NOT NULL AND len(events.tokens) != len(events.t))
                    OR (events.server_t IS NOT NULL AND len(events.server_t) != len(events.t))))"""
    bad = con.execute(
        f"""SELECT count(*) FROM raw WHERE kind IS NULL OR kind NOT IN ({', '.join(_sql_str(k) for k in INPUT_KINDS)})
            OR v IS NULL OR v < 1 OR v > (CASE kind {versions} END) OR run_id IS NULL
            OR (kind = 'response' AND (request_id IS NULL OR status IS NULL OR status NOT IN ({statuses})
                OR {events_bad} OR t_sent < 0 OR t_done < 0 OR t_first_token < 0 OR t_done < t_sent - {CLOCK_SLACK}
                OR t_first_token < t_sent - {CLOCK_SLACK} OR t_last_token < t_first_token - {CLOCK_SLACK}))"""
    ).fetchone()[0]
    if bad:
        validate_files(inputs)
        raise VkError(f"{bad} input line(s) are not valid vk-send records")
    n = con.execute("SELECT count(*) FROM raw").fetchone()[0]
    if n == 0:
        raise VkError(f"{', '.join(inputs.names)}: no records (is it vk-send output?)")


def run_rows(con: duckdb.DuckDBPyConnection, inputs: Inputs) -> list[dict]:
    """One dict per run (header fields, footer fields, file), in input order."""
    runs: dict[str, dict] = {}
    rows = con.execute(
        f"SELECT kind, filename, {', '.join(sorted(set(RUN_FIELDS) | set(RUN_END_FIELDS)))} FROM raw "
        "WHERE kind IN ('run', 'run_end')"
    ).fetchall()
    names = ["kind", "filename", *sorted(set(RUN_FIELDS) | set(RUN_END_FIELDS))]
    for row in rows:
        d = dict(zip(names, row, strict=False))
        rid = d["run_id"]
        r = runs.setdefault(rid, {"run_id": rid, "file": inputs.name_of(d["filename"])})
        if d["kind"] == "run":
            for f in RUN_FIELDS:
                v = d[f]
                r[f] = orjson.loads(v) if f in ("schedule", "argv", "server", "ray") and v is not None else v
            r["lagged_header"] = bool(d["lagged"])
        else:
            end = {}
            for f in RUN_END_FIELDS:
                if f != "run_id" and d[f] is not None:
                    end[f] = d[f] if f == "lagged" else orjson.loads(d[f])
            r["run_end"] = end
    # runs without a header (responses only)
    for rid, fn in con.execute(
        "SELECT run_id, any_value(filename) FROM raw WHERE kind = 'response' GROUP BY run_id ORDER BY min(rowid)"
    ).fetchall():
        runs.setdefault(rid, {"run_id": rid, "file": inputs.name_of(fn)})
    for r in runs.values():
        end = r.get("run_end") or {}
        lag = end.get("lag") if isinstance(end.get("lag"), dict) else {}
        r["lagged"] = bool(r.get("lagged_header") or end.get("lagged") or lag.get("lagged"))
    return list(runs.values())


def run_warnings(runs: list[dict]) -> list[str]:
    """What a reader of the figures must know about how each run was written: responses without a run header,
    a run without its footer (vk-send killed, or the file cut), a run that did not end complete."""
    out = []
    for r in runs:
        who = f"{r.get('file')}: run {r['run_id']}"
        if "api" not in r:
            out.append(f"{who}: responses without a run header (not vk-send's output as written?): no start time, "
                       "API or schedule is known; its runs cannot be placed in time")
        end = r.get("run_end")
        if end is None:
            out.append(f"{who}: no run_end footer: the run did not finish writing (vk-send killed, or the file cut); "
                       "the figures cover the responses written so far")
        elif end.get("ended") not in (None, "complete"):
            why = end.get("reason")
            out.append(f"{who}: the run ended {end.get('ended')}" + (f" ({why})" if why else "")
                       + "; the figures cover the requests it made")
    return out


def source_of(path: str) -> str:
    return source_name(path)
