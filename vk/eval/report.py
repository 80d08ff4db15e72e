"""``vk-eval report DIR``: one self-contained HTML page (figures embedded as base64 PNG)."""

from __future__ import annotations

import base64
import html
import os
import tempfile
from typing import Any

from vk.errors import VkError

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
.headline { font-size: 1.1em; font-family: monospace; list-style: none; padding-left: 0; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 12px; }
.warn { background: #fee; border: 2px solid #c00; padding: .5em 1em; margin: 1em 0; }
.warn li { color: #900; font-weight: bold; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; margin: .5em 0; }
.ok { color: #070; } .missed { color: #c00; font-weight: bold; }
"""


def _latency_table(d: dict, summ: dict) -> str:
    cols = [f"p{p:g}" for p in d["options"]["percentiles"]] + ["mean", "stddev", "min", "max"]
    rows = ["<tr><th>metric (ms)</th><th>n</th>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"]
    for name, st in summ["latency"].items():
        if not st or not st.get("n"):
            continue
        cells = "".join(f"<td>{st[c] * 1000:.2f}</td>" if st.get(c) is not None else "<td>-</td>" for c in cols)
        rows.append(f"<tr><td title='{html.escape(d['definitions'].get(name, ''))}'>{name}</td><td>{st['n']}</td>"
                    f"{cells}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def render_html(d: dict, figures: list[str]) -> str:
    from vk.eval.result import _slo_value, headline, to_text

    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>vk-eval report</title>",
             f"<style>{CSS}</style></head><body><h1>vk-eval report</h1>"]
    parts.append("<ul class='headline'>" + "".join(f"<li>{html.escape(ln)}</li>" for ln in headline(d)) + "</ul>")
    parts.append("<ul>" + "".join(
        f"<li>run <b>{html.escape(str(r['run_id']))}</b>, file {html.escape(str(r.get('file')))}, model "
        f"{html.escape(str(r.get('model')))}, api {html.escape(str(r.get('api')))}"
        + (" <span class='missed'>LAGGED</span>" if r.get("lagged") else "") + "</li>" for r in d["runs"]) + "</ul>")
    flags = list(d["overall"]["accuracy"].get("flags", []))
    for g in d["groups"]:
        flags += [f"[{g['label']}] {f}" for f in g["summary"]["accuracy"].get("flags", [])]
    if flags:
        parts.append("<div class='warn'><b>Warnings</b><ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in flags)
                     + "</ul></div>")
    if d.get("slo"):
        parts.append("<h2>SLOs</h2><table><tr><th>slo</th><th>group</th><th>measured</th><th>objective (as read)</th>"
                     "<th>verdict</th></tr>")
        for c in d["slo"]:
            cls = "ok" if c["ok"] else "missed"
            parts.append(f"<tr><td>{html.escape(c['slo'])}</td><td>{html.escape(c['group'])}</td>"
                         f"<td>{html.escape(_slo_value(c['value'], c.get('unit', '')))}</td>"
                         f"<td>{html.escape(c['op'] + ' ' + _slo_value(c['threshold'], c.get('unit', '')))}</td>"
                         f"<td class='{cls}'>{'ok' if c['ok'] else 'MISSED'}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Latency (overall)</h2>" + _latency_table(d, d["overall"]))
    parts.append("<h2>Figures</h2>")
    for p in figures:
        with open(p, "rb") as f:
            b64 = base64.b64encode(f.read()).decode()
        name = os.path.basename(p)
        parts.append(f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,{b64}'>"
                     f"<figcaption>{html.escape(name)}</figcaption></figure>")
    # every table of the text report, as HTML tables (from its markdown form; html=False escapes any markup in
    # the records' strings)
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    parts.append("<h2>All figures</h2>" + md.render(to_text(d, markdown=True, with_headline=False)))
    parts.append("</body></html>\n")
    return "".join(parts)


def write_report(inputs: Any, outdir: str, *, slo=None, goodput=None, percentiles=None, warmup=None, cooldown=None,
                 group_by=None, fluidity=None, validate: str = "auto", overlay: bool = True,
                 labels: list[str] | None = None) -> str:
    from vk.eval.core import Data, Options, evaluate_data
    from vk.eval.plots import plot_data

    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as e:
        raise VkError(f"{outdir}: cannot create the directory ({e.strerror})") from None
    opts = Options(percentiles=percentiles, slo=slo, goodput=goodput, warmup=warmup, cooldown=cooldown,
                   group_by=group_by, fluidity=fluidity)
    d = Data(inputs, extra_fields=opts.group_by, validate=validate, opts=opts)
    from vk.eval.outputs import EXIT_NO_SPACE, no_space

    path = os.path.join(outdir, "report.html")
    try:
        res = evaluate_data(d, opts)
        with tempfile.TemporaryDirectory(prefix="vk-report-") as tmp:
            figs = plot_data(d, tmp, overlay=overlay, labels=labels)
            page = render_html(res, figs)
    except VkError as e:
        if e.exit_code == EXIT_NO_SPACE:  # the figures, on their way into the page
            raise no_space(f"{path} (its figures: {e})") from None
        raise
    finally:
        d.con.close()
        d.inputs.close()
    from vk.eval.outputs import writing

    with writing(path), open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
