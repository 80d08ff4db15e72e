"""``vk-eval report --xlsx FILE``: the run(s) as an Excel workbook (XlsxWriter), for people who pivot in spreadsheets.

Sheets: ``summary`` (the overall figures), one summary sheet per group (per run when several are given, per
sweep probe with ``--group-by sweep_probe``), ``groups`` (one row per group, with charts) when there are groups,
``slo`` when objectives were given, ``over time`` (vk-eval's time series, with charts) and ``requests`` (one row
per response record, vk-eval's per-request metric columns). Every figure is vk-eval's own (``vk.eval.evaluate``
and its ``requests`` view); times are seconds, as in ``vk-eval --json``, except the latency table at the top of
a summary sheet, in milliseconds. A summary sheet's lower block lists every figure of the JSON summary as
(dotted path, value), the same keys as ``vk-eval --format csv``.
"""

from __future__ import annotations

import os
from typing import Any

from vk.errors import VkError

MAX_ROWS = 1_048_576  # Excel's limit per sheet
REQUEST_COLUMNS = ("run_id", "session_id", "request_id", "session_index", "worker", "warmup", "status", "http_status",
                   "error", "t_intended", "t_dispatched", "t_sent", "t_first_byte", "t_first_token",
                   "t_first_content", "t_last_token", "t_done", "ttft", "ttfc", "tpot", "e2e", "ttft_from_intended",
                   "e2e_from_intended", "dispatch_lag", "queue_delay", "prompt_tokens", "output_tokens",
                   "cached_tokens", "target_input_tokens", "target_output_tokens", "finish_reason", "filename")


def _flat(prefix: str, v: Any, out: list[tuple[str, Any]]) -> None:
    if isinstance(v, dict):
        for k, x in v.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), x, out)
    elif not isinstance(v, list):
        out.append((prefix, v))


def _sheet_name(name: str, used: set[str]) -> str:
    """Excel's rules: at most 31 characters, none of []:*?/\\, unique regardless of case."""
    clean = "".join("_" if c in "[]:*?/\\" else c for c in name).strip("'")[:31] or "sheet"
    out, i = clean, 2
    while out.lower() in used:
        suffix = f" ({i})"
        out = clean[: 31 - len(suffix)] + suffix
        i += 1
    used.add(out.lower())
    return out


def _summary_sheet(wb, ws, d: dict, s: dict, title: str, fmt: dict) -> None:
    ws.write(0, 0, title, fmt["title"])
    cols = [f"p{p:g}" for p in d["options"]["percentiles"]] + ["mean", "stddev", "min", "max"]
    ws.write_row(2, 0, ["latency (ms)", "n", *cols], fmt["head"])
    row = 3
    first = row
    for name, st in s["latency"].items():
        if not st or not st.get("n"):
            continue
        ws.write(row, 0, name)
        ws.write(row, 1, st["n"])
        for j, c in enumerate(cols):
            v = st.get(c)
            if v is not None:
                ws.write_number(row, 2 + j, v * 1000, fmt["ms"])
        row += 1
    if row > first:  # the latency percentiles as a chart (where genai-bench puts its plots: beside the figures)
        chart = wb.add_chart({"type": "column"})
        pcols = [j for j, c in enumerate(cols) if c.startswith("p")]
        for r in range(first, min(row, first + 6)):
            chart.add_series({"name": [ws.name, r, 0], "categories": [ws.name, 2, 2 + pcols[0], 2, 2 + pcols[-1]],
                              "values": [ws.name, r, 2 + pcols[0], r, 2 + pcols[-1]]})
        chart.set_title({"name": "latency percentiles (ms)"})
        chart.set_y_axis({"name": "ms"})
        ws.insert_chart(2, len(cols) + 3, chart, {"x_scale": 1.4, "y_scale": 1.2})
    row = max(row + 2, 22)
    ws.write_row(row, 0, ["figure (seconds for times, as in vk-eval --json)", "value"], fmt["head"])
    flat: list[tuple[str, Any]] = []
    _flat("", s, flat)
    for k, v in flat:
        row += 1
        ws.write_string(row, 0, k)
        if isinstance(v, bool):
            ws.write_boolean(row, 1, v)
        elif isinstance(v, (int, float)):
            ws.write_number(row, 1, v)
        elif v is None:
            ws.write_blank(row, 1, None)
        else:
            ws.write_string(row, 1, str(v))
    ws.set_column(0, 0, 44)
    ws.set_column(1, len(cols) + 2, 11)


