"""vk-eval report (interactive HTML, opened in headless Chromium), report --xlsx (read back with openpyxl) and
vk-eval trace (the trace-event format), over real vk-send runs against vk-serve."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.browser import chromium, inspect_page
from tests.conftest import run_vk

WORKLOAD = """
session_generator:
  type: synthetic
  session_graph:
    type: linear
    num_request_generator: {type: uniform, min: 1, max: 3}
    request_wait_generator: {type: fixed, value: 0.05}
    inherit_history: true
  channels:
    - type: text
      body_length_generator: {type: fixed, value: 64}
  output_spec:
    text:
      output_length_generator: {type: fixed, value: 12}
"""
SLO = "ttft:p90<500ms,error_rate<1%"
COLORED = 0.003  # share of a chart's pixels that must be coloured (the traces; axes and text are grey)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real runs of the same schedule: a (TTFT 20 ms) and b (TTFT 50 ms, 10% HTTP 500)."""
    from tests.conftest import Server

    tmp = tmp_path_factory.mktemp("reports")
    cfg = tmp / "w.yaml"
    cfg.write_text(WORKLOAD)
    sessions = run_vk("vk-gen", str(cfg), "--seed", "4", "--count", "25", check=True).stdout
    sched = tmp / "sched.jsonl"
    sched.write_bytes(run_vk("vk-schedule", "--poisson", "25", "--seed", "4", "-q", input=sessions, check=True).stdout)
    out = []
    for name, args in (("a", ["--ttft", "0.02", "--tpot", "0.003"]),
                       ("b", ["--ttft", "0.05", "--tpot", "0.003", "--fault-500", "0.1", "--seed", "2"])):
        server = Server(*args)
        try:
            run_vk("vk-send", str(sched), "--api", server.url, "--workers", "1", "-o", str(tmp / f"{name}.jsonl"),
                   check=True)
        finally:
            server.stop()
        out.append(tmp / f"{name}.jsonl")
    return out


def records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def colored_share(png: bytes) -> float:
    import matplotlib.image as mpimg

    a = mpimg.imread(io.BytesIO(png), format="png")[..., :3]
    return float(((a.max(axis=-1) - a.min(axis=-1)) > 0.2).mean())


# ---------------------------------------------------------------------------------------------------------------
# HTML


def test_html_report_loads_in_chromium_and_its_charts_render(runs, tmp_path):
    if chromium() is None:
        pytest.skip("no chromium (apt-get install chromium; .ci/run installs it)")
    a, b = runs
    p = run_vk("vk-eval", "report", str(tmp_path / "rep"), str(a), str(b), "--slo", SLO, "--label", "fast",
               "--label", "slow")
    assert p.returncode == 0, p.stderr.decode()
    page = tmp_path / "rep" / "report.html"
    text = page.read_text()
    assert text.count("<script") == text.count("</script>")  # plotly.js inline; the network check is below
    for section in ("id='slo'", "id='distributions'", "id='over-time'", "id='per-turn'", "id='per-group'",
                    "id='configuration'", "Run accuracy"):
        assert section in text, section
    assert "<table>" in text and "<pre>" not in text  # tables as tables
    assert "fast" in text and "slow" in text and "MISSED" in text  # b misses error_rate<1%

    res = inspect_page(page)
    assert res["errors"] == []
    assert res["requests"] == [page.resolve().as_uri()]  # nothing but the page itself: no network
    charts = res["charts"]
    assert len(charts) >= 12
    for i, (c, shot) in enumerate(zip(charts, res["screenshots"], strict=True)):
        assert c["svg"] >= 1 and c["traces"] >= 1 and c["height"] > 300, (i, c)
        assert colored_share(shot) > COLORED, (i, c, colored_share(shot))
    # overlays: a CDF of the two runs has two traces
    assert charts[0]["traces"] == 2


def test_blank_chart_fails_the_render_check(tmp_path):
    """The non-blank check can fail: a plotly chart with axes and no data has no coloured pixels."""
    if chromium() is None:
        pytest.skip("no chromium")
    from plotly.offline import get_plotlyjs

    page = tmp_path / "blank.html"
    page.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'><script>" + get_plotlyjs() + "</script></head>"
                    "<body><div id='c' style='height:400px;width:900px'></div><script>Plotly.newPlot('c', [],"
                    " {title: {text: 'nothing'}});</script></body></html>")
    res = inspect_page(page)
    assert res["errors"] == [] and len(res["charts"]) == 1
    assert colored_share(res["screenshots"][0]) < COLORED


