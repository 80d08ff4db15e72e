"""EvalResult and its output formats: table, json, csv, markdown."""

from __future__ import annotations

import csv
import io
from typing import Any

import orjson

from vk.errors import VkError

FORMATS = ("table", "json", "csv", "markdown")
TIME_METRICS = {"ttft", "ttfc", "tpot", "itl_chunk", "itl_token", "itl_token_zeros", "e2e", "normalized_latency",
                "max_stall", "ttft_from_intended", "ttfc_from_intended", "e2e_from_intended", "queue_delay",
                "dispatch_lag"}


class EvalResult:
    """The result of ``vk.eval.evaluate``: ``to_dict()`` (JSON-able, stable keys) and ``format(fmt)``."""

    def __init__(self, data: dict):
        self._d = data

    def to_dict(self) -> dict:
        return self._d

    def __getitem__(self, k):
        return self._d[k]

    @property
    def slo_ok(self) -> bool:
        return all(c["ok"] for c in self._d.get("slo", []))

    @property
    def overall(self) -> dict:
        return self._d["overall"]

    def format(self, fmt: str = "table") -> str:
        if fmt == "json":
            return orjson.dumps(self._d, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode() + "\n"
        if fmt == "csv":
            return to_csv(self._d)
        if fmt in ("table", "markdown"):
            return to_text(self._d, markdown=fmt == "markdown")
        raise VkError(f"unknown format {fmt!r} (choose {', '.join(FORMATS)})")

    def __str__(self) -> str:
        return self.format("table")


# --------------------------------------------------------------------------------------------------------------


def _num(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if unit == "ms":
        return f"{v * 1000:.2f}"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return "-"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.4g}"
    return str(v)


def _pct(v: Any) -> str:
    """A share (0..1) as a percentage; never rounds a share that is not exactly 0 or 1 to 0% or 100%."""
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    v = float(v)
    if v == 0:
        return "0%"
    if v == 1:
        return "100%"
    s = f"{v * 100:.1f}"
    if s == "0.0":
        return "<0.1%"
    if s == "100.0":
        return ">99.9%"
    return s + "%"


def _signed(v: Any) -> str:
    if v is None:
        return "-"
    return ("+" if v > 0 else "") + _num(v)


def _table(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out) + "\n"
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=False)))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False))))
    return "\n".join(out) + "\n"


def _stat_cols(d: dict) -> list[str]:
    return [f"p{p:g}" for p in d["options"]["percentiles"]] + ["mean", "stddev", "min", "max"]


def _heading(text: str, markdown: bool, level: int = 2) -> str:
    if markdown:
        return "#" * level + " " + text + "\n\n"
    return text + "\n" + ("=" if level <= 2 else "-") * len(text) + "\n"


STATS_NOTE = ("percentiles interpolate linearly between order statistics (not nearest rank); stddev is the population "
              "one (divides by n)")


def collapse_identical(stats: dict[str, Any]) -> list[tuple[list[str], dict]]:
    """(names, stats) per distinct sample, in order: metrics whose statistics are identical (itl_token and
    itl_token_zeros when every chunk is one token; ttfc when nothing comes before the content) share a row."""
    out: list[tuple[list[str], dict]] = []
    for name, st in stats.items():
        if not st or not st.get("n"):
            continue
        for names, seen in out:
            if seen == st:
                names.append(name)
                break
        else:
            out.append(([name], st))
    return out


def _pick(st: dict | None, want: str, fallback_last: bool) -> tuple[str, Any]:
    """The statistic ``want`` (p50, p99) of ``st``, else the nearest configured percentile."""
    st = st or {}
    if want in st:
        return want, st[want]
    ps = sorted((k for k in st if k.startswith("p")), key=lambda k: float(k[1:]))
    if not ps:
        return want, None
    k = ps[-1] if fallback_last else ps[0]
    return k, st[k]


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v * 1000:.2f} ms"


