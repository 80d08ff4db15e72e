"""The server's own metrics (``server_metric`` records from ``vk-send --scrape``), in the terms people look for.

Engines name the same things differently; ``QUANTITIES`` maps each quantity to the sample names of vLLM, SGLang
and TGI (the first name present wins; the table is also in vk-eval(1)). Samples of one name at one scrape with
several label sets (engines, data-parallel ranks, cache tiers) are summed, except usage ratios, which are
averaged. Counters are raw in the records: their increase over a window is the sum of the positive differences
between scrapes, a drop being a restart of the counter (Prometheus' ``increase``).

The cross-check compares the output tokens the client counted (token events, in the window between the first and
the last scrape) with the increase of the server's generation-token counter over the same window: the two count
the same tokens, so a large difference means one side miscounts (a usage field that lies, a counter that counts
something else, a second client on the same server).
"""

from __future__ import annotations

import math
from typing import Any

import duckdb
import numpy as np

ENGINES = ("vllm", "sglang", "tgi")
CROSS_CHECK_TOLERANCE = 0.10  # |server / client - 1| above this is a warning
CROSS_CHECK_MIN_TOKENS = 200  # fewer client tokens than this: too few to judge

# quantity: (kind, how label sets combine, unit, what it is, {engine: candidate sample names})
QUANTITIES: dict[str, tuple[str, str, str, str, dict[str, tuple[str, ...]]]] = {
    "running": ("gauge", "sum", "requests", "requests being computed (in the batch)", {
        "vllm": ("vllm:num_requests_running",),
        "sglang": ("sglang:num_running_reqs",),
        "tgi": ("tgi_batch_current_size",)}),
    "waiting": ("gauge", "sum", "requests", "requests queued, not yet scheduled", {
        "vllm": ("vllm:num_requests_waiting",),
        "sglang": ("sglang:num_queue_reqs",),
        "tgi": ("tgi_queue_size",)}),
    "kv_cache_usage": ("gauge", "mean", "fraction", "share of the KV cache in use (0..1)", {
        "vllm": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        "sglang": ("sglang:token_usage",)}),
    "prefix_cache_hits": ("counter", "sum", "tokens", "prompt tokens found in the prefix cache", {
        "vllm": ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"),
        "sglang": ("sglang:cached_tokens_total",)}),
    "prefix_cache_queries": ("counter", "sum", "tokens", "prompt tokens looked up in the prefix cache", {
        "vllm": ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total"),
        "sglang": ("sglang:prompt_tokens_total",)}),
    "preemptions": ("counter", "sum", "requests", "requests preempted (SGLang: retracted)", {
        "vllm": ("vllm:num_preemptions_total",),
        "sglang": ("sglang:num_retracted_requests_total", "sglang:num_retracted_reqs_total")}),
    "prompt_tokens": ("counter", "sum", "tokens", "prompt tokens processed", {
        "vllm": ("vllm:prompt_tokens_total",),
        "sglang": ("sglang:prompt_tokens_total",),
        "tgi": ("tgi_request_input_length_sum",)}),
    "generation_tokens": ("counter", "sum", "tokens", "output tokens generated", {
        "vllm": ("vllm:generation_tokens_total",),
        "sglang": ("sglang:generation_tokens_total",),
        "tgi": ("tgi_request_generated_tokens_sum",)}),
}
ALL_NAMES = sorted({n for q in QUANTITIES.values() for names in q[4].values() for n in names})


def _files_sql(paths: list[str]) -> str:
    cols = ("{'kind': 'VARCHAR', 'run_id': 'VARCHAR', 't': 'DOUBLE', 'name': 'VARCHAR', 'labels': 'JSON', "
            "'value': 'DOUBLE', 'type': 'VARCHAR', 'error': 'VARCHAR'}")
    files = "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"
    return f"read_ndjson({files}, columns={cols}, format='newline_delimited')"