def test_html_report_is_reproducible(runs, tmp_path):
    from vk.eval.html_report import write_interactive_report

    one = Path(write_interactive_report([str(x) for x in runs], str(tmp_path / "1"), slo=SLO)).read_bytes()
    two = Path(write_interactive_report([str(x) for x in runs], str(tmp_path / "2"), slo=SLO)).read_bytes()
    assert one == two


# ---------------------------------------------------------------------------------------------------------------
# workbook


def _flat(prefix, v, out):
    if isinstance(v, dict):
        for k, x in v.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), x, out)
    elif not isinstance(v, list):
        out[prefix] = v


def _sheet_figures(ws) -> dict:
    out = {}
    rows = list(ws.iter_rows(values_only=True))
    start = next(i for i, r in enumerate(rows) if r and str(r[0] or "").startswith("figure ("))
    for r in rows[start + 1:]:
        if r[0] is not None:
            out[r[0]] = r[1]
    return out


def test_workbook_cells_equal_vk_eval_json(runs, tmp_path):
    import openpyxl

    a, b = runs
    book = tmp_path / "book.xlsx"
    p = run_vk("vk-eval", "report", "--xlsx", str(book), str(a), str(b), "--slo", SLO)  # no DIR: the workbook only
    assert p.returncode == 0, p.stderr.decode()
    assert not (tmp_path / "report.html").exists()
    d = json.loads(run_vk("vk-eval", str(a), str(b), "--slo", SLO, "--json", check=True).stdout)
    wb = openpyxl.load_workbook(book, read_only=True)
    assert wb.sheetnames == ["summary", "a", "b", "groups", "slo", "over time", "requests"]  # a run: its file's name
    assert [wb[s]["A1"].value for s in ("a", "b")] == [f"run = {g['label']}" for g in d["groups"]]
    for sheet, summary in [("summary", d["overall"]), ("a", d["groups"][0]["summary"]),
                           ("b", d["groups"][1]["summary"])]:
        want: dict = {}
        _flat("", summary, want)
        got = _sheet_figures(wb[sheet])
        assert set(got) == set(want), sheet
        for k, v in want.items():
            if isinstance(v, float):  # XlsxWriter writes 16 significant digits (Excel keeps 15)
                assert got[k] == pytest.approx(v, rel=1e-15, abs=0), (sheet, k, got[k], v)
            else:
                assert got[k] == v and type(got[k]) is type(v), (sheet, k, got[k], v)
        lat = {r[0]: r for r in wb[sheet].iter_rows(min_row=4, max_row=20, values_only=True) if r[0]}
        assert lat["ttft"][2] == pytest.approx(summary["latency"]["ttft"]["p50"] * 1000, rel=1e-12)
    slo_rows = list(wb["slo"].iter_rows(min_row=2, values_only=True))
    assert [(r[0], r[1], r[8]) for r in slo_rows] == [(c["slo"], c["group"], c["ok"]) for c in d["slo"]]
    req = list(wb["requests"].iter_rows(values_only=True))
    n = sum(1 for f in runs for r in records(f) if r["kind"] == "response")
    assert len(req) - 1 == n
    head = req[0]
    ttft = [r[head.index("ttft")] for r in req[1:] if r[head.index("status")] == "ok"]
    assert np.percentile(ttft, 50) == pytest.approx(d["overall"]["latency"]["ttft"]["p50"], rel=1e-12)
    charts = [x for x in zipfile.ZipFile(book).namelist() if x.startswith("xl/charts/chart")]
    assert len(charts) >= 5


# ---------------------------------------------------------------------------------------------------------------
# trace