def headline(d: dict) -> list[str]:
    """The few lines a person pastes into a chat: what ran, how fast, the latencies people quote, errors, SLOs."""
    s = d["overall"]
    c = s["counts"]
    acc = s["accuracy"]
    runs = d["runs"]
    axes = d.get("time_axes") or []
    t = s["throughput"]
    w = t["steady"] if t["steady"]["window"] != "whole run" else t["whole"]
    # one population: every request and session read, warm-up included (said when there is one)
    nsess = c.get("sessions", (s.get("sessions") or {}).get("sessions"))
    first = f"{c['requests']} requests" + (f" in {nsess} sessions" if nsess else "")
    if c.get("warmup_excluded"):
        first += f" (warm-up included: {c['warmup_excluded']} requests, not measured)"
    if len(runs) > 1:
        if len(axes) == 1:
            sh = axes[0].get("shards")
            first += f", {len(runs)} runs as one" + (f" (shards {', '.join(sh)})" if sh else " (overlapping in time)")
        else:
            first += f", {len(runs)} runs"
    first += f", {_num(t['whole']['duration'])} s" + (f" (steady window {_num(w['duration'])} s)" if w is not t["whole"]
                                                      else "")
    rate = acc.get("rate") or {}
    sent = (f"sent {_num(rate['achieved_per_s'])} req/s" + (f" (scheduled {_num(rate['intended_per_s'])})"
                                                             if rate.get("intended_per_s") else "") + ", "
            if rate.get("achieved_per_s") else "")
    lines = [first,
             f"rate      {sent}completed {_num(w['requests_per_s'])} req/s; output {_num(w['output_tokens_per_s'])} "
             "tokens/s"]
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT")):
        st = s["latency"].get(name) or {}
        if not st.get("n"):
            why = " (no streamed request with two or more token events)" if name == "tpot" else ""
            lines.append(f"{label:<9} undefined{why}")
            continue
        k1, v1 = _pick(st, "p50", False)
        k2, v2 = _pick(st, "p99", True)
        lines.append(f"{label:<9} {k1} {_ms(v1)}, {k2} {_ms(v2)}")
    # vk.eval.data's rule: skipped (after a failed turn) are failures; cancelled by the run's stop are left out
    kinds = ", ".join(f"{k} {c[k]}" for k in ("error", "timeout") if c.get(k))
    if c.get("skipped"):
        kinds += (", " if kinds else "") + f"skipped {c['skipped']} after a failed turn"
    how = ", ".join(f"{k.replace('_', ' ')} {c[k]}" for k in ("retried", "ok_with_warning") if c.get(k))
    left_out = (f"; cancelled by the run's stop {c['cancelled']} (not counted)" if c.get("cancelled") else "")
    lines.append(f"errors    {c['failed']} of {c['counted']} requests ({_pct(c['error_rate'])})"
                 + (f": {kinds}" if kinds else "") + left_out + (f"; {how}" if how else ""))
    checks = d.get("slo") or []
    if checks:
        missed = [x for x in checks if not x["ok"]]
        if missed:
            lines.append(f"SLO       MISSED {len(missed)} of {len(checks)}: " + ", ".join(
                f"{x['slo']} ({x['group']}: {_slo_value(x['value'], x.get('unit', ''))})" for x in missed[:3]))
        else:
            lines.append(f"SLO       met ({len(checks)} of {len(checks)})")
    else:
        lines.append("SLO       none given (--slo)")
    flags = acc.get("flags") or []
    kinds_f = sorted({f.split(":", 1)[0] for f in flags} | ({"INPUT"} if d.get("warnings") else set()))
    # a run that did not end complete, named (vk.eval.load.run_warnings has the details)
    kinds_f += [f"run {r['run_id']} ended {(r.get('run_end') or {})['ended']}" for r in runs
                if (r.get("run_end") or {}).get("ended") not in (None, "complete")]
    lines.append("warnings  " + (", ".join(kinds_f) + " (see below)" if kinds_f else "none"))
    return lines


