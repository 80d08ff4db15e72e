"""vk-eval's engine: load the records into DuckDB, compute every metric, summarise per group."""

from __future__ import annotations

import math
import os
import re
from typing import Any

import duckdb
import numpy as np

from vk.errors import VkError
from vk.eval import load as L
from vk.eval import metrics as M
from vk.eval.slo import Goodput, parse_duration, parse_fluidity, parse_goodput, parse_slo

# per-request latency metrics summarised in every report, in display order, with their definitions
LATENCY_METRICS = {
    "ttft": "t_first_token - t_sent (first token of any kind)",
    "ttfc": "t_first_content - t_sent (first content token)",
    "tpot": "(t_last_token - t_first_token) / (output_tokens - 1)",
    "itl_chunk": "gap between consecutive token events, pooled",
    "itl_token": "chunk gap split evenly over its k tokens, pooled",
    "itl_token_zeros": "chunk gap then k-1 zero gaps, pooled",
    "e2e": "t_done - t_sent",
    "normalized_latency": "e2e / output_tokens",
    "max_stall": "largest gap between token events within a request",
    "ttft_from_intended": "t_first_token - t_intended",
    "ttfc_from_intended": "t_first_content - t_intended",
    "e2e_from_intended": "t_done - t_intended",
    "queue_delay": "t_sent - t_intended (client-side wait)",
    "dispatch_lag": "t_dispatched - t_intended",
}
POOLED = ("itl_chunk", "itl_token", "itl_token_zeros")
COUNT_METRICS = ("input_tokens", "output_tokens")
STATUSES = ("ok", "error", "timeout", "cancelled", "skipped")
OUTPUT_SOURCES = ("usage", "events.tokens", "token events")  # where a request's output token count comes from
DERIVED_GROUP_FIELDS = ("run", "input_bucket", "output_bucket")
MAX_GROUPS = 1000

VIEWS_SQL = """
CREATE OR REPLACE VIEW requests AS
SELECT *,
  t_first_token - t_sent AS ttft,
  t_first_content - t_sent AS ttfc,
  t_done - t_sent AS e2e,
  t_first_token - t_intended AS ttft_from_intended,
  t_done - t_intended AS e2e_from_intended,
  t_dispatched - t_intended AS dispatch_lag,
  t_sent - t_intended AS queue_delay,
  coalesce(usage.completion_tokens,
           CASE WHEN events.tokens IS NOT NULL AND list_count(events.tokens) = len(events.tokens)
                THEN list_sum(events.tokens) END,
           length(regexp_replace(coalesce(events.kind, ''), '[^crt]', '', 'g'))) AS output_tokens,
  usage.prompt_tokens AS prompt_tokens,
  usage.cached_tokens AS cached_tokens,
  CASE WHEN coalesce(usage.completion_tokens, 0) > 1
       THEN (t_last_token - t_first_token) / (usage.completion_tokens - 1) END AS tpot
FROM responses;
CREATE OR REPLACE VIEW events AS
SELECT row AS request_row, run_id, session_id, request_id,
  generate_subscripts(events.t, 1) AS i,
  unnest(events.t) AS t,
  unnest(events.tokens) AS tokens,
  unnest(events.server_t) AS server_t,
  unnest(string_split(events.kind, '')) AS kind
FROM responses WHERE events IS NOT NULL;
CREATE OR REPLACE VIEW sessions AS
SELECT run_id, session_id, count(*) AS turns,
  max(t_done) - min(coalesce(t_intended, t_sent)) AS duration,
  sum(CASE WHEN status = 'ok' THEN 1 ELSE 0 END) AS ok,
  min(t_sent) AS t_first_sent, max(t_done) AS t_last_done
FROM responses GROUP BY run_id, session_id;
CREATE OR REPLACE VIEW runs AS
SELECT h.run_id, h.filename AS file, h.start_epoch, h.api, h.model, h.endpoint, h.vk_version, h.host,
  h.lagged OR coalesce(e.lagged, false) AS lagged, h.schedule, h.argv, e.totals, e.lag,
  coalesce(e.reason, e.ended, e.end_reason, e.stop_reason) AS end_reason,
  (SELECT count(*) FROM responses r WHERE r.run_id = h.run_id) AS responses
FROM (SELECT * FROM raw WHERE kind = 'run') h LEFT JOIN (SELECT * FROM raw WHERE kind = 'run_end') e
  ON h.run_id = e.run_id;
"""


_T0 = [0.0, 0.0]


PROGRESS: dict[str, Any] = {"bar": None}


def progress(enabled: bool) -> None:
    """Show a progress bar over vk-eval's stages on stderr (the CLI: when stderr is a TTY or --progress)."""
    if PROGRESS["bar"] is not None:
        PROGRESS["bar"].close()
        PROGRESS["bar"] = None
    if enabled:
        from tqdm import tqdm

        PROGRESS["bar"] = tqdm(total=7, desc="vk-eval", unit="stage", leave=False, file=__import__("sys").stderr)


def tick(label: str) -> None:
    """Stage timings on stderr when VK_EVAL_TIMING is set (for the bench and for profiling); progress bar."""
    bar = PROGRESS["bar"]
    if bar is not None and label != "start" and not label.startswith(" "):
        bar.set_postfix_str(label, refresh=False)
        bar.update(1)
    if os.environ.get("VK_EVAL_TIMING"):
        import sys
        import time

        now = time.perf_counter()
        cpu = time.process_time()
        if label != "start":
            try:
                import resource

                with open("/proc/self/statm") as f:
                    rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                mem = f" {rss:6.0f} MiB RSS (peak {peak:.0f})"
            except (OSError, ImportError, ValueError):
                mem = ""
            print(f"vk-eval timing: {label:<24} {now - _T0[0]:7.3f} s wall {cpu - _T0[1]:7.3f} s cpu{mem}",
                  file=sys.stderr)
        _T0[:] = [now, cpu]


def _f(x) -> np.ndarray:
    """A DuckDB numpy column as float64 with NaN for null."""
    if isinstance(x, np.ma.MaskedArray):
        return np.ma.filled(x.astype(np.float64), np.nan)
    return np.asarray(x, dtype=np.float64)


def _obj(x) -> np.ndarray:
    if isinstance(x, np.ma.MaskedArray):
        out = np.asarray(x.data, dtype=object)
        out[np.ma.getmaskarray(x)] = None
        return out
    return np.asarray(x, dtype=object)


def _bucket(v: np.ndarray) -> np.ndarray:
    out = np.empty(len(v), dtype=object)
    for i, x in enumerate(v):
        if x != x:
            out[i] = "unknown"
        else:
            x = int(x)
            if x <= 0:
                out[i] = "0"
            else:
                lo = 1 << (x.bit_length() - 1)
                out[i] = f"{lo}-{2 * lo - 1}"
    return out