def _check_trace(path: Path, responses: list[dict]) -> list[dict]:
    doc = json.loads(path.read_text())
    ev = doc["traceEvents"]
    assert all("ph" in e and "pid" in e and "tid" in e for e in ev)
    slices = [e for e in ev if e["ph"] == "X"]
    for e in slices:
        assert all(k in e for k in ("ph", "ts", "dur", "pid", "tid", "name")), e
        assert e["dur"] >= 0
    reqs = [e for e in slices if e["cat"] == "request"]
    assert len(reqs) == len(responses)
    assert sorted((e["args"]["session_id"], e["args"]["request_id"]) for e in reqs) == sorted(
        (r["session_id"], r["request_id"]) for r in responses)
    by_id = {(e["tid"], e["args"]["request_id"], e["ts"]): e for e in reqs}
    for e in slices:
        if e["cat"] == "phase":  # inside its request, on its track
            parent = [r for (tid, rid, _), r in by_id.items() if tid == e["tid"] and rid == e["args"]["request_id"]
                      and r["ts"] <= e["ts"] and e["ts"] + e["dur"] <= r["ts"] + r["dur"] + 1e-6]
            assert parent, e
    # a track's slices never overlap unless nested (what a trace viewer needs)
    for tid in {e["tid"] for e in reqs}:
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in reqs if e["tid"] == tid)
        assert all(b0 >= a1 - 1e-6 for (_, a1), (b0, _) in zip(spans, spans[1:], strict=False)), tid
    names = {e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
    return ev if names else []


def test_trace_is_valid_trace_event_json(runs, tmp_path):
    a, b = runs
    for src in (a, b):
        resp = [r for r in records(src) if r["kind"] == "response"]
        out = tmp_path / f"{src.stem}.trace.json"
        p = run_vk("vk-eval", "trace", str(src), "-o", str(out))
        assert p.returncode == 0, p.stderr.decode()
        ev = _check_trace(out, resp)
        tracks = {e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
        assert {t.split(" #")[0] for t in tracks} == {f"session {r['session_id']}" for r in resp}
        errors = [e for e in ev if e["ph"] == "i" and e.get("cat") == "event" and e["name"] == "error"]
        assert len(errors) == sum(r["status"] == "error" for r in resp)
        phases = {e["name"] for e in ev if e.get("cat") == "phase"}
        assert phases == {"queued", "waiting for first token", "decoding"}
        out_w = tmp_path / f"{src.stem}.workers.json"
        run_vk("vk-eval", "trace", str(src), "--by", "worker", "-o", str(out_w), check=True)
        ev = _check_trace(out_w, resp)
        assert any(e["args"]["name"].startswith("worker 0") for e in ev if e["ph"] == "M" and
                   e["name"] == "thread_name")


def test_trace_to_stdout_and_bad_input(tmp_path):
    src = Path(__file__).parent / "data" / "eval" / "small-run.jsonl"
    p = subprocess.run([sys.executable, "-m", "vk.eval.cli", "trace", str(src)], capture_output=True)
    assert p.returncode == 0
    ev = json.loads(p.stdout)["traceEvents"]
    assert sum(1 for e in ev if e.get("cat") == "request") == 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text(src.read_text().splitlines()[0] + "\n{not json\n")
    p = run_vk("vk-eval", "trace", str(bad), "-o", str(tmp_path / "t.json"))
    assert p.returncode == 2 and b"bad.jsonl:2" in p.stderr and b"Traceback" not in p.stderr
    assert not (tmp_path / "t.json").exists() and not (tmp_path / "t.json.part").exists()


def test_full_disk_is_one_line_exit_74(tmp_path):
    """The workbook and the trace on a full disk (a 1-block file-size limit): one line naming the file, exit 74,
    no half-written file left behind."""
    src = str(Path(__file__).parent / "data" / "eval" / "small-run.jsonl")
    for args, name in ((["report", "--xlsx", str(tmp_path / "b.xlsx"), src], "b.xlsx"),
                       (["trace", src, "-o", str(tmp_path / "t.json")], "t.json")):
        cmd = [sys.executable, "-m", "vk.eval.cli", *args]
        q = subprocess.run(["bash", "-c", 'ulimit -f 1; exec "$@"', "sh", *cmd], capture_output=True)
        err = q.stderr.decode().strip()
        assert q.returncode == 74 and "no space left" in err and name in err, err
        assert len(err.splitlines()) == 1 and not (tmp_path / name).exists()
        assert not (tmp_path / (name + ".part")).exists()