def summary_text(d: dict, s: dict, title: str, markdown: bool) -> str:
    cols = _stat_cols(d)
    parts = [_heading(title, markdown, 2)]
    c = s["counts"]
    parts.append(
        f"requests {c['requests']}: measured {c['measured']} (ok {c['ok']}, error {c['error']}, timeout "
        f"{c['timeout']}, cancelled {c['cancelled']}, skipped {c['skipped']}); not measured: warm-up "
        f"{c['warmup_excluded']}, sent outside the steady window {c['outside_window']}\n"
    )
    names = {"usage": "usage.completion_tokens", "events.tokens": "sum of events.tokens",
             "token events": "number of token events (no counts)"}
    src = ", ".join(f"{names.get(k, k)} {v}" for k, v in c.get("output_tokens_source", {}).items())
    if src:
        parts.append(f"output tokens per request taken from (requests): {src}\n")
    flags = s["accuracy"].get("flags", [])
    if flags:
        parts.append("\n" + ("**WARNINGS**\n\n" if markdown else "!!! WARNINGS !!!\n"))
        for f in flags:
            parts.append(("- " if markdown else "  ! ") + f + "\n")
    parts.append("\n" + _heading("Latency (ms; n = requests, or gaps for itl_*)", markdown, 3))
    rows = []
    for names, st in collapse_identical(s["latency"]):
        rows.append([" = ".join(names), str(st["n"])] + [_num(st.get(k), "ms") for k in cols])
    parts.append(_table(["metric", "n", *[f"{k} ms" for k in cols]], rows, markdown))
    parts.append(("\n" if markdown else "") + f"{STATS_NOTE}\n")
    rows = []
    for name, st in s["tokens"].items():
        if st and st.get("n"):
            rows.append([name, str(st["n"])] + [_num(st.get(k)) for k in cols])
    if rows:
        parts.append("\n" + _heading("Tokens per request (tokens; n = requests)", markdown, 3))
        parts.append(_table(["metric", "n", *[f"{k} tok" for k in cols]], rows, markdown))
    t = s["throughput"]
    parts.append("\n" + _heading("Throughput (completed requests)", markdown, 3))
    rows = []
    for label, w in (("whole run", t["whole"]), (f"steady ({t['steady']['window']})", t["steady"])):
        rows.append([label, _num(w["duration"]), _num(w["requests_per_s"]), _num(w["input_tokens_per_s"]),
                     _num(w["output_tokens_per_s"]), _num(w["total_tokens_per_s"])])
    parts.append(_table(["window", "duration s", "req/s", "input tok/s", "output tok/s", "total tok/s"], rows,
                        markdown))
    from vk.eval.tasks import task_text

    parts.append(task_text(s, cols, _num, _table, _heading, markdown))
    conc = s["concurrency"]
    parts.append(f"\nrequests in flight (sent, not done): mean {_num(conc['mean'])}, max {_num(conc['max'])}\n")
    if "goodput" in s:
        g = s["goodput"]
        parts.append("\n" + _heading(f"Goodput ({g['spec']}; failed requests count as misses)", markdown, 3))
        parts.append(f"{_pct(g['attainment'])} of measured requests met every objective ({g['good']} of "
                     f"{g['requests']}); goodput {_num(g['requests_per_s'])} req/s, "
                     f"{_num(g['output_tokens_per_s'])} output tok/s\n")
        for k, v in g["per_condition"].items():
            parts.append(f"  {k}: met by {_pct(v)} of measured requests\n")
    f = s["fluidity"]
    parts.append("\n" + _heading("Fluidity index (Etalon)", markdown, 3))
    fi = f["index"] or {}
    parts.append(f"token deadlines: first token {f['prefill_deadline'] * 1000:g} ms after sending, then one every "
                 f"{f['decode_deadline'] * 1000:g} ms (slack carries over)\n"
                 f"deadlines met over all tokens (service index): {_pct(f['service_index'])}; per-request index "
                 f"(share of its deadlines met): mean {_num(fi.get('mean'))}, min {_num(fi.get('min'))}; requests "
                 f"with index >= 0.9: {_pct(f['share_ge_0.9'])}\n")
    se = s["sessions"]
    if se.get("sessions"):
        parts.append("\n" + _heading("Sessions", markdown, 3))
        tt = se["turns"]
        du = se["duration"]
        th = se["think_time"]
        parts.append(f"sessions {se['sessions']}; requests (turns) per session: mean {_num(tt.get('mean'))}, "
                     f"max {_num(tt.get('max'))}; session duration p50 {_num(du.get('p50'))} s; observed think "
                     f"time (next turn intended - previous done) p50 {_num(th.get('p50'))} s\n")
        if se.get("ttft_by_turn"):
            rows = [[k, str(v["n"]), _num(v["ttft_p50"], "ms"), _num(v["ttft_p90"], "ms"),
                     _num(v["input_tokens_mean"])] for k, v in se["ttft_by_turn"].items()]
            parts.append(_table(["turn", "requests", "ttft p50 ms", "ttft p90 ms", "input tokens mean"], rows,
                                markdown))
    a = s["accuracy"]
    parts.append("\n" + _heading("Run accuracy (measured ok requests)", markdown, 3))
    lines = []
    pv = a.get("prompt_vs_target") or {}
    if pv:
        part = []
        if "first_turns" in pv:
            f1 = pv["first_turns"]
            part.append(f"first turns (whole prompt vs planned content): {_pct(f1['share_exact'])} equal, mean "
                        f"{_signed(f1['mean_diff'])} tokens ({f1['n']} requests; the difference is the chat template)")
        if "later_turns" in pv:
            f2 = pv["later_turns"]
            part.append(f"later turns (prompt growth over the previous turn's prompt and answer vs planned content): "
                        f"{_pct(f2['share_exact'])} equal, mean {_signed(f2['mean_diff'])} tokens ({f2['n']} requests)")
        lines.append("prompt tokens (usage) vs planned (target_input_tokens): " + "; ".join(part))
    if "output_vs_target" in a:
        o = a["output_vs_target"]
        what = "counted from events" if o.get("counted_by") else "usage"
        lines.append(f"output tokens ({what}) vs planned (target_output_tokens): {_pct(o['share_exact'])} equal, "
                     f"{_pct(o['share_stopped_early'])} stopped early (fewer), {_pct(o['share_longer'])} longer "
                     f"({o['n']} requests)")
    if "events_vs_usage" in a:
        e = a["events_vs_usage"]
        lines.append(f"streamed token counts vs usage: {_pct(e['share_per_event_counts'])} of requests carry "
                     f"per-event counts, whose sum differs from usage.completion_tokens in "
                     f"{_pct(e['share_mismatch'])} of them; {_num(e['tokens_per_token_event'])} tokens per token "
                     f"event on average ({e['n']} requests)")
    hist = a.get("chunk_tokens_histogram")
    if hist:
        tot = sum(hist.values())
        lines.append("token events by tokens per chunk (events): " + ", ".join(
            f"{k} tok {v} ({_pct(v / tot)})" if k != "unknown" else f"unknown {v} ({_pct(v / tot)})"
            for k, v in hist.items()))
    dl = a.get("dispatch_lag") or {}
    if dl.get("n"):
        lines.append(f"dispatch lag (t_dispatched - t_intended): p50 {_num(dl.get('p50'), 'ms')} ms, p99 "
                     f"{_num(dl.get('p99'), 'ms')} ms, max {_num(dl.get('max'), 'ms')} ms")
    for v in a.get("lag") or []:
        who = f"run {v['run_id']}" + (f" (shard {v['shard']})" if v.get("shard") else "")
        arr = v.get("arrivals") or {}
        if arr:
            how = (f"sent/scheduled rate {_pct(arr['achieved_over_intended'])}, gaps between sends off by "
                   f"{_pct(arr['gap_distance_share'])} of the mean scheduled gap ({_num(arr['mean_gap'], 'ms')} ms), "
                   f"queue delay p99 {_pct(arr['queue_delay_p99_share_of_gap'])} of it")
        else:
            how = "no scheduled times to compare"
        add = (v.get("from_intended_added") or {}).get("ttft_from_intended") or {}
        if add:
            how += "; adds " + ", ".join(f"{_signed(x * 1000)} ms ({k})" for k, x in add.items()
                                         if k in ("p50", "p99", "mean")) + " to ttft_from_intended"
        verdict = "LAGGED: " + "; ".join(v["findings"]) if v["lagged"] else (
            "not lagged: the arrivals kept the schedule and the *_from_intended figures match the ones from t_sent "
            "within their noise")
        lines.append(f"lag verdict, {who}: {verdict} ({how})")
    for note in a.get("notes") or []:
        lines.append("note: " + note)
    lines += _ray_clock_lines(a.get("ray_clock") or [])
    if c.get("retried") or c.get("ok_with_warning"):
        lines.append(f"answers: {c['retried']} requests retried on a new connection (attempts > 1: the keep-alive "
                     f"one was closed before any byte was written), {c['ok_with_warning']} ok answers with a "
                     "malformed SSE line skipped (their warning field)")
    r = a.get("rate") or {}
    if r:
        ratio = r.get("achieved_over_intended")
        lines.append(f"request rate: intended {_num(r.get('intended_per_s'))} req/s, achieved "
                     f"{_num(r.get('achieved_per_s'))} req/s" + (f" ({_pct(ratio)} of intended)" if ratio else ""))
    if "timestamp_error" in a:
        te = a["timestamp_error"]
        lines.append(f"client arrival time - server send time (events.server_t): p50 {_num(te['p50'], 'ms')} ms, "
                     f"p99 {_num(te['p99'], 'ms')} ms, p99 - p50 {_num(te['spread_p99_minus_p50'], 'ms')} ms")
    ca = s["caching"]
    lines.append(f"prefix caching: {_pct(ca.get('cached_share'))} of prompt tokens cached (usage.cached_tokens, "
                 f"reported by {ca.get('n_reporting_cached', 0)} requests); ideal {_pct(ca.get('ideal_share'))} "
                 "(history plus declared shared prefix)")
    parts.append("".join(("- " if markdown else "") + ln + "\n" for ln in lines))
    return "".join(parts)