class Data:
    """Everything vk-eval knows about the inputs: the DuckDB connection and numpy arrays per request."""

    def __init__(self, inputs: Any, *, extra_fields=(), db: str | None = None, validate: str = "auto",
                 opts: Options | None = None, cache: bool = False):
        # the options that need the event times (fluidity deadlines, steady window): they are computed here,
        # before the times are turned into gaps in place
        self.opts = opts if opts is not None else Options()
        self.inputs = L.Inputs(inputs)
        if db:
            if os.path.exists(db):
                os.remove(db)
            self.con = duckdb.connect(db)
        else:
            self.con = duckdb.connect()
        # without --db, the lean table: no events struct, event times read from the files when needed
        self.lean = not db
        tick("start")
        self.cache = L.load(self.con, self.inputs, extra_fields, validate, lean=self.lean, cache=cache)
        tick("load (DuckDB)")
        run_cols = ("kind, start_epoch, api, model, endpoint, vk_version, host, lagged, schedule, argv, totals, lag, "
                    "reason, ended, end_reason, stop_reason")
        if self.lean:
            ev_cols = ", ".join([*L.LEAN_EVENT_COLUMNS, "ev_tokens", "ev_kind"])
            self.con.execute(f"CREATE OR REPLACE VIEW responses AS SELECT rowid AS row, * EXCLUDE ({run_cols}, "
                             f"{ev_cols}) FROM raw WHERE kind = 'response'")
            # the responses with their per-record event figures (see vk.eval.load.LEAN_EVENT_COLUMNS)
            self.con.execute("CREATE OR REPLACE TEMP VIEW responses_ev AS SELECT rowid AS row, * EXCLUDE "
                             f"({run_cols}) FROM raw WHERE kind = 'response'")
        else:
            self.con.execute(f"CREATE OR REPLACE VIEW responses AS SELECT rowid AS row, * EXCLUDE ({run_cols}) "
                             "FROM raw WHERE kind = 'response'")
            self.con.execute(VIEWS_SQL)
            nt = L.LEAN_EVENT_COLUMNS["ev_ntok"]
            derived = {k: v.format(nt=nt).replace("ev_n)", L.LEAN_EVENT_COLUMNS["ev_n"] + ")")
                       for k, v in L.LEAN_EVENT_COLUMNS.items()}
            self.con.execute(
                "CREATE OR REPLACE TEMP VIEW responses_ev AS SELECT *, "
                + ", ".join(f"{v} AS {k}" for k, v in derived.items())
                + f", CASE WHEN {derived['ev_sparse']} THEN events.tokens END AS ev_tokens"
                + f", CASE WHEN {derived['ev_sparse']} THEN events.kind END AS ev_kind FROM responses"
            )
        self.runs = L.run_rows(self.con, self.inputs)
        self.n = self.con.execute("SELECT count(*) FROM responses").fetchone()[0]
        if self.n == 0:
            raise VkError(f"{', '.join(self.inputs.names)}: no response records (is it vk-send output?)")
        self._arrays()

    def _events_sql(self, server_t: bool = False) -> str:
        """A subquery with the column ``events`` (t, kind and, when asked, server_t) of the responses, in
        order."""
        if self.lean:
            return L.event_source(self.inputs, server_t)
        return "(SELECT events FROM responses)"

    # ----------------------------------------------------------------------------------------------------------
    def _arrays(self) -> None:
        con = self.con
        run_list = "[" + ", ".join(L._sql_str(r["run_id"]) for r in self.runs) + "]::VARCHAR[]"
        status_list = "[" + ", ".join(L._sql_str(x) for x in STATUSES) + "]::VARCHAR[]"
        cols = con.execute(
            f"SELECT list_position({run_list}, run_id) - 1 AS run_code, "
            f"list_position({status_list}, status) - 1 AS status_code, coalesce(warmup, false) AS warmup, "
            + ", ".join(L.TIME_COLS)
            + ", usage.prompt_tokens AS prompt_tokens, usage.completion_tokens AS completion_tokens, "
            "usage.cached_tokens AS cached_tokens, usage.reasoning_tokens AS reasoning_tokens, "
            "target_input_tokens, target_output_tokens, coalesce(prefix_tokens, target_prefix_tokens) AS prefix, "
            "ev_n AS n_events, ev_has_server_t AS has_server_t, ev_tokens_null AS tokens_null, row, "
            "ev_ntok AS n_tok, ev_sparse AS needs_sparse "
            "FROM responses_ev"
        ).fetchnumpy()
        self.a: dict[str, np.ndarray] = {}
        a = self.a
        self.run_index = {r["run_id"]: i for i, r in enumerate(self.runs)}
        a["run"] = np.asarray(cols["run_code"], dtype=np.int64)
        a["status_code"] = np.asarray(cols["status_code"], dtype=np.int64)  # index in STATUSES
        a["status"] = np.array(STATUSES, dtype=object)[a["status_code"]]
        a["ok"] = a["status_code"] == 0
        a["warmup"] = np.asarray(cols["warmup"], dtype=bool)
        for f in L.TIME_COLS:
            a[f] = _f(cols[f])
        for f in ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens",
                  "target_input_tokens", "target_output_tokens", "prefix"):
            a[f] = _f(cols[f])
        n_events = np.asarray(cols["n_events"], dtype=np.int64)
        has_server_t = bool(np.any(np.asarray(cols["has_server_t"], dtype=bool)))
        cols_tokens_null = np.asarray(cols["tokens_null"], dtype=bool)
        rows = np.asarray(cols["row"], dtype=np.int64)
        n_tok = np.asarray(cols["n_tok"], dtype=np.int64)
        needs_sparse = bool(np.any(np.ma.filled(cols["needs_sparse"], False)))
        if len(rows) > 1 and not (np.diff(rows) > 0).all():  # insertion order is what aligns the queries
            raise VkError("internal error: DuckDB returned the responses out of order")
        del cols
        tick("  scalars")
        hit = self.cache is not None and self.cache.hit
        if hit:  # the token-event times as the cache keeps them
            t = np.load(self.cache.path("t.npy"))
            st = np.load(self.cache.path("server_t.npy")) if has_server_t else None
            kind_bytes = None
        else:
            t, st, kind_bytes = self._event_times(n_tok, has_server_t)
        tick("  event times")
        # per-event token counts, fetched sparsely: only the token events whose count is not 1, with their rank
        # among the request's token events. Rows whose counts are all 1, one per token event, are skipped
        # without unnesting (assumes the usual: empty and usage-only events carry no count).
        sp = None
        sparse = {"row": []}
        if needs_sparse:
            sparse = con.execute(
                "SELECT row, length(regexp_replace(substr(ks, 1, i), '[^crt]', '', 'g')) - 1 AS rank, k FROM "
                "(SELECT row, ev_kind AS ks, generate_subscripts(ev_tokens, 1) AS i, "
                "unnest(ev_tokens) AS k FROM responses_ev WHERE ev_sparse) "
                "WHERE k IS DISTINCT FROM 1 AND substr(ks, i, 1) IN ('c', 'r', 't')"
            ).fetchnumpy()
        if len(sparse["row"]):
            ordinal = np.searchsorted(rows, np.asarray(sparse["row"], dtype=np.int64))
            sp = (ordinal, np.asarray(sparse["rank"], dtype=np.int64), _f(sparse["k"]))
        flat = M.Flat(n_events if kind_bytes is not None else n_tok, t, kind_bytes, None, st)
        del t, st
        if flat.kind is not None and len(flat.t) != len(flat.kind):
            raise VkError("events.t and events.kind disagree in length")
        tick("fetch arrays")
        self.te = te = M.token_events(flat, n_tok, cols_tokens_null, sp)
        del flat
        if self.cache is not None and not hit:
            np.save(self.cache.path("t.npy"), te.t)
            if te.server_t is not None:
                np.save(self.cache.path("server_t.npy"), te.server_t)
            self.cache.finish()
        tick("token events")
        # everything that needs the event times, then the times become the gaps (in place)
        self.fl = M.fluidity(self.n, te, a["t_sent"], *self.opts.fluidity)
        tick("fluidity")
        self.windows = _windows(self, self.opts.warmup, self.opts.cooldown)
        self.pe_event_tokens = (te.n.astype(np.float64) if te.k is None
                                else M.segment_sums(te.k, te.starts, te.n).astype(np.float64))
        a["tokens_in_window"] = self._tokens_in_window(*self.windows[:2])
        if te.server_t is not None:  # timestamp error per token event against the server's ground truth
            te.server_t = np.subtract(te.t, te.server_t, out=te.server_t)
            te.err = te.server_t
            te.server_t = None
        pe = M.per_request_events(self.n, te, inplace=True)
        tick("gaps, stalls")
        self.pe = pe
        # output tokens: usage, else the sum of known per-event counts, else the number of token events
        out = a["completion_tokens"].copy()
        src = np.zeros(self.n, dtype=np.int8)  # index in OUTPUT_SOURCES
        no_usage = np.isnan(out)
        use_ev = no_usage & pe["all_tokens_known"]
        out[use_ev] = pe["event_tokens"][use_ev]
        src[use_ev] = 1
        use_cnt = no_usage & ~pe["all_tokens_known"]
        out[use_cnt] = pe["n_token_events"][use_cnt]
        src[use_cnt] = 2
        a["output_tokens"] = out
        a["output_tokens_source_code"] = src
        a["output_tokens_source"] = np.array(OUTPUT_SOURCES, dtype=object)[src]
        a["input_tokens"] = np.where(np.isnan(a["prompt_tokens"]), a["target_input_tokens"], a["prompt_tokens"])
        a["ttft"] = a["t_first_token"] - a["t_sent"]
        a["ttfc"] = a["t_first_content"] - a["t_sent"]
        a["e2e"] = a["t_done"] - a["t_sent"]
        with np.errstate(invalid="ignore", divide="ignore"):
            a["tpot"] = np.where(out > 1, (a["t_last_token"] - a["t_first_token"]) / np.where(out > 1, out - 1, 1),
                                 np.nan)
            a["normalized_latency"] = np.where(out > 0, a["e2e"] / np.where(out > 0, out, 1), np.nan)
        a["max_stall"] = pe["max_stall"]
        a["ttft_from_intended"] = a["t_first_token"] - a["t_intended"]
        a["ttfc_from_intended"] = a["t_first_content"] - a["t_intended"]
        a["e2e_from_intended"] = a["t_done"] - a["t_intended"]
        a["queue_delay"] = a["t_sent"] - a["t_intended"]
        a["dispatch_lag"] = a["t_dispatched"] - a["t_intended"]
        a["server_t_err"] = None

    def _tokens_in_window(self, w0: np.ndarray, w1: np.ndarray, block: int = 1 << 16) -> np.ndarray:
        """Per request: the tokens of its token events that arrived inside its run's steady window. Requests
        whose token events all lie inside (or all outside) are settled by their first and last arrival."""
        te = self.te
        run = self.a["run"]
        has = te.n > 0
        idx = te.starts[has]
        lo = np.full(self.n, np.nan)
        hi = np.full(self.n, np.nan)
        if len(idx):  # NaN (a null time) propagates: such requests are counted event by event
            lo[has] = np.minimum.reduceat(te.t, idx)
            hi[has] = np.maximum.reduceat(te.t, idx)
        ntok = self.pe_event_tokens
        inside = has & (lo >= w0[run]) & (hi <= w1[run])
        outside = ~has | (hi < w0[run]) | (lo > w1[run])
        out = np.where(inside, ntok, 0.0)
        mixed = np.flatnonzero(~inside & ~outside)
        for b in range(0, len(mixed), block):  # the rest event by event, a block of requests at a time
            req = mixed[b:b + block]
            ev = np.repeat(te.starts[req], te.n[req]) + (np.arange(int(te.n[req].sum()))
                                                          - np.repeat(np.cumsum(te.n[req]) - te.n[req], te.n[req]))
            t = te.t[ev]
            r = np.repeat(run[req], te.n[req])
            w = (t >= w0[r]) & (t <= w1[r])
            if te.k is not None:
                w = w * te.k[ev]
            out[req] = M.segment_sums(w, np.r_[0, np.cumsum(te.n[req])[:-1]], te.n[req])
        return out

    USE_SQL_TOKEN_FILTER = True

    def _event_times(self, n_tok: np.ndarray, has_server_t: bool):
        """Times (and server times) of the events: only the token events when DuckDB can select them (a slice
        when a request's token events are contiguous, the usual case, else a filter by event kind), else every
        event with the event kinds, for numpy to select. Returns (t, server_t or None, kind bytes or None).

        No ORDER BY: DuckDB keeps insertion order (preserve_insertion_order, on by default), the order of the
        per-request query in _arrays; sorting millions of list rows would double the cost."""
        con = self.con
        # a record whose events.t and events.kind differ in length yields one NaN (the lean table has not
        # checked that yet): NaN times send the input through the record validators, which name the line
        if self.USE_SQL_TOKEN_FILTER:
            def pick(col: str) -> str:
                # a: the first token event; the token events are contiguous when the nt events from a on are
                # all token events (no e or u among them)
                return (f"SELECT unnest(CASE WHEN len(events.t) IS DISTINCT FROM length(ks) THEN ['nan'::DOUBLE] "
                        "WHEN NOT (contains(mid, 'e') OR contains(mid, 'u')) THEN list_slice(x, a, a + nt - 1) "
                        "ELSE list_filter(x, lambda v, i: substr(ks, i, 1) IN ('c', 'r', 't')) END) AS x FROM "
                        f"(SELECT events, {col} AS x, ks, a, nt, substr(ks, a, nt) AS mid FROM "
                        "(SELECT events, ks, length(ks) - length(ltrim(ks, 'eu')) + 1 AS a, "
                        "length(replace(replace(ks, 'e', ''), 'u', '')) AS nt FROM "
                        f"(SELECT events, coalesce(events.kind, '') AS ks FROM {self._events_sql(col != 'events.t')}) "
                        "WHERE events IS NOT NULL))")

            try:
                t = self._checked(_f(con.execute(pick("events.t")).fetchnumpy()["x"]))
                st = None
                if has_server_t:
                    st = _f(con.execute(pick("coalesce(events.server_t, list_resize([]::DOUBLE[], len(events.t)))"))
                            .fetchnumpy()["x"])
                if len(t) == int(n_tok.sum()):
                    return t, st, None
            except duckdb.Error:  # a DuckDB without lambda v, i: ... (before 1.3)
                pass
        src = self._events_sql(has_server_t)
        rows = con.execute(f"SELECT coalesce(events.kind, '') AS k, len(events.t) IS DISTINCT FROM length(k) AS bad "
                           f"FROM {src} WHERE events IS NOT NULL").fetchnumpy()
        if np.asarray(rows["bad"], dtype=bool).any():
            self._checked(np.array([np.nan]))
        kinds = _obj(rows["k"])
        kind_bytes = np.frombuffer("".join(kinds.tolist()).encode("ascii", "replace"), dtype=np.uint8)
        t = _f(con.execute(f"SELECT unnest(events.t) AS t FROM {src}").fetchnumpy()["t"])
        st = None
        if has_server_t:
            st = _f(con.execute(f"SELECT unnest(coalesce(events.server_t, list_resize([]::DOUBLE[], len(events.t)))) "
                                f"AS st FROM {src}").fetchnumpy()["st"])
        return t, st, kind_bytes

    def _checked(self, t: np.ndarray) -> np.ndarray:
        """``t`` after the record validators when it holds NaN (a null time, or a record whose events.t and
        events.kind differ in length): they raise the error naming the file, line and field."""
        if not self.inputs.checked and np.isnan(t.sum()) and np.isnan(t).any():
            L.validate_files(self.inputs)
            self.inputs.checked = True
        return t

    def sessions(self) -> dict[str, np.ndarray]:
        """Per request: session code, turn number (1-based, by intended time), observed think time."""
        if hasattr(self, "_sess"):
            return self._sess
        multi = self.con.execute(
            "SELECT count(*) FROM (SELECT 1 FROM responses GROUP BY run_id, session_id HAVING count(*) > 1)"
        ).fetchone()[0]
        if not multi:  # one request per session: turn 1 everywhere, no think time
            self._sess = {"code": np.arange(self.n, dtype=np.int64), "turn": np.ones(self.n, np.int64),
                          "think": np.full(self.n, np.nan), "single": True}
            return self._sess
        r = self.con.execute(
            """SELECT dense_rank() OVER (ORDER BY run_id, session_id) - 1 AS code,
                 row_number() OVER w AS turn,
                 coalesce(t_intended, t_sent) - lag(t_done) OVER w AS think
               FROM responses WINDOW w AS (PARTITION BY run_id, session_id
                 ORDER BY coalesce(t_intended, t_sent), row) ORDER BY row"""
        ).fetchnumpy()
        self._sess = {"code": np.asarray(r["code"], dtype=np.int64), "turn": np.asarray(r["turn"], np.int64),
                      "think": _f(r["think"])}
        return self._sess

    def group_keys(self, fields: list[str]) -> np.ndarray:
        """One string key per request for --group-by fields (joined with ', ')."""
        parts = []
        for f in fields:
            if f == "run":
                parts.append(np.array([self.runs[i]["run_id"] for i in range(len(self.runs))],
                                      dtype=object)[self.a["run"]])
            elif f == "input_bucket":
                parts.append(_bucket(self.a["input_tokens"]))
            elif f == "output_bucket":
                parts.append(_bucket(self.a["output_tokens"]))
            elif f in self.a and self.a[f] is not None and self.a[f].dtype == object:
                parts.append(np.array(["(none)" if x is None else str(x) for x in self.a[f]], dtype=object))
            else:
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", f):
                    raise VkError(f"--group-by: {f!r} is not a field name")
                cols = [c[0] for c in self.con.execute("DESCRIBE responses").fetchall()]
                if f not in cols:
                    raise VkError(f"--group-by: no field {f!r} in the response records")
                v = self.con.execute(f'SELECT CAST("{f}" AS VARCHAR) FROM responses ORDER BY row').fetchnumpy()
                col = _obj(list(v.values())[0])
                if all(x is None for x in col):
                    raise VkError(f"--group-by: no field {f!r} in the response records")
                parts.append(np.array(["(none)" if x is None else str(x) for x in col], dtype=object))
        if len(parts) == 1:
            return parts[0]
        return np.array([", ".join(t) for t in zip(*parts, strict=False)], dtype=object)


