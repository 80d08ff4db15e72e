"""vk-eval's data: the records loaded into DuckDB and the numpy arrays per request that every figure is
computed from (Data), the metric names and definitions, the SQL views, the steady-state window."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np

from vk.errors import VkError
from vk.eval import load as L
from vk.eval import metrics as M
from vk.eval.outputs import writing
from vk.eval.progress import tick

if TYPE_CHECKING:
    from vk.eval.options import Options

LATENCY_METRICS = {
    "ttft": "t_first_token - t_sent (first token of any kind)",
    "ttfc": "t_first_content - t_sent (first content token)",
    "tpot": "(t_last_token - t_first_token) / (output_tokens - 1); undefined with fewer than two token events "
            "(non-streamed answers, one-token outputs)",
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
# how every statistic is computed (in the JSON's definitions, the report and man vk-eval)
STAT_DEFINITIONS = {
    "percentiles": "linear interpolation between order statistics (position p/100 * (n - 1); numpy's default, "
                   "DuckDB's quantile_cont), not nearest rank",
    "stddev": "population standard deviation (divides by n, not n - 1)",
}
POOLED = ("itl_chunk", "itl_token", "itl_token_zeros")
COUNT_METRICS = ("input_tokens", "output_tokens", "reasoning_tokens")  # reasoning: usage.reasoning_tokens
STATUSES = ("ok", "error", "timeout", "cancelled", "skipped")
# The one rule every figure follows (error_rate, goodput, attainment, vk-sweep's verdicts): a request cancelled by
# the run's stop (the user's Ctrl-C, --duration, --max-errors: vk-send's `cancelled`, sent or not) says nothing of
# the server and is left out. A `skipped` request (not sent because an earlier turn of its session failed) is a
# consequence of the server's failure: its user got no answer, so it counts as failed (and never as good).
# error_rate = (error + timeout + skipped) / counted, where counted = measured - cancelled.
STOPPED_BY_RUN = ("cancelled",)
FAILURES = ("error", "timeout", "skipped")


def counted(status: np.ndarray) -> np.ndarray:
    """Per request (an array of status strings): True unless the run's stop cancelled it (the requests error_rate
    and attainment are shares of)."""
    return ~np.isin(status, STOPPED_BY_RUN)


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
  CASE WHEN output_tokens > 1 AND length(regexp_replace(coalesce(events.kind, ''), '[^crt]', '', 'g')) > 1
       THEN (t_last_token - t_first_token) / (output_tokens - 1) END AS tpot
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


def open_db(db: str | None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB, or the database file ``db`` (--db), written afresh."""
    if not db:
        return duckdb.connect()
    if os.path.isdir(db):
        raise VkError(f"--db {db}: is a directory; give a file name for the DuckDB database (e.g. run.duckdb)")
    with writing(db):
        if os.path.exists(db):
            os.remove(db)
        return duckdb.connect(db)