def _ray_clock_lines(clock: list[dict]) -> list[str]:
    lines = []
    for run in clock:
        for n in run["nodes"]:
            drift = (f"drift {n['clock_drift'] * 1000:+.2f} ms" if n["drift_measured"]
                     else "drift not measured (the node was gone at the end)")
            lag = ("" if n["lagged"] is None else f"; vk-send's lag verdict: {'LAGGED' if n['lagged'] else 'not lagged'}"
                   f" (dispatch lag p99 {_num(n['dispatch_lag_p99'], 'ms')} ms)")
            lost = f"; workers lost {n['workers_lost']}" if n["workers_lost"] else ""
            lines.append(f"clock, run {run['run_id']} node {n['node']} ({n['host']}): offset "
                         f"{(n['clock_offset'] or 0) * 1000:+.2f} ms +/- {_num(n['clock_uncertainty'], 'ms')} ms, "
                         f"{drift}: times within {_num(n['error_bound'], 'ms')} ms of the run's axis{lag}{lost}")
        lines.append(f"clock, run {run['run_id']}: times across its {len(run['nodes'])} nodes are on one axis within "
                     f"{_num(run['error_bound'], 'ms')} ms (residual error: clock_uncertainty + |clock_drift|, the "
                     "largest over its nodes)")
    return lines