# --------------------------------------------------------------------------------------------------------------
# summaries


def _windows(d: Data, warmup: float | None, cooldown: float | None) -> tuple[np.ndarray, np.ndarray, str]:
    """Per run: the steady-state window [w0, w1] (run-relative seconds) and how it was chosen."""
    nr = len(d.runs)
    a = d.a
    w0 = np.zeros(nr)
    w1 = np.full(nr, np.inf)
    how = "whole run"
    for r in range(nr):
        m = a["run"] == r
        if not m.any():
            continue
        done = a["t_done"][m]
        end = np.nanmax(done) if np.isfinite(done).any() else 0.0
        start = 0.0
        if warmup is not None:
            start = warmup
            how = "--warmup/--cooldown"
        elif (m & a["warmup"]).any():
            # when the warm-up traffic is over, or when the measured traffic begins if that is earlier (long
            # multi-turn warm-up sessions must not shrink the window to the run's tail)
            wd = a["t_done"][m & a["warmup"]]
            start = float(np.nanmax(wd)) if np.isfinite(wd).any() else 0.0
            ms = a["t_sent"][m & ~a["warmup"]]
            if np.isfinite(ms).any():
                start = min(start, float(np.nanmin(ms)))
            how = "after the warm-up requests"
        w0[r] = start
        w1[r] = end - (cooldown or 0.0)
        if cooldown is not None:
            how = "--warmup/--cooldown"
    return w0, w1, how


