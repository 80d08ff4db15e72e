"""``vk-eval report DIR``: one interactive, self-contained HTML page (plotly, embedded inline; no network).

Every figure comes from vk-eval itself: the summary (``vk.eval.evaluate``'s result: statistics, SLOs, per-turn
and per-group figures, time series) and, for the distributions and the scatter over time, the per-request
metric columns of vk-eval's ``requests`` view (``vk.eval.sql``), restricted to the requests the summary
measures (ok, not warm-up, sent inside the steady window). The charting library is plotly.js as shipped inside
the ``plotly`` Python package, written once into the page, so the file opens anywhere, offline.
"""

from __future__ import annotations

import html
import os
from typing import Any

import numpy as np

from vk.errors import VkError

CDF_POINTS = 2000  # quantiles drawn per CDF (exact order statistics below this many requests)
SCATTER_POINTS = 20000  # requests drawn per run in the scatter over time (every k-th beyond)
CHART_HEIGHT = 420
DIST_METRICS = ("ttft", "tpot", "e2e", "ttft_from_intended")

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1250px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
.headline { font-size: 1.05em; font-family: monospace; list-style: none; padding-left: 0; }
.warn { background: #fee; border: 2px solid #c00; padding: .5em 1em; margin: 1em 0; }
.warn li { color: #900; font-weight: bold; }
table { border-collapse: collapse; font-size: 13px; margin: .5em 0 1em 0; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; vertical-align: top; }
td:first-child, th:first-child { text-align: left; }
th { background: #f3f3f3; }
.ok { color: #070; } .missed { color: #c00; font-weight: bold; }
.chart { border: 1px solid #ddd; margin: .6em 0; height: CHART_HEIGHTpx; }
.note { color: #555; font-size: 12px; }
nav a { margin-right: 1em; }
details { margin: 1em 0; }
""".replace("CHART_HEIGHT", str(CHART_HEIGHT))


def _esc(x: Any) -> str:
    return html.escape("-" if x is None else str(x))


class _Charts:
    """Figures as plotly divs with deterministic ids (the same input gives the same page, byte for byte)."""

    def __init__(self) -> None:
        self.n = 0

    def render(self, fig) -> str:
        self.n += 1
        fig.update_layout(template="plotly_white", height=CHART_HEIGHT, margin=dict(l=60, r=20, t=50, b=50),
                          legend=dict(orientation="h", y=-0.18))
        div = fig.to_html(include_plotlyjs=False, full_html=False, div_id=f"vk-chart-{self.n}",
                          config={"displaylogo": False, "responsive": True, "scrollZoom": True},
                          default_height=f"{CHART_HEIGHT}px")
        return f"<div class='chart' data-vk-chart='{self.n}'>{div}</div>"


def _requests(files: list[str], d: dict) -> dict[str, dict[str, np.ndarray]]:
    """Per input file: the measured ok requests' metric columns from vk-eval's requests view."""
    from vk.eval import sql

    cols = ["filename", "run_id", "t_sent", "warmup", *DIST_METRICS]
    names, rows = sql(f"SELECT {', '.join(cols)} FROM requests WHERE status = 'ok' ORDER BY filename, t_sent", files,
                      columns=True)
    windows = (d["overall"]["throughput"]["steady"].get("windows") or {})
    steady_given = d["options"].get("warmup") is not None or d["options"].get("cooldown") is not None
    out: dict[str, dict[str, list]] = {}
    for r in rows:
        rec = dict(zip(names, r, strict=True))
        if rec["warmup"]:
            continue
        w = windows.get(str(rec["run_id"]))
        if steady_given and w and rec["t_sent"] is not None and not (w[0] <= rec["t_sent"] <= w[1]):
            continue
        per = out.setdefault(str(rec["filename"]), {k: [] for k in ("t_sent", *DIST_METRICS)})
        for k in per:
            per[k].append(np.nan if rec[k] is None else float(rec[k]))
    return {f: {k: np.asarray(v, dtype=float) for k, v in per.items()} for f, per in out.items()}


def _labels(files: list[str], labels: list[str] | None) -> dict[str, str]:
    if labels and len(labels) != len(files):
        raise VkError(f"--label given {len(labels)} times for {len(files)} input files: give one per file")
    if labels:
        return dict(zip(files, labels, strict=True))
    return {f: os.path.basename(f).removesuffix(".jsonl") for f in files}


def _cdf(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = np.sort(v[np.isfinite(v)])
    if len(v) <= CDF_POINTS:
        return v, (np.arange(1, len(v) + 1) / len(v)) if len(v) else v
    q = np.linspace(0, 1, CDF_POINTS)
    return np.quantile(v, q), q


def _figures(d: dict, reqs: dict[str, dict[str, np.ndarray]], names: dict[str, str], charts: _Charts) -> list[str]:
    import plotly.graph_objects as go

    parts: list[str] = []
    label_of = {f: names.get(f, os.path.basename(f)) for f in reqs}
    # distributions
    parts.append("<h2 id='distributions'>Latency distributions</h2><p class='note'>Cumulative distributions of the "
                 "measured ok requests (ms); drag to zoom, double-click to reset, click a legend entry to hide a "
                 "run.</p>")
    for m in DIST_METRICS:
        fig = go.Figure()
        for f, cols in reqs.items():
            x, y = _cdf(cols[m])
            if len(x):
                fig.add_trace(go.Scatter(x=(x * 1000).round(4).tolist(), y=y.round(5).tolist(), mode="lines",
                                         name=label_of[f]))
        if not fig.data:
            continue
        fig.update_layout(title=f"{m}: cumulative distribution", xaxis_title=f"{m} (ms)",
                          yaxis_title="share of requests")
        parts.append(charts.render(fig))
        fig = go.Figure()
        for f, cols in reqs.items():
            v = cols[m][np.isfinite(cols[m])]
            if len(v):
                counts, edges = np.histogram(v * 1000, bins=min(60, max(5, int(np.sqrt(len(v))))))
                fig.add_trace(go.Bar(x=((edges[:-1] + edges[1:]) / 2).round(4).tolist(), y=counts.tolist(),
                                     width=float(edges[1] - edges[0]), name=label_of[f], opacity=0.6))
        fig.update_layout(title=f"{m}: histogram", xaxis_title=f"{m} (ms)", yaxis_title="requests", barmode="overlay")
        parts.append(charts.render(fig))
    # over time
    parts.append("<h2 id='over-time'>Latency and throughput over time</h2>")
    fig = go.Figure()
    for f, cols in reqs.items():
        t, v = cols["t_sent"], cols["ttft"]
        step = max(1, len(t) // SCATTER_POINTS)
        fig.add_trace(go.Scattergl(x=t[::step].round(4).tolist(), y=(v[::step] * 1000).round(4).tolist(),
                                   mode="markers", marker=dict(size=4), name=label_of[f]
                                   + (f" (every {step}th request)" if step > 1 else "")))
    fig.update_layout(title="TTFT of each request by the time it was sent", xaxis_title="t_sent (s from the run's "
                      "start)", yaxis_title="ttft (ms)")
    parts.append(charts.render(fig))
    ts = d.get("timeseries") or {}
    file_of = {str(r["run_id"]): r.get("file") for r in d["runs"]}
    for key, title, unit, scale in (("ttft_p50", "TTFT p50 per time bin", "ms", 1000),
                                    ("completed_per_s", "Completed requests per second", "req/s", 1),
                                    ("output_tokens_per_s", "Output tokens per second", "tokens/s", 1),
                                    ("concurrency", "Requests in flight", "requests", 1)):
        fig = go.Figure()
        for axis, series in ts.items():
            if key in series:
                y = [None if v is None else round(v * scale, 6) for v in series[key]]
                fig.add_trace(go.Scatter(x=series["t"], y=y, mode="lines+markers", marker=dict(size=3),
                                         name=names.get(file_of.get(str(axis)), str(axis))))
        if fig.data:
            fig.update_layout(title=title, xaxis_title="time (s from the run's start)", yaxis_title=unit)
            parts.append(charts.render(fig))
    # per turn
    summaries = [("all", d["overall"])] + [(g["label"], g["summary"]) for g in d["groups"]]
    if any((s.get("sessions") or {}).get("ttft_by_turn") for _, s in summaries):
        parts.append("<h2 id='per-turn'>Per turn</h2>")
        fig = go.Figure()
        for label, s in summaries:
            by = (s.get("sessions") or {}).get("ttft_by_turn") or {}
            if by and (label == "all" or d["groups"]):
                for stat in ("ttft_p50", "ttft_p90"):
                    fig.add_trace(go.Bar(x=list(by), y=[None if v[stat] is None else v[stat] * 1000
                                                        for v in by.values()], name=f"{label} {stat}"))
        fig.update_layout(title="TTFT by turn of the session", xaxis_title="turn", yaxis_title="ms",
                          barmode="group", xaxis_type="category")
        parts.append(charts.render(fig))
        rows = [[label, k, v["n"], _ms(v.get("ttft_p50")), _ms(v.get("ttft_p90")), _fmt(v.get("input_tokens_mean"))]
                for label, s in summaries for k, v in ((s.get("sessions") or {}).get("ttft_by_turn") or {}).items()]
        parts.append(_html_table(["group", "turn", "requests", "ttft p50 ms", "ttft p90 ms", "input tokens mean"], rows))
    # per group
    if d["groups"]:
        by = ", ".join(d["options"].get("group_by") or ["run"])
        parts.append(f"<h2 id='per-group'>Per {html.escape(by)}</h2>")
        labels = [g["label"] for g in d["groups"]]
        fig = go.Figure()
        for m in ("ttft", "tpot", "e2e"):
            for stat in ("p50", "p99"):
                fig.add_trace(go.Bar(x=labels, y=[_get_ms(g["summary"], m, stat) for g in d["groups"]],
                                     name=f"{m} {stat}"))
        fig.update_layout(title=f"Latency per {by}", yaxis_title="ms", barmode="group", xaxis_type="category")
        parts.append(charts.render(fig))
        fig = go.Figure()
        fig.add_trace(go.Bar(x=labels, y=[g["summary"]["throughput"]["whole"]["output_tokens_per_s"]
                                          for g in d["groups"]], name="output tokens/s"))
        fig.add_trace(go.Bar(x=labels, y=[g["summary"]["throughput"]["whole"]["requests_per_s"]
                                          for g in d["groups"]], name="requests/s", yaxis="y2"))
        fig.update_layout(title=f"Throughput per {by} (whole run)", barmode="group", xaxis_type="category",
                          yaxis=dict(title="output tokens/s"), yaxis2=dict(title="req/s", overlaying="y",
                                                                           side="right"))
        parts.append(charts.render(fig))
    return parts


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v * 1000:.2f}"


def _get_ms(s: dict, metric: str, stat: str) -> float | None:
    v = (s["latency"].get(metric) or {}).get(stat)
    return None if v is None else v * 1000


def _html_table(head: list[str], rows: list[list[Any]]) -> str:
    return ("<table><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")


def _latency_table(d: dict, s: dict) -> str:
    cols = [f"p{p:g}" for p in d["options"]["percentiles"]] + ["mean", "stddev", "min", "max"]
    rows = []
    for name, st in s["latency"].items():
        if st and st.get("n"):
            rows.append([name, st["n"], *[_ms(st.get(c)) for c in cols]])
    return _html_table(["metric (ms)", "n", *cols], rows)


def _config(d: dict) -> str:
    rows = []
    for r in d["runs"]:
        sch = r.get("schedule") or {}
        rows.append([r["run_id"], r.get("file"), r.get("model"), r.get("api"), r.get("endpoint"),
                     ", ".join(f"{k}={v}" for k, v in sch.items()) or "-", r.get("vk_version"), r.get("host"),
                     (r.get("run_end") or {}).get("ended"), "LAGGED" if r.get("lagged") else "no"])
    out = _html_table(["run", "file", "model", "api", "endpoint", "schedule", "vk", "host", "ended", "lagged"], rows)
    opts = d["options"]
    out += _html_table(["option", "value"], [[k, v if not isinstance(v, (list, dict)) else str(v)]
                                             for k, v in opts.items()])
    return out


def render_interactive(d: dict, reqs: dict[str, dict[str, np.ndarray]], names: dict[str, str]) -> str:
    from markdown_it import MarkdownIt
    from plotly.offline import get_plotlyjs

    from vk.eval.result import _slo_value, headline, to_text

    charts = _Charts()
    figs = _figures(d, reqs, names, charts)
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>vk-eval report</title>",
             f"<style>{CSS}</style>",
             # plotly.js from the plotly package, inline: the page needs no network
             "<script type='text/javascript'>", get_plotlyjs(), "</script></head><body><h1>vk-eval report</h1>",
             "<nav><a href='#slo'>SLOs</a><a href='#latency'>Latency</a><a href='#distributions'>Distributions</a>"
             "<a href='#over-time'>Over time</a><a href='#configuration'>Configuration</a>"
             "<a href='#all'>All figures and accuracy</a></nav>"]
    parts.append("<ul class='headline'>" + "".join(f"<li>{html.escape(ln)}</li>" for ln in headline(d)) + "</ul>")
    flags = list(d["overall"]["accuracy"].get("flags", []))
    for g in d["groups"]:
        flags += [f"[{g['label']}] {f}" for f in g["summary"]["accuracy"].get("flags", [])]
    flags += [f"INPUT: {w}" for w in d.get("warnings") or []]
    if flags:
        parts.append("<div class='warn'><b>Warnings</b><ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in flags)
                     + "</ul></div>")
    parts.append("<h2 id='slo'>SLOs</h2>")
    if d.get("slo"):
        parts.append("<table><tr><th>slo</th><th>group</th><th>measured</th><th>objective (as read)</th>"
                     "<th>verdict</th></tr>")
        for c in d["slo"]:
            cls = "ok" if c["ok"] else "missed"
            parts.append(f"<tr><td>{_esc(c['slo'])}</td><td>{_esc(c['group'])}</td>"
                         f"<td>{_esc(_slo_value(c['value'], c.get('unit', '')))}</td>"
                         f"<td>{_esc(c['op'] + ' ' + _slo_value(c['threshold'], c.get('unit', '')))}</td>"
                         f"<td class='{cls}'>{'ok' if c['ok'] else 'MISSED'}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p class='note'>none given (--slo)</p>")
    parts.append("<h2 id='latency'>Latency (overall, ms)</h2>" + _latency_table(d, d["overall"]))
    for g in d["groups"]:
        parts.append(f"<details><summary>Latency of {_esc(g['label'])}</summary>"
                     + _latency_table(d, g["summary"]) + "</details>")
    parts += figs
    parts.append("<h2 id='configuration'>Configuration</h2>" + _config(d))
    # every table and accuracy line of the text report, as HTML tables (html=False escapes markup in the records)
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    parts.append("<h2 id='all'>All figures and run accuracy</h2>"
                 + md.render(to_text(d, markdown=True, with_headline=False)))
    parts.append("</body></html>\n")
    return "".join(parts)


def write_interactive_report(inputs: Any, outdir: str, *, slo=None, goodput=None, percentiles=None, warmup=None,
                             cooldown=None, group_by=None, fluidity=None, validate: str = "auto",
                             labels: list[str] | None = None, name: str = "report.html") -> str:
    """Write ``outdir/report.html`` (interactive, self-contained); returns its path."""
    from vk.eval import evaluate
    from vk.eval.outputs import writing

    files = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    files = [str(f) for f in files]
    if "-" in files:
        raise VkError("vk-eval report: give files (the report reads each twice), not - (stdin)")
    names = _labels(files, labels)
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as e:
        raise VkError(f"{outdir}: cannot create the directory ({e.strerror})") from None
    d = evaluate(files, percentiles=percentiles, slo=slo, goodput=goodput, warmup=warmup, cooldown=cooldown,
                 group_by=group_by, fluidity=fluidity, validate=validate).to_dict()
    page = render_interactive(d, _requests(files, d), names)
    path = os.path.join(outdir, name)
    with writing(path), open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