def view_sql(paths: list[str]) -> str:
    """``vk-eval sql``'s ``server_metrics`` view: one row per scraped sample (and per failed scrape)."""
    return ("CREATE OR REPLACE VIEW server_metrics AS SELECT run_id, t, name, labels, value, type, error "
            f"FROM {_files_sql(paths)} WHERE kind = 'server_metric'")


def has_server_metrics(paths: list[str]) -> bool:
    """A cheap test (a substring in the files) before any parsing: runs without --scrape pay nothing."""
    needle = b'"kind":"server_metric"'
    for p in paths:
        with open(p, "rb") as f:
            tail = b""
            while chunk := f.read(1 << 20):
                if needle in tail + chunk:
                    return True
                tail = chunk[-len(needle):]
    return False


def engine_of(names: set[str]) -> str | None:
    """The engine whose names the exposition uses (the one with most mapped names present)."""
    best, n_best = None, 0
    for e in ENGINES:
        n = sum(any(c in names for c in q[4].get(e, ())) for q in QUANTITIES.values())
        if n > n_best:
            best, n_best = e, n
    return best


def increase(v: np.ndarray) -> np.ndarray:
    """Per interval between scrapes: a counter's increase (a drop is a restart: the new value counts)."""
    d = np.diff(v)
    return np.where(d < 0, v[1:], d)