class Options:
    def __init__(self, percentiles=None, slo=None, goodput=None, warmup=None, cooldown=None, group_by=None,
                 fluidity=None, timeseries_bins=120):
        self.percentiles = M.parse_percentiles(percentiles)
        self.slo = parse_slo(slo) if isinstance(slo, (str, type(None))) else slo
        self.goodput: Goodput | None = parse_goodput(goodput) if isinstance(goodput, (str, type(None))) else goodput
        self.warmup = parse_duration(warmup, "--warmup") if warmup is not None else None
        self.cooldown = parse_duration(cooldown, "--cooldown") if cooldown is not None else None
        if isinstance(group_by, str):
            group_by = [g.strip() for g in group_by.split(",") if g.strip()]
        self.group_by = list(group_by or [])
        self.fluidity = parse_fluidity(fluidity)
        self.timeseries_bins = timeseries_bins

    def to_dict(self) -> dict:
        return {
            "percentiles": self.percentiles,
            "slo": [c.spec for c in self.slo],
            "goodput": self.goodput.spec if self.goodput else None,
            "warmup": self.warmup,
            "cooldown": self.cooldown,
            "group_by": self.group_by,
            "fluidity": {"prefill_deadline": self.fluidity[0], "decode_deadline": self.fluidity[1]},
        }