def to_text(d: dict, markdown: bool = False, with_headline: bool = True) -> str:
    out = []
    head = headline(d)
    if not with_headline:
        pass
    elif markdown:
        out.append("# vk-eval report\n\n" + "\n".join(f"- {ln}" for ln in head) + "\n\n")
    else:
        out.append("vk-eval: " + head[0] + "\n" + "".join(f"  {ln}\n" for ln in head[1:]) + "\n")
    for r in d["runs"]:
        lag = "  LAGGED" if r.get("lagged") else ""
        out.append(("- " if markdown else "")
                   + f"run {r['run_id']}  file {r.get('file')}  model {r.get('model')}  api {r.get('api')}{lag}\n")
        srv = r.get("server")
        if isinstance(srv, dict):
            models = srv.get("models")
            out.append(("  " if markdown else "    ") + f"server (started by vk): {srv.get('cmd')}; ready in "
                       f"{_num(srv.get('ready_s'))} s; version {srv.get('version')}; models "
                       f"{', '.join(map(str, models)) if isinstance(models, list) else models}\n")
    out.append("\n")
    for w in d.get("warnings") or []:
        out.append(("- " if markdown else "  ! ") + "INPUT: " + w + "\n")
    out.append(summary_text(d, d["overall"], "Details", markdown))
    if d.get("server"):
        from vk.eval.server_metrics import server_text

        out.append("\n" + server_text(d["server"], markdown))
    if d["groups"]:
        out.append("\n" + group_table(d, markdown))
    if d.get("slo"):
        out.append("\n" + slo_table(d["slo"], markdown))
    return "".join(out)