def _groups_sheet(wb, ws, d: dict, fmt: dict) -> None:
    by = ", ".join(d["options"].get("group_by") or ["run"])
    head = [by, "requests", "error_rate", "requests_per_s", "output_tokens_per_s", "ttft p50 ms", "ttft p99 ms",
            "tpot p50 ms", "tpot p99 ms", "e2e p50 ms", "e2e p99 ms", "lagged"]
    ws.write_row(0, 0, head, fmt["head"])
    for i, g in enumerate(d["groups"], 1):
        s = g["summary"]
        w = s["throughput"]["whole"]
        row = [g["label"], s["counts"]["requests"], s["counts"]["error_rate"], w["requests_per_s"],
               w["output_tokens_per_s"]]
        for m in ("ttft", "tpot", "e2e"):
            for st in ("p50", "p99"):
                v = (s["latency"].get(m) or {}).get(st)
                row.append(None if v is None else v * 1000)
        row.append(bool(s["accuracy"].get("lagged_runs")))
        for j, v in enumerate(row):
            ws.write(i, j, v)
    n = len(d["groups"])
    for title, cols, y in (("latency per " + by, (5, 6, 7, 8), "ms"), ("throughput per " + by, (4,), "tokens/s")):
        chart = wb.add_chart({"type": "column"})
        for c in cols:
            chart.add_series({"name": [ws.name, 0, c], "categories": [ws.name, 1, 0, n, 0],
                              "values": [ws.name, 1, c, n, c]})
        chart.set_title({"name": title})
        chart.set_y_axis({"name": y})
        ws.insert_chart(n + 3 if y == "ms" else n + 20, 0, chart, {"x_scale": 1.5, "y_scale": 1.1})
    ws.set_column(0, 0, 24)
    ws.set_column(1, len(head), 13)


def _timeseries_sheet(wb, ws, d: dict, fmt: dict) -> None:
    col = 0
    charts = {k: wb.add_chart({"type": "line"}) for k in ("output_tokens_per_s", "completed_per_s", "ttft_p50")}
    for axis, series in (d.get("timeseries") or {}).items():
        keys = [k for k in ("t", "concurrency", "completed_per_s", "output_tokens_per_s", "ttft_p50") if k in series]
        ws.write(0, col, f"run {axis}", fmt["head"])
        ws.write_row(1, col, keys, fmt["head"])
        n = len(series["t"])
        for j, k in enumerate(keys):
            ws.write_column(2, col + j, [v if v is not None else "" for v in series[k]])
        for k, chart in charts.items():
            if k in keys:
                j = keys.index(k)
                chart.add_series({"name": f"{axis}"[:60], "categories": [ws.name, 2, col, n + 1, col],
                                  "values": [ws.name, 2, col + j, n + 1, col + j]})
        col += len(keys) + 1
    for i, (k, chart) in enumerate(charts.items()):
        chart.set_title({"name": k.replace("_", " ") + (" (s)" if k == "ttft_p50" else "")})
        chart.set_x_axis({"name": "time bin"})
        ws.insert_chart(1 + i * 18, col + 1, chart, {"x_scale": 1.4})