def summarize(d: Data, opts: Options, gmask: np.ndarray, w0: np.ndarray, w1: np.ndarray,
              window_how: str, fl: tuple[np.ndarray, np.ndarray, np.ndarray], last: bool = False) -> dict:
    """The summary of the requests in ``gmask``. ``last``: no later summary reads ``d`` (its pooled gaps may
    be reordered)."""
    a = d.a
    P = opts.percentiles
    run = a["run"]
    steady_given = opts.warmup is not None or opts.cooldown is not None
    in_window = (a["t_sent"] >= w0[run]) & (a["t_sent"] <= w1[run]) if steady_given else np.ones(d.n, bool)
    measured = gmask & ~a["warmup"] & in_window
    okm = measured & a["ok"]
    out: dict[str, Any] = {}

    # counts
    counts = {"requests": int(gmask.sum()), "measured": int(measured.sum())}
    for s in STATUSES:
        counts[s] = int((measured & (a["status_code"] == STATUSES.index(s))).sum())
    counts["warmup_excluded"] = int((gmask & a["warmup"]).sum())
    counts["outside_window"] = int((gmask & ~a["warmup"] & ~in_window).sum())
    counts["failed"] = counts["measured"] - counts["ok"]
    counts["error_rate"] = counts["failed"] / counts["measured"] if counts["measured"] else None
    nsrc = np.bincount(a["output_tokens_source_code"][okm], minlength=len(OUTPUT_SOURCES))
    counts["output_tokens_source"] = {k: int(nsrc[i]) for i, k in enumerate(OUTPUT_SOURCES) if nsrc[i]}
    out["counts"] = counts

    # latencies
    lat: dict[str, Any] = {}
    gm = M.gap_mask(d.pe, okm)
    gaps = d.pe["gaps"] if gm is None else M.take(d.pe["gaps"], gm)
    gk = d.pe["gap_k"]
    if gk is not None and gm is not None:
        gk = M.take(gk, gm)
    # what needs the gaps in request order first: the gaps are then sorted in place when they are a copy, or
    # when nothing reads them afterwards
    itl_token = None if gk is None or (gk == 1).all() else M.stats(np.repeat(gaps / gk, gk), P, pooled=True)
    zeros = int((0 if gk is None else (gk[np.isfinite(gaps)] - 1).sum()) + (d.pe["first_k"][okm] - 1).clip(0).sum())
    for name in LATENCY_METRICS:
        if name == "itl_chunk":
            s = M.stats(gaps, P, pooled=True, inplace=gm is not None or last)
        elif name == "itl_token":
            s = lat["itl_chunk"] if itl_token is None else itl_token
        elif name == "itl_token_zeros":
            s = lat["itl_chunk"] if zeros == 0 else M.stats(gaps, P, weights_zero=zeros, pooled=True)
        elif name in ("queue_delay", "dispatch_lag"):
            s = M.stats(a[name][measured], P)
        elif name in ("ttfc", "ttfc_from_intended") and np.array_equal(a[name][okm], a["ttft" + name[4:]][okm],
                                                                        equal_nan=True):
            s = lat["ttft" + name[4:]]  # no reasoning or tool calls before the content: the same sample
        else:
            s = M.stats(a[name][okm], P)
        lat[name] = s
    out["latency"] = lat
    tick("  latency stats")
    out["tokens"] = {k: M.stats(a[k][okm], P) for k in COUNT_METRICS}

    # throughput: whole run (first request sent -> last response done, per run, summed) and steady window
    runs_in = np.unique(run[gmask])
    dur = 0.0
    sdur = 0.0
    for r in runs_in:
        m = gmask & (run == r)
        s0 = np.nanmin(a["t_sent"][m]) if np.isfinite(a["t_sent"][m]).any() else np.nan
        s1 = np.nanmax(a["t_done"][m]) if np.isfinite(a["t_done"][m]).any() else np.nan
        if np.isfinite(s0) and np.isfinite(s1):
            dur += max(0.0, s1 - s0)
            lo = max(w0[r], s0)
            hi = min(w1[r], s1)
            sdur += max(0.0, hi - lo)
    okg = gmask & a["ok"]
    tin = float(np.nansum(a["input_tokens"][okg]))
    tout = float(np.nansum(a["output_tokens"][okg]))

    def rate(x, t):
        return x / t if t > 0 else None

    whole = {"duration": dur, "requests": int(okg.sum()), "requests_per_s": rate(okg.sum(), dur),
             "input_tokens_per_s": rate(tin, dur), "output_tokens_per_s": rate(tout, dur),
             "total_tokens_per_s": rate(tin + tout, dur)}
    # steady: completions, prefills and token arrivals inside the window (tokens counted per request by Data)
    tok_in_win = float(a["tokens_in_window"][okg].sum())
    ev_total = float(d.pe["event_tokens"][okg].sum())
    done_in = okg & (a["t_done"] >= w0[run]) & (a["t_done"] <= w1[run])
    pre_in = okg & (a["t_first_token"] >= w0[run]) & (a["t_first_token"] <= w1[run])
    sin = float(np.nansum(a["input_tokens"][pre_in]))
    # scale event-counted tokens to usage counts when events under-count (no per-chunk usage)
    if ev_total > 0 and tout > 0:
        tok_in_win *= tout / ev_total
    steady = {"window": window_how, "duration": sdur, "requests": int(done_in.sum()),
              "requests_per_s": rate(done_in.sum(), sdur), "input_tokens_per_s": rate(sin, sdur),
              "output_tokens_per_s": rate(tok_in_win, sdur), "total_tokens_per_s": rate(sin + tok_in_win, sdur),
              "windows": {d.runs[r]["run_id"]: [float(w0[r]), float(w1[r]) if np.isfinite(w1[r]) else None]
                          for r in runs_in}}
    out["throughput"] = {"whole": whole, "steady": steady}
    tick("  throughput")

    # concurrency (requests in flight between t_sent and t_done)
    busy = gmask & np.isfinite(a["t_sent"]) & np.isfinite(a["t_done"])
    mx = 0
    for r in runs_in:
        m = busy & (run == r)
        if m.any():
            # the most in flight is reached as a request enters: requests sent so far (ties included) minus
            # those done by then (at equal times, leave before entering)
            st = np.sort(a["t_sent"][m])
            en = np.sort(a["t_done"][m])
            mx = max(mx, int((np.searchsorted(st, st, side="right") - np.searchsorted(en, st, side="right")).max()))
    out["concurrency"] = {"mean": rate(float(np.sum(a["t_done"][busy] - a["t_sent"][busy])), dur), "max": mx}

    tick("  concurrency")
    out["sessions"] = _sessions(d, gmask & ~a["warmup"], P)
    tick("  sessions")
    out["accuracy"] = _accuracy(d, gmask, measured, okm, P)
    tick("  accuracy")
    out["caching"] = _caching(d, okm)
    fi, missed, total = fl
    fsel = okm & np.isfinite(fi)
    tot = float(total[fsel].sum())
    out["fluidity"] = {
        "prefill_deadline": opts.fluidity[0], "decode_deadline": opts.fluidity[1],
        "index": M.stats(fi[fsel], P),
        "service_index": 1.0 - float(missed[fsel].sum()) / tot if tot else None,
        "share_ge_0.9": float((fi[fsel] >= 0.9).mean()) if fsel.any() else None,
    }
    if opts.goodput is not None:
        # over the steady window when there is one (--warmup/--cooldown or warm-up marks), else the whole run
        out["goodput"] = _goodput(d, opts.goodput, measured, sdur if window_how != "whole run" else dur)
    return out