def group_table(d: dict, markdown: bool = False) -> str:
    """One row per group (--group-by, or per run): the headline figures side by side (all figures: --json)."""
    by = ", ".join(d["options"].get("group_by") or ["run"])
    rows = []
    for g in d["groups"]:
        s = g["summary"]
        c = s["counts"]
        w = s["throughput"]["whole"]
        lat = s["latency"]
        row = [g["label"], str(c["requests"]), _pct(c["error_rate"]), _num(w["requests_per_s"]),
               _num(w["output_tokens_per_s"])]
        for name in ("ttft", "tpot", "e2e"):
            st = lat.get(name) or {}
            row += [_num(_pick(st, "p50", False)[1], "ms"), _num(_pick(st, "p99", True)[1], "ms")]
        row.append("LAGGED" if s["accuracy"].get("lagged_runs") else "")
        rows.append(row)
    head = [by, "requests", "errors", "req/s", "out tok/s", "ttft p50", "ttft p99", "tpot p50", "tpot p99",
            "e2e p50", "e2e p99", "lag"]
    return (_heading(f"By {by} (latencies in ms; every figure per group: --json)", markdown, 2)
            + _table(head, rows, markdown))


def _slo_value(v: Any, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "s":
        return f"{v * 1000:.6g} ms"
    if unit == "fraction":
        return f"{v:.6g} ({v * 100:.4g}%)"
    return _num(v)


def slo_table(checks: list[dict], markdown: bool = False) -> str:
    """The SLO checks, each with its threshold as vk-eval read it (a unit slip shows here)."""
    rows = [[c["slo"], c["group"], _slo_value(c["value"], c.get("unit", "")),
             f"{c['op']} {_slo_value(c['threshold'], c.get('unit', ''))}", "ok" if c["ok"] else "MISSED"]
            for c in checks]
    return _heading("SLOs", markdown, 2) + _table(["slo", "group", "measured", "objective (as read)", "verdict"],
                                                   rows, markdown)


def _flatten(prefix: str, v: Any, rows: list, group: str) -> None:
    if isinstance(v, dict):
        for k, x in v.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), x, rows, group)
    elif isinstance(v, list):
        return
    else:
        rows.append([group, prefix, "" if v is None else v])


def to_csv(d: dict) -> str:
    """Long format: group, metric (dotted path, e.g. latency.ttft.p99), value (seconds for times)."""
    rows: list = []
    _flatten("", d["overall"], rows, "overall")
    for g in d["groups"]:
        _flatten("", g["summary"], rows, g["label"])
    for c in d.get("slo", []):
        rows.append([c["group"], f"slo.{c['slo']}", "ok" if c["ok"] else "missed"])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["group", "metric", "value"])
    w.writerows(rows)
    return buf.getvalue()