class Data:
    """Everything vk-eval knows about the inputs: the DuckDB connection and numpy arrays per request."""

    def __init__(self, inputs: Any, *, extra_fields=(), db: str | None = None, validate: str = "auto",
                 opts: Options | None = None, cache: bool = False):
        # the options that need the event times (fluidity deadlines, steady window): they are computed here,
        # before the times are turned into gaps in place
        if opts is None:
            from vk.eval.options import Options

            opts = Options()
        self.opts = opts
        self.inputs = L.Inputs(inputs)
        self.con = open_db(db)
        # without --db, the lean table: no events struct, event times read from the files when needed
        self.lean = not db
        tick("start")
        with writing(db) if db else contextlib.nullcontext():
            self.cache = L.load(self.con, self.inputs, extra_fields, validate, lean=self.lean, cache=cache)
        tick("load (DuckDB)")
        run_cols = L.RUN_ONLY_COLUMNS
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
        self.warnings = self.inputs.warnings + L.run_warnings(self.runs)
        for w in self.warnings:
            print(f"vk-eval: warning: {w}", file=sys.stderr)
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
            "ev_ntok AS n_tok, ev_sparse AS needs_sparse, coalesce(attempts, 1) > 1 AS retried, "
            "warning IS NOT NULL AS warned "
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
        a["retried"] = np.asarray(np.ma.filled(cols["retried"], False), dtype=bool)  # attempts > 1
        a["warned"] = np.asarray(np.ma.filled(cols["warned"], False), dtype=bool)  # ok, a malformed line skipped
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
        self.rows = rows  # per request: its row in the responses view
        del cols
        tick("  scalars")
        hit = self.cache is not None and self.cache.hit
        if hit:  # the token-event times as the cache keeps them
            t = np.load(self.cache.path("t.npy"))
            st = np.load(self.cache.path("server_t.npy")) if has_server_t else None
            kind_bytes = None
        else:
            try:
                t, st, kind_bytes = self._event_times(n_tok, has_server_t)
            except duckdb.Error as e:  # e.g. events.t holding strings, in an input too large to validate first
                if not self.inputs.checked:
                    L.validate_files(self.inputs)  # raises the error naming the file, line and field
                raise VkError(f"cannot read the event times: {str(e).splitlines()[0]}") from None
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
            with writing(self.cache.dir, "cannot write the cache"):
                np.save(self.cache.path("t.npy"), te.t)
                if te.server_t is not None:
                    np.save(self.cache.path("server_t.npy"), te.server_t)
                self.cache.finish()
        tick("token events")
        self._time_axes()
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
        # times that run backwards by up to load.CLOCK_SLACK (more is refused when the input is read): a first
        # token or an end before the send. Said per request (backwards_by, seconds; vk.eval.summary flags them)
        # and taken as 0, never as a negative latency
        with np.errstate(invalid="ignore"):
            back = np.fmax(np.fmax(-a["e2e"], -a["ttft"]), np.fmax(-a["ttfc"], a["t_first_token"] - a["t_last_token"]))
        a["backwards_by"] = np.where(back > 0, back, 0.0)
        for k in ("ttft", "ttfc", "e2e"):
            a[k] = np.where(a[k] < 0, 0.0, a[k])  # NaN stays NaN
        with np.errstate(invalid="ignore", divide="ignore"):
            # TPOT needs two token events at least: a non-streamed answer (or one whole chunk) has a single
            # arrival time, and t_last_token - t_first_token = 0 is not a time per token
            timed = (out > 1) & (pe["n_token_events"] > 1)
            a["tpot"] = np.where(timed, np.fmax(a["t_last_token"] - a["t_first_token"], 0.0)
                                 / np.where(timed, out - 1, 1), np.nan)
            a["normalized_latency"] = np.where(out > 0, a["e2e"] / np.where(out > 0, out, 1), np.nan)
        a["max_stall"] = pe["max_stall"]
        a["ttft_from_intended"] = a["t_first_token"] - a["t_intended"]
        a["ttfc_from_intended"] = a["t_first_content"] - a["t_intended"]
        a["e2e_from_intended"] = a["t_done"] - a["t_intended"]
        a["queue_delay"] = a["t_sent"] - a["t_intended"]
        a["dispatch_lag"] = a["t_dispatched"] - a["t_intended"]
        a["server_t_err"] = None

    def _time_axes(self) -> None:
        """Runs that overlap in wall-clock time, or whose headers say they are shards of one schedule, share one
        time axis: one run to the figures of time (throughput, steady window, concurrency), with their times
        shifted onto the earliest run's clock (start_epoch + t). ``a["axis"]`` per request, ``self.axes`` per
        axis: {"runs": [run indices], "label": ...}; ``self.run_axis`` per run."""
        a, nr = self.a, len(self.runs)
        run = a["run"]
        lo = np.full(nr, np.inf)
        hi = np.full(nr, -np.inf)
        t0 = np.where(np.isnan(a["t_intended"]), a["t_sent"], a["t_intended"])
        np.fmin.at(lo, run, np.where(np.isnan(t0), np.inf, t0))
        np.fmax.at(hi, run, np.where(np.isnan(a["t_done"]), -np.inf, a["t_done"]))
        epoch = np.array([r.get("start_epoch") if isinstance(r.get("start_epoch"), (int, float)) else np.nan
                          for r in self.runs], dtype=np.float64)
        parent = list(range(nr))

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        # overlapping wall-clock spans (runs with a start_epoch and times)
        known = [r for r in range(nr) if np.isfinite(epoch[r]) and np.isfinite(lo[r]) and np.isfinite(hi[r])]
        known.sort(key=lambda r: epoch[r] + lo[r])
        end, prev = -np.inf, None
        for r in known:
            if prev is not None and epoch[r] + lo[r] < end:
                parent[root(r)] = root(prev)
            if epoch[r] + hi[r] > end:
                end, prev = epoch[r] + hi[r], r
        # shards of one schedule: same shard count, seed and start_at
        shard_of: dict[tuple, int] = {}
        for r, info in enumerate(self.runs):
            sch = info.get("schedule") if isinstance(info.get("schedule"), dict) else {}
            sh = sch.get("shard")
            if isinstance(sh, dict) and np.isfinite(epoch[r]):
                key = (sh.get("n"), sch.get("seed"), sch.get("start_at"), sch.get("process"))
                if key in shard_of:
                    parent[root(r)] = root(shard_of[key])
                else:
                    shard_of[key] = r
        roots: dict[int, int] = {}
        self.run_axis = np.array([roots.setdefault(root(r), len(roots)) for r in range(nr)], dtype=np.int64)
        self.axes = []
        offset = np.zeros(nr)
        for ax in range(len(roots)):
            members = [r for r in range(nr) if self.run_axis[r] == ax]
            if len(members) > 1:
                e0 = np.nanmin(epoch[members])
                offset[members] = epoch[members] - e0
            shards = []
            for r in members:
                sch = self.runs[r].get("schedule") if isinstance(self.runs[r].get("schedule"), dict) else {}
                if isinstance(sch.get("shard"), dict):
                    shards.append(f"{sch['shard'].get('k')}/{sch['shard'].get('n')}")
            self.axes.append({"runs": members, "run_ids": [self.runs[r]["run_id"] for r in members],
                              "label": "+".join(str(self.runs[r]["run_id"]) for r in members),
                              "shards": shards if len(shards) == len(members) and len(members) > 1 else None,
                              "offsets": [float(offset[r]) for r in members]})
        a["axis"] = self.run_axis[run]
        if offset.any():  # the times of every run on its axis's clock
            off = offset[run]
            for f in L.TIME_COLS:
                a[f] = a[f] + off
            te = self.te
            ev_off = np.repeat(off, te.n)
            te.t = te.t + ev_off
            if te.server_t is not None:
                te.server_t = te.server_t + ev_off

    def _tokens_in_window(self, w0: np.ndarray, w1: np.ndarray, block: int = 1 << 16) -> np.ndarray:
        """Per request: the tokens of its token events that arrived inside its time axis's steady window.
        Requests whose token events all lie inside (or all outside) are settled by their first and last arrival."""
        te = self.te
        run = self.a["axis"]
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

    def request_name(self, i: int) -> str:
        """Request ``i`` as a person finds it in the input: run and request id."""
        r = self.con.execute("SELECT run_id, request_id FROM responses WHERE row = ?", [int(self.rows[i])]).fetchone()
        return f"{r[1]!r} of run {r[0]}" if r else f"#{i}"

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


def _windows(d: Data, warmup: float | None, cooldown: float | None) -> tuple[np.ndarray, np.ndarray, str]:
    """Per time axis (a run, or runs sharing one: see Data._time_axes): the steady-state window [w0, w1] (seconds
    on the axis's clock) and how it was chosen."""
    nr = len(d.axes)
    a = d.a
    w0 = np.zeros(nr)
    w1 = np.full(nr, np.inf)
    how = "whole run"
    for r in range(nr):
        m = a["axis"] == r
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