def _sessions(d: Data, gmask: np.ndarray, P) -> dict:
    s = d.sessions()
    a = d.a
    codes = s["code"][gmask]
    if len(codes) == 0:
        return {"sessions": 0}
    t0 = np.where(np.isnan(a["t_intended"]), a["t_sent"], a["t_intended"])[gmask]
    t1 = a["t_done"][gmask]
    if s.get("single"):  # one request per session
        nsess = len(codes)
        turns = np.ones(nsess)
        with np.errstate(invalid="ignore"):
            durs = np.where(np.isfinite(t0) & np.isfinite(t1), t1 - t0, np.nan)
    else:
        uniq, inv = np.unique(codes, return_inverse=True)
        nsess = len(uniq)
        turns = np.bincount(inv).astype(float)
        smin = np.full(len(uniq), np.inf)
        smax = np.full(len(uniq), -np.inf)
        np.minimum.at(smin, inv, np.where(np.isnan(t0), np.inf, t0))
        np.maximum.at(smax, inv, np.where(np.isnan(t1), -np.inf, t1))
        durs = np.where(np.isfinite(smin) & np.isfinite(smax), smax - smin, np.nan)
    out = {"sessions": int(nsess), "turns": M.stats(turns, P), "duration": M.stats(durs, P)}
    think = s["think"][gmask]
    out["think_time"] = M.stats(think[np.isfinite(think)], P)
    turn = s["turn"][gmask]
    okm = a["ok"][gmask]
    ttft = a["ttft"][gmask]
    inp = a["input_tokens"][gmask]
    by = {}
    if turn.max() > 1:
        for t in range(1, min(int(turn.max()), 8) + 1):
            m = okm & ((turn == t) if t < 8 else (turn >= 8))
            if m.any():
                st = M.stats(ttft[m], [50, 90])
                by[str(t) if t < 8 else "8+"] = {"n": st["n"], "ttft_p50": st.get("p50"), "ttft_p90": st.get("p90"),
                                                 "input_tokens_mean": float(np.nanmean(inp[m]))
                                                 if np.isfinite(inp[m]).any() else None}
    out["ttft_by_turn"] = by
    return out