def _requests_sheet(ws, files: list[str], fmt: dict) -> int:
    from vk.eval import sql

    names, rows = sql(f"SELECT {', '.join(REQUEST_COLUMNS)} FROM requests ORDER BY filename, t_intended, row", files,
                      columns=True)
    ws.write_row(0, 0, names, fmt["head"])
    ws.freeze_panes(1, 0)
    limit = MAX_ROWS - 2
    for i, r in enumerate(rows[:limit], 1):
        for j, v in enumerate(r):
            if v is None:
                continue
            if isinstance(v, bool):
                ws.write_boolean(i, j, v)
            elif isinstance(v, (int, float)):
                ws.write_number(i, j, v)
            else:
                ws.write_string(i, j, str(v))
    if len(rows) > limit:
        ws.write(limit + 1, 0, f"{len(rows) - limit} more requests left out: Excel holds {MAX_ROWS} rows a sheet "
                 "(all of them: vk-eval sql)")
    ws.autofilter(0, 0, min(len(rows), limit), len(names) - 1)
    return len(rows)


def write_xlsx(inputs: Any, path: str, *, slo=None, goodput=None, percentiles=None, warmup=None, cooldown=None,
               group_by=None, fluidity=None, validate: str = "auto") -> str:
    """Write the workbook to ``path``; returns it."""
    try:
        import xlsxwriter
        import xlsxwriter.exceptions
    except ImportError:
        raise VkError("vk-eval report --xlsx needs XlsxWriter: pip install XlsxWriter") from None
    from vk.eval import evaluate
    from vk.eval.outputs import writing

    files = [str(inputs)] if isinstance(inputs, (str, os.PathLike)) else [str(f) for f in inputs]
    if "-" in files:
        raise VkError("vk-eval report --xlsx: give files (the workbook reads each twice), not - (stdin)")
    d = evaluate(files, percentiles=percentiles, slo=slo, goodput=goodput, warmup=warmup, cooldown=cooldown,
                 group_by=group_by, fluidity=fluidity, validate=validate).to_dict()
    tmp = path + ".part"
    try:
        with writing(path):
            wb = xlsxwriter.Workbook(tmp, {"nan_inf_to_errors": True})
            fmt = {"head": wb.add_format({"bold": True, "bg_color": "#EEEEEE", "border": 1}),
                   "title": wb.add_format({"bold": True, "font_size": 14}),
                   "ms": wb.add_format({"num_format": "0.000"})}
            used: set[str] = set()
            runs = ", ".join(str(r["run_id"]) for r in d["runs"])
            _summary_sheet(wb, wb.add_worksheet(_sheet_name("summary", used)), d, d["overall"],
                           f"vk-eval summary: {len(d['runs'])} run(s) ({runs})", fmt)
            by = d["options"].get("group_by") or ["run"]
            stem = {str(r["run_id"]): os.path.basename(str(r.get("file"))).removesuffix(".jsonl") for r in d["runs"]}
            for g in d["groups"]:  # a run's sheet is named after its file (a run id is longer than Excel allows)
                name = stem.get(g["label"], g["label"]) if by == ["run"] else g["label"]
                _summary_sheet(wb, wb.add_worksheet(_sheet_name(name, used)), d, g["summary"],
                               f"{', '.join(by)} = {g['label']}", fmt)
            if d["groups"]:
                _groups_sheet(wb, wb.add_worksheet(_sheet_name("groups", used)), d, fmt)
            if d.get("slo"):
                ws = wb.add_worksheet(_sheet_name("slo", used))
                head = ["slo", "group", "metric", "stat", "op", "threshold", "unit", "value", "ok"]
                ws.write_row(0, 0, head, fmt["head"])
                for i, c in enumerate(d["slo"], 1):
                    ws.write_row(i, 0, [c.get(k) if c.get(k) is not None else "" for k in head])
                ws.set_column(0, 1, 24)
            _timeseries_sheet(wb, wb.add_worksheet(_sheet_name("over time", used)), d, fmt)
            _requests_sheet(wb.add_worksheet(_sheet_name("requests", used)), files, fmt)
            try:
                wb.close()
            except xlsxwriter.exceptions.FileCreateError as e:  # XlsxWriter wraps the OSError: unwrap it for
                inner = e.args[0] if e.args else None  # writing() (a full disk is exit 74)
                if isinstance(inner, OSError):
                    raise inner from None
                raise VkError(f"{path}: cannot write ({e})") from None
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