class Timeline:
    """One run's scrapes: times ``t`` and, per quantity, the value at each scrape (NaN where absent)."""

    def __init__(self, run_id: str, rows: list[tuple], failed: int, errors: list[str]):
        self.run_id = run_id
        self.failed = failed
        self.errors = errors
        by_name: dict[str, dict[float, list[float]]] = {}
        ts = set()
        for t, name, value in rows:
            ts.add(t)
            by_name.setdefault(name, {}).setdefault(t, []).append(np.nan if value is None else value)
        self.t = np.array(sorted(ts), dtype=float)
        self.engine = engine_of(set(by_name))
        self.values: dict[str, np.ndarray] = {}
        self.sources: dict[str, str] = {}
        for q, (_kind, how, _unit, _what, names) in QUANTITIES.items():
            for name in names.get(self.engine, ()):
                if name in by_name:
                    per_t = by_name[name]
                    agg = np.nansum if how == "sum" else np.nanmean
                    self.values[q] = np.array([agg(per_t[t]) if t in per_t else np.nan for t in self.t])
                    self.sources[q] = name
                    break

    def rate(self, q: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(scrape times: the intervals' edges, per-second increase in each interval) of a counter."""
        v = self.values.get(q)
        if v is None or len(self.t) < 2:
            return None
        ok = np.isfinite(v)
        t, v = self.t[ok], v[ok]
        if len(t) < 2:
            return None
        dt = np.diff(t)
        return t, increase(v) / np.where(dt > 0, dt, np.nan)

    def total(self, q: str) -> float | None:
        v = self.values.get(q)
        if v is None:
            return None
        v = v[np.isfinite(v)]
        return float(increase(v).sum()) if len(v) >= 2 else None


def timelines(paths: list[str], con: duckdb.DuckDBPyConnection | None = None) -> list[Timeline]:
    """The runs' scrapes, in input order (none without server_metric records). ``con``: a connection with
    vk-eval's ``raw`` table, which tells at once whether there are any."""
    if con is not None:
        if not con.execute("SELECT count(*) FROM raw WHERE kind = 'server_metric'").fetchone()[0]:
            return []
    elif not has_server_metrics(paths):
        return []
    own = con is None
    con = con or duckdb.connect()
    try:
        src = _files_sql(paths)
        names = ", ".join(f"'{n}'" for n in ALL_NAMES)
        rows = con.execute(f"SELECT run_id, t, name, value FROM {src} WHERE kind = 'server_metric' "
                           f"AND (name IS NULL OR name IN ({names}))").fetchall()
        fails = con.execute(
            f"SELECT run_id, count(*), list(error ORDER BY t)[1:3] FROM {src} "
            "WHERE kind = 'server_metric' AND name IS NULL GROUP BY run_id").fetchall()
    finally:
        if own:
            con.close()
    per_run: dict[str, list[tuple]] = {}  # in the order the runs appear
    for rid, t, name, value in rows:
        runs = per_run.setdefault(rid, [])
        if name is not None:
            runs.append((t, name, value))
    failed = {rid: (n, errs) for rid, n, errs in fails}
    return [Timeline(rid, samples, *failed.get(rid, (0, []))) for rid, samples in per_run.items()]


def client_tokens(paths: list[str], windows: dict[str, tuple[float, float]],
                  con: duckdb.DuckDBPyConnection | None = None) -> dict[str, float]:
    """Output tokens the client received within each run's window: per-event counts where the record has them,
    else the response's completion tokens spread evenly over its token events (else one per token event)."""
    if not windows:
        return {}
    own = con is None
    con = con or duckdb.connect()
    try:
        con.execute("CREATE OR REPLACE TEMP TABLE vk_server_windows (run_id VARCHAR, a DOUBLE, b DOUBLE)")
        con.executemany("INSERT INTO vk_server_windows VALUES (?, ?, ?)",
                        [(rid, a, b) for rid, (a, b) in windows.items()])
        cols = ("{'kind': 'VARCHAR', 'run_id': 'VARCHAR', 'usage': 'STRUCT(completion_tokens BIGINT)', "
                "'events': 'STRUCT(t DOUBLE[], tokens BIGINT[], kind VARCHAR)'}")
        files = "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"
        tok = "ks[i] IN ('c', 'r', 't')"
        inside = f"{tok} AND ts[i] BETWEEN w.a AND w.b"
        rows = con.execute(f"""
            SELECT r.run_id, sum(CASE WHEN toks IS NOT NULL
                    THEN list_sum(list_transform(range(1, len(ts) + 1),
                                                 lambda i: CASE WHEN {inside} THEN coalesce(toks[i], 0) ELSE 0 END))
                    ELSE coalesce(ct, ntok) * len(list_filter(range(1, len(ts) + 1), lambda i: {inside}))
                         / nullif(ntok, 0) END)
            FROM (SELECT run_id, events.t AS ts, string_split(events.kind, '') AS ks, events.tokens AS toks,
                         usage.completion_tokens AS ct,
                         length(regexp_replace(coalesce(events.kind, ''), '[^crt]', '', 'g')) AS ntok
                  FROM read_ndjson({files}, columns={cols}, format='newline_delimited')
                  WHERE kind = 'response' AND events IS NOT NULL) r
            JOIN vk_server_windows w ON r.run_id = w.run_id
            GROUP BY r.run_id""").fetchall()
    finally:
        if own:
            con.close()
    return {rid: float(v or 0.0) for rid, v in rows}


def _stat(v: np.ndarray | None) -> dict | None:
    if v is None:
        return None
    v = v[np.isfinite(v)]
    if not len(v):
        return None
    return {"mean": float(v.mean()), "max": float(v.max()), "last": float(v[-1])}


def summarize_run(tl: Timeline, client: float | None) -> dict:
    """The server section of one run: gauges (mean, max over the scrapes from time 0), counter increases and
    rates between the first and last scrape, and the cross-check."""
    out: dict[str, Any] = {"run_id": tl.run_id, "engine": tl.engine, "scrapes": int(len(tl.t)),
                           "failed_scrapes": tl.failed, "errors": tl.errors, "metrics": dict(tl.sources)}
    if len(tl.t) == 0:
        out["warnings"] = [f"run {tl.run_id}: every scrape of the server's metrics failed"
                           + (f" ({tl.errors[0]})" if tl.errors else "")]
        return out
    t0, t1 = float(tl.t[0]), float(tl.t[-1])
    span = t1 - t0
    out["window"] = [t0, t1]
    out["interval"] = float(np.median(np.diff(tl.t))) if len(tl.t) > 1 else None
    during = tl.t >= 0
    for q in ("running", "waiting", "kv_cache_usage"):
        v = tl.values.get(q)
        out[q] = _stat(v[during] if v is not None and during.any() else v)
    for q in ("prefix_cache_hits", "prefix_cache_queries", "preemptions", "prompt_tokens", "generation_tokens"):
        out[q] = tl.total(q)
    hits, queries = out["prefix_cache_hits"], out["prefix_cache_queries"]
    out["prefix_cache_hit_rate"] = hits / queries if hits is not None and queries else None
    out["prompt_tokens_per_s"] = out["prompt_tokens"] / span if out["prompt_tokens"] is not None and span > 0 \
        else None
    gen = out["generation_tokens"]
    out["generation_tokens_per_s"] = gen / span if gen is not None and span > 0 else None
    warnings = []
    if tl.engine is None:
        warnings.append(f"run {tl.run_id}: the scraped metrics use no vLLM, SGLang or TGI names vk-eval knows")
    check = None
    if gen is not None and client is not None and span > 0:
        ratio = gen / client if client > 0 else None
        check = {"window": [t0, t1], "client_output_tokens": client, "server_generation_tokens": gen,
                 "client_output_tokens_per_s": client / span, "server_generation_tokens_per_s": gen / span,
                 "ratio": ratio, "tolerance": CROSS_CHECK_TOLERANCE}
        if max(client, gen) >= CROSS_CHECK_MIN_TOKENS and (ratio is None or abs(ratio - 1) > CROSS_CHECK_TOLERANCE):
            warnings.append(
                f"SERVER TOKENS DISAGREE: run {tl.run_id}: the server generated {gen:.0f} output tokens "
                f"({tl.sources.get('generation_tokens')}) while the client counted {client:.0f} over the same "
                f"{span:.1f} s (ratio {'inf' if ratio is None else f'{ratio:.3f}'}); one side miscounts, or "
                "another client shares the server")
    out["cross_check"] = check
    out["warnings"] = warnings
    return out


def server_section(paths: list[str], con: duckdb.DuckDBPyConnection | None = None) -> list[dict] | None:
    """Per run with scraped metrics, its server summary; None when no run has any."""
    tls = timelines(paths, con)
    if not tls:
        return None
    windows = {tl.run_id: (float(tl.t[0]), float(tl.t[-1])) for tl in tls if len(tl.t) >= 2}
    client = client_tokens(paths, windows, con)
    return [summarize_run(tl, client.get(tl.run_id, 0.0) if tl.run_id in windows else None) for tl in tls]


def current_load(url: str, timeout: float = 2.0) -> dict | None:
    """The server's gauges right now (``running``, ``waiting``, ``kv_cache_usage``, ``engine``), from one scrape
    of ``url`` (its /metrics); None when it does not answer or uses no names vk knows. For a sweep's saturation
    stop and drain wait."""
    from vk.send.scrape import scrape_once

    recs = [r for r in scrape_once(url, 0.0, "-", timeout=timeout) if r["name"] is not None]
    if not recs:
        return None
    tl = Timeline("-", [(0.0, r["name"], r["value"]) for r in recs], 0, [])
    if tl.engine is None:
        return None
    out: dict[str, Any] = {"engine": tl.engine}
    for q in ("running", "waiting", "kv_cache_usage"):
        v = tl.values.get(q)
        out[q] = float(v[0]) if v is not None and np.isfinite(v[0]) else None
    return out


# -- text ------------------------------------------------------------------------------------------------------


def _f(v: Any, fmt: str = "{:.4g}") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def server_text(section: list[dict], markdown: bool = False) -> str:
    """The report's server section: one table row per run."""
    title = "Server (scraped metrics)"
    head = f"## {title}\n\n" if markdown else f"{title}\n{'=' * len(title)}\n"
    cols = ["run", "engine", "scrapes", "running mean/max", "waiting mean/max", "KV usage mean/max",
            "prefix hit rate", "preemptions", "prompt tok/s", "gen tok/s", "client tok/s", "server/client"]
    rows = []
    for s in section:
        def mm(q, pct=False, s=s):
            st = s.get(q)
            if not st:
                return "-"
            return (f"{st['mean'] * 100:.1f}%/{st['max'] * 100:.1f}%" if pct
                    else f"{st['mean']:.2f}/{st['max']:.0f}")
        cc = s.get("cross_check") or {}
        rows.append([str(s["run_id"])[:8], s.get("engine") or "?",
                     f"{s['scrapes']}" + (f" ({s['failed_scrapes']} failed)" if s.get("failed_scrapes") else ""),
                     mm("running"), mm("waiting"), mm("kv_cache_usage", pct=True),
                     _f(s.get("prefix_cache_hit_rate"), "{:.1%}"), _f(s.get("preemptions"), "{:.0f}"),
                     _f(s.get("prompt_tokens_per_s"), "{:.1f}"), _f(s.get("generation_tokens_per_s"), "{:.1f}"),
                     _f(cc.get("client_output_tokens_per_s"), "{:.1f}"), _f(cc.get("ratio"), "{:.3f}")])
    if markdown:
        body = "| " + " | ".join(cols) + " |\n|" + "|".join("---" for _ in cols) + "|\n"
        body += "".join("| " + " | ".join(r) + " |\n" for r in rows)
    else:
        w = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        body = "  ".join(c.ljust(w[i]) for i, c in enumerate(cols)) + "\n"
        body += "  ".join("-" * x for x in w) + "\n"
        body += "".join("  ".join(v.ljust(w[i]) for i, v in enumerate(r)) + "\n" for r in rows)
    notes = []
    for s in section:
        if s.get("metrics"):
            notes.append(f"run {str(s['run_id'])[:8]} reads " + ", ".join(f"{q}={n}" for q, n in s["metrics"].items()))
    return head + body + "".join(f"  {n}\n" for n in notes)


# -- plot ------------------------------------------------------------------------------------------------------


def server_figure(tls: list[Timeline], client_ts: dict, path: str, plt) -> str | None:
    """One figure, one time axis: the client's TTFT p50 and output tokens/s with the server's generation
    tokens/s, the server's running and waiting requests, its KV-cache use and its prefix-cache hit rate."""
    if not tls:
        return None
    fig, axes = plt.subplots(4, 1, figsize=(11, 11), sharex=True)
    for tl in tls:
        label = str(tl.run_id)[:8]
        s = client_ts.get(tl.run_id)
        if s:
            t = np.array(s["t"], dtype=float)
            axes[0].plot(t, [np.nan if v is None else v * 1000 for v in s["ttft_p50"]], marker=".",
                         label=f"{label} TTFT p50 (client)")
            axes[1].plot(t, s["output_tokens_per_s"], label=f"{label} output tokens/s (client)")
        r = tl.rate("generation_tokens")
        if r is not None:
            axes[1].stairs(r[1], r[0], ls="--", label=f"{label} generation tokens/s (server)")
        for q, ls in (("running", "-"), ("waiting", ":")):
            if q in tl.values:
                axes[2].step(tl.t, tl.values[q], where="post", ls=ls, label=f"{label} {q}")
        if "kv_cache_usage" in tl.values:
            axes[3].plot(tl.t, tl.values["kv_cache_usage"] * 100, label=f"{label} KV cache use %")
        hits, queries = tl.rate("prefix_cache_hits"), tl.rate("prefix_cache_queries")
        if hits is not None and queries is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                axes[3].stairs(100 * hits[1] / queries[1], hits[0], ls="--", label=f"{label} prefix hit rate %")
    axes[0].set_ylabel("TTFT p50 (ms)")
    axes[1].set_ylabel("tokens/s")
    axes[2].set_ylabel("requests (server)")
    axes[3].set_ylabel("%")
    axes[3].set_xlabel("seconds since run start")
    axes[0].set_title("Client and server on one time axis")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