def _accuracy(d: Data, gmask, measured, okm, P) -> dict:
    a = d.a
    flags: list[str] = []
    out: dict[str, Any] = {}
    # run-level lag verdicts
    lagged = [d.runs[r]["run_id"] for r in np.unique(a["run"][gmask]) if d.runs[r].get("lagged")]
    out["lagged_runs"] = lagged
    for r in lagged:
        flags.append(f"LAGGED: run {r}: vk-send could not keep up with the schedule; latencies include the "
                     "client's own delay (see dispatch_lag and *_from_intended)")
    # prompt tokens
    pm = okm & np.isfinite(a["prompt_tokens"]) & np.isfinite(a["target_input_tokens"])
    if pm.any():
        diff = a["prompt_tokens"][pm] - a["target_input_tokens"][pm]
        out["prompt_vs_target"] = {"n": int(pm.sum()), "share_exact": float((diff == 0).mean()),
                                   "mean_diff": float(diff.mean()),
                                   "mean_abs_diff": float(np.abs(diff).mean()),
                                   "ratio": M.stats(a["prompt_tokens"][pm] / np.maximum(a["target_input_tokens"][pm], 1),
                                                    [50, 99])}
        # target_input_tokens counts a request's new content only: history and the chat template add to
        # prompt_tokens, so first turns (no history) are also reported on their own
        first = pm & (d.sessions()["turn"] == 1)
        if first.any():
            fd = a["prompt_tokens"][first] - a["target_input_tokens"][first]
            out["prompt_vs_target"]["first_turns"] = {"n": int(first.sum()), "share_exact": float((fd == 0).mean()),
                                                      "mean_diff": float(fd.mean()),
                                                      "max_abs_diff": float(np.abs(fd).max())}
    # output tokens against targets
    om = okm & np.isfinite(a["completion_tokens"]) & np.isfinite(a["target_output_tokens"])
    if om.any():
        c = a["completion_tokens"][om]
        t = a["target_output_tokens"][om]
        share_short = float((c < t).mean())
        out["output_vs_target"] = {"n": int(om.sum()), "share_exact": float((c == t).mean()),
                                   "share_stopped_early": share_short, "share_longer": float((c > t).mean()),
                                   "mean_ratio": float((c / np.maximum(t, 1)).mean())}
        if share_short > 0.01:
            flags.append(f"LENGTH: {share_short:.1%} of requests stopped before their target output length "
                         "(TPOT and throughput are measured on shorter outputs than planned)")
        if float((c > t).mean()) > 0.01:
            flags.append(f"LENGTH: {float((c > t).mean()):.1%} of requests produced more tokens than their target")
    elif (okm & np.isfinite(a["target_output_tokens"])).any():
        m = okm & np.isfinite(a["target_output_tokens"])
        c = a["output_tokens"][m]
        t = a["target_output_tokens"][m]
        out["output_vs_target"] = {"n": int(m.sum()), "counted_by": "events (no usage)",
                                   "share_exact": float((c == t).mean()),
                                   "share_stopped_early": float((c < t).mean()),
                                   "share_longer": float((c > t).mean())}
    # client-side token counts against server usage
    um = okm & np.isfinite(a["completion_tokens"])
    if um.any():
        known = d.pe["all_tokens_known"][um]
        evt = d.pe["event_tokens"][um]
        cnt = d.pe["n_token_events"][um]
        comp = a["completion_tokens"][um]
        out["events_vs_usage"] = {
            "n": int(um.sum()),
            "share_per_event_counts": float(known.mean()),
            "share_mismatch": float((evt[known] != comp[known]).mean()) if known.any() else None,
            "tokens_per_token_event": float(comp.sum() / cnt.sum()) if cnt.sum() else None,
        }
        if known.any() and float((evt[known] != comp[known]).mean()) > 0.01:
            flags.append("TOKENS: per-event token counts disagree with usage.completion_tokens for "
                         f"{float((evt[known] != comp[known]).mean()):.1%} of requests")
    # reasoning
    rm = okm & np.isfinite(a["reasoning_tokens"])
    if rm.any() and a["reasoning_tokens"][rm].sum() > 0:
        out["reasoning_tokens"] = M.stats(a["reasoning_tokens"][rm], [50, 99])
    # chunk-size histogram (tokens per token event)
    te = d.te
    unknown = int(te.n_unknown[okm].sum())
    if te.k is None:
        k = None
        ones = int(te.n[okm].sum()) - unknown
    else:
        em = np.repeat(okm, te.n)
        kn = em if te.known is None else em & te.known
        k = M.take(te.k, kn)
    hist = {}
    for lo, hi, lab in () if k is None else ((1, 1, "1"), (2, 2, "2"), (3, 3, "3"), (4, 4, "4"), (5, 8, "5-8"), (9, 16, "9-16"),
                        (17, 1 << 62, "17+")):
        c = int(((k >= lo) & (k <= hi)).sum())
        if c:
            hist[lab] = c
    if k is None and ones:
        hist["1"] = ones
    if unknown:
        hist["unknown"] = unknown
    out["chunk_tokens_histogram"] = hist
    # dispatch lag and rates
    out["dispatch_lag"] = M.stats(a["dispatch_lag"][measured], P)
    ti = a["t_intended"][measured]
    ts = a["t_sent"][measured]
    ti = ti[np.isfinite(ti)]
    ts = ts[np.isfinite(ts)]
    rates = {}
    if len(ti) > 1 and ti.max() > ti.min():
        rates["intended_per_s"] = (len(ti) - 1) / float(ti.max() - ti.min())
    if len(ts) > 1 and ts.max() > ts.min():
        rates["achieved_per_s"] = (len(ts) - 1) / float(ts.max() - ts.min())
    if "intended_per_s" in rates and "achieved_per_s" in rates:
        rates["achieved_over_intended"] = rates["achieved_per_s"] / rates["intended_per_s"]
        if rates["achieved_over_intended"] < 0.95:
            flags.append(f"RATE: achieved {rates['achieved_per_s']:.3g} req/s of the intended "
                         f"{rates['intended_per_s']:.3g} req/s")
    out["rate"] = rates
    dl = out["dispatch_lag"]
    if dl.get("n") and dl.get("p99", 0) is not None and dl.get("p99", 0) > 0.1 and not lagged:
        flags.append(f"LAG: p99 dispatch lag is {dl['p99'] * 1000:.0f} ms (requests left later than scheduled)")
    # timestamp error against the server's ground truth
    if d.te.err is not None:  # over the token events
        sel_ev = np.repeat(gmask, d.te.n) & np.isfinite(d.te.err)
        err = M.take(d.te.err, sel_ev)
        if len(err):
            e = M.stats(err, [50, 90, 99])
            e["spread_p99_minus_p50"] = e["p99"] - e["p50"]
            out["timestamp_error"] = e
    fm = measured & ~a["ok"]
    if measured.any() and fm.mean() > 0.0:
        flags.append(f"FAILED: {int(fm.sum())} of {int(measured.sum())} requests did not complete "
                     f"({fm.mean():.1%}); they count as SLO violations")
    out["flags"] = flags
    return out


def _caching(d: Data, okm) -> dict:
    a = d.a
    m = okm & np.isfinite(a["prompt_tokens"])
    out: dict[str, Any] = {"n": int(m.sum())}
    cm = m & np.isfinite(a["cached_tokens"])
    out["n_reporting_cached"] = int(cm.sum())
    pt = float(a["prompt_tokens"][cm].sum())
    out["cached_share"] = float(a["cached_tokens"][cm].sum()) / pt if pt else None
    im = m & np.isfinite(a["target_input_tokens"])
    if im.any():
        p = a["prompt_tokens"][im]
        new = np.minimum(a["target_input_tokens"][im], p)
        hist = np.clip(p - new, 0, None)
        pref = np.nan_to_num(a["prefix"][im], nan=0.0)
        ideal = np.minimum(hist + np.clip(pref, 0, new), p)
        out["ideal_share"] = float(ideal.sum() / p.sum()) if p.sum() else None
        out["ideal_definition"] = ("history (prompt_tokens - target_input_tokens) plus the declared shared prefix "
                                   "(prefix_tokens), as a share of prompt tokens")
    else:
        out["ideal_share"] = None
    return out


def _goodput(d: Data, g: Goodput, measured, duration: float) -> dict:
    a = d.a
    good = measured & a["ok"]
    per = {}
    for c in g.conditions:
        v = a[c.metric]
        if c.metric == "tpot":
            passed = np.isnan(v) | c.holds(v)  # one-token outputs have no TPOT: not a violation
        else:
            passed = np.isfinite(v) & c.holds(v)
        per[c.spec] = float((passed & measured & a["ok"]).sum() / measured.sum()) if measured.any() else None
        good &= passed
    n = int(measured.sum())
    ng = int(good.sum())
    tok = float(np.nansum(a["output_tokens"][good]))
    return {"spec": g.spec, "requests": n, "good": ng, "attainment": ng / n if n else None,
            "per_condition": per,
            "requests_per_s": ng / duration if duration > 0 else None,
            "output_tokens_per_s": tok / duration if duration > 0 else None}


def evaluate_data(d: Data, opts: Options | None = None, consume: bool = False) -> dict:
    """The whole evaluation as a JSON-able dict. ``opts``: those ``d`` was made with (the default); others
    must agree on the fluidity deadlines and the steady window. ``consume``: ``d``'s pooled arrays may be
    reordered (when nothing reads ``d`` afterwards)."""
    if opts is None:
        opts = d.opts
    elif (opts.fluidity, opts.warmup, opts.cooldown) != (d.opts.fluidity, d.opts.warmup, d.opts.cooldown):
        raise VkError("internal error: evaluate_data with fluidity or window options other than the data's")
    w0, w1, how = d.windows
    fl = d.fl
    tick("start")
    group_by = opts.group_by
    if not group_by and len(d.runs) > 1:
        group_by = ["run"]
    everything = np.ones(d.n, dtype=bool)
    overall = summarize(d, opts, everything, w0, w1, how, fl, last=consume and not group_by)
    tick("summary")
    groups = []
    if group_by:
        keys = d.group_keys(group_by)
        ngroups = len(set(keys.tolist()))
        if ngroups > MAX_GROUPS:
            raise VkError(f"--group-by {','.join(group_by)}: {ngroups} groups (at most {MAX_GROUPS}); group by a "
                          "coarser field, or use vk-eval sql for per-value figures")
        for k in sorted(set(keys.tolist()), key=lambda x: (str(x))):
            gm = keys == k
            groups.append({"key": dict(zip(group_by, str(k).split(", ") if len(group_by) > 1 else [k], strict=False)),
                           "label": str(k), "summary": summarize(d, opts, gm, w0, w1, how, fl)})
    result = {
        "vk_eval": 1,
        "inputs": d.inputs.names,
        "runs": [_run_info(r) for r in d.runs],
        "options": {**opts.to_dict(), "group_by": group_by},
        "definitions": LATENCY_METRICS,
        "overall": overall,
        "groups": groups,
        "timeseries": timeseries(d, opts.timeseries_bins),
    }
    from vk.eval.slo import check_slos

    tick("groups, time series")
    result = clean(result)
    result["slo"] = check_slos(opts.slo, result)
    return result


def clean(obj: Any) -> Any:
    """numpy scalars to Python numbers, NaN/inf to None: a JSON-able result with stable types."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def _run_info(r: dict) -> dict:
    keep = ("run_id", "file", "model", "api", "endpoint", "start_epoch", "vk_version", "host", "lagged")
    out = {k: r.get(k) for k in keep}
    sch = r.get("schedule")
    if isinstance(sch, dict):
        out["schedule"] = {k: sch.get(k) for k in ("mode", "process", "params", "concurrency", "seed") if k in sch}
    if r.get("run_end"):
        out["run_end"] = r["run_end"]
    return out


def _spread(t0: np.ndarray, t1: np.ndarray, w: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Per bin: the sum of each request's ``w`` spread evenly over [t0, t1] (a point mass when t0 == t1).

    Per-request spreads instead of per-event counts keep the time series O(requests), not O(events).
    """
    ok = np.isfinite(t0) & np.isfinite(t1) & np.isfinite(w)
    t0, t1, w = t0[ok], t1[ok], w[ok]
    nb = len(edges) - 1
    out = np.zeros(nb)
    point = t1 <= t0
    if point.any():
        out += np.histogram(t0[point], edges, weights=w[point])[0]
    t0, t1, w = t0[~point], t1[~point], w[~point]
    if len(t0):
        rate = w / (t1 - t0)
        o0 = np.argsort(t0)
        o1 = np.argsort(t1)
        s0, r0 = t0[o0], rate[o0]
        s1, r1 = t1[o1], rate[o1]
        c0 = np.r_[0, np.cumsum(r0)]
        c0x = np.r_[0, np.cumsum(r0 * s0)]
        c1 = np.r_[0, np.cumsum(r1)]
        c1x = np.r_[0, np.cumsum(r1 * s1)]
        i = np.searchsorted(s0, edges, side="right")
        j = np.searchsorted(s1, edges, side="right")
        integral = (edges * c0[i] - c0x[i]) - (edges * c1[j] - c1x[j])
        out += np.diff(integral)
    return out


def timeseries(d: Data, bins: int = 120) -> dict:
    """Per run: time bins with in-flight concurrency, completions/s, output tokens/s and TTFT p50 of sends."""
    a = d.a
    out = {}
    for r, info in enumerate(d.runs):
        m = (a["run"] == r) & np.isfinite(a["t_sent"]) & np.isfinite(a["t_done"])
        if not m.any():
            continue
        s = a["t_sent"][m]
        e = a["t_done"][m]
        t0 = 0.0
        t1 = float(e.max())
        if t1 <= t0:
            t1 = t0 + 1e-3
        nb = max(1, min(bins, int(math.ceil(t1 - t0)) * 4 if t1 - t0 < bins / 4 else bins))
        edges = np.linspace(t0, t1, nb + 1)
        ss = np.sort(s)
        es = np.sort(e)
        cs = np.r_[0, np.cumsum(ss)]
        ce = np.r_[0, np.cumsum(es)]

        def integral(T, ss=ss, es=es, cs=cs, ce=ce):
            i = np.searchsorted(ss, T, side="right")
            j = np.searchsorted(es, T, side="right")
            return (T * i - cs[i]) - (T * j - ce[j])

        I = integral(edges)  # noqa: E741
        width = np.diff(edges)
        conc = np.diff(I) / width
        okm = m & a["ok"]
        bw = (t1 - t0) / nb

        def binned(times, weights=None, t0=t0, bw=bw, nb=nb):
            b = np.clip(((times - t0) / bw).astype(np.int64), 0, nb - 1)
            return np.bincount(b, weights=weights, minlength=nb)[:nb]

        done = binned(a["t_done"][okm]) / width
        toks = _spread(a["t_first_token"][okm], a["t_last_token"][okm], a["output_tokens"][okm], edges) / width
        ttft = a["ttft"][okm]
        sent = a["t_sent"][okm]
        idx = np.clip(np.searchsorted(edges, sent, side="right") - 1, 0, nb - 1)
        o = np.argsort(idx, kind="stable")  # per-bin medians: bins contiguous after one integer sort
        sv, si = ttft[o], idx[o]
        med = []
        for b in range(nb):
            lo, hi = np.searchsorted(si, b), np.searchsorted(si, b, side="right")
            seg = sv[lo:hi]
            seg = seg[np.isfinite(seg)]
            med.append(float(np.median(seg)) if len(seg) else None)
        out[info["run_id"]] = {
            "t": ((edges[:-1] + edges[1:]) / 2).round(6).tolist(),
            "concurrency": conc.round(4).tolist(),
            "completed_per_s": done.round(4).tolist(),
            "output_tokens_per_s": toks.round(3).tolist(),
            "ttft_p50": med,
        }
    return out
