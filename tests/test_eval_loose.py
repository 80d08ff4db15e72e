"""Loose ends after the merge: per-node clocks of Ray runs in vk-eval's accuracy section, retried and warned
requests, runs that ended early named in the headline, the server header in the report, vk-sweep's error rate as
vk-eval counts it, and --save-text keeping reasoning text. Hand-built records with known answers."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from test_eval import RUN, resp

from vk.eval import evaluate


def write(path, recs):
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    return str(path)


def _ok(rid, t, **kw):
    return resp(rid, t_intended=t, events=[(t + 0.1, "c", 1), (t + 0.2, "c", 1)],
                usage={"prompt_tokens": 10, "completion_tokens": 2}, **kw)


END = {"kind": "run_end", "v": 1, "run_id": "run-a", "requests": 0, "statuses": {}, "errors": 0, "duration": 1.0,
       "ended": "complete", "lagged": False}


def test_sweep_error_rate_leaves_out_cancelled_counts_skipped(tmp_path):
    """4 ok, 1 error, 2 cancelled, 1 skipped: the run's stop cancelled 2 (left out); of the other 6, the error and
    the request skipped after it failed (2 of 6), as vk-eval counts them."""
    from vk.sweep import verdict

    recs = [RUN] + [_ok(f"ok{i}", float(i)) for i in range(4)]
    recs += [resp("e", t_intended=5.0, status="error", t_done=5.1, error="HTTP 500")]
    recs += [resp(f"c{i}", t_intended=6.0 + i, status="cancelled", t_done=6.5 + i, error="stopped") for i in range(2)]
    recs += [resp("s", t_intended=9.0, status="skipped", t_sent=None, t_dispatched=None, error="parent failed")]
    p = write(tmp_path / "run.jsonl", recs)
    ev = evaluate(p).to_dict()
    assert ev["overall"]["counts"]["error_rate"] == 2 / 6
    cols = verdict.request_columns(p)
    x, stat = verdict.sample_for({"metric": "error_rate", "stat": None}, cols, None)
    assert float(getattr(np, stat)(x)) == 2 / 6
    assert len(x) == 6
    x, _ = verdict.sample_for({"metric": "attainment", "stat": None}, cols, "ttft<1s")
    assert float(x.mean()) == 4 / 6  # 4 good of the 6 counted, as vk-eval's goodput counts them
    assert ev["overall"]["counts"]["counted"] == 6


RAY = {"address": "auto", "workers_per_node": 1, "nodes": [
    {"node": 0, "node_id": "n0", "host": "alpha", "ip": "127.0.0.1", "workers": [0], "open_files_limit": 1024,
     "clock_offset": 0.0, "clock_uncertainty": 0.0001, "clock_rtt": 0.0002, "clock_samples": 16},
    {"node": 1, "node_id": "n1", "host": "beta", "ip": "127.0.0.1", "workers": [1], "open_files_limit": 1024,
     "clock_offset": -0.0123, "clock_uncertainty": 0.0004, "clock_rtt": 0.0008, "clock_samples": 16}]}
RAY_NODES = [
    {"node": 0, "workers_lost": [], "dispatch_lag_p50": 0.0001, "dispatch_lag_p99": 0.0002, "dispatch_lag_max": 0.0003,
     "lagged": False, "clock_drift": 0.00005, "clock_uncertainty_end": 0.0001},
    {"node": 1, "workers_lost": [], "dispatch_lag_p50": 0.001, "dispatch_lag_p99": 0.004, "dispatch_lag_max": 0.005,
     "lagged": True, "clock_drift": -0.0007, "clock_uncertainty_end": 0.0004}]


def ray_run(tmp_path):
    recs = [{**RUN, "ray": RAY}]
    recs += [_ok(f"r{i}", float(i), node=i % 2, worker=str(i % 2)) for i in range(6)]
    recs.append({**END, "requests": 6, "statuses": {"ok": 6}, "ray_nodes": RAY_NODES, "retried": 0})
    return write(tmp_path / "ray.jsonl", recs)


def test_ray_run_accuracy_shows_each_node_clock_and_the_error_bound(tmp_path):
    """Node 1: uncertainty 0.4 ms + |drift -0.7 ms| = 1.1 ms; node 0: 0.1 + 0.05 = 0.15 ms; the run's bound is the
    larger. Per-node lag verdicts from the footer, next to the run's."""
    res = evaluate(ray_run(tmp_path))
    clock = res.to_dict()["overall"]["accuracy"]["ray_clock"]
    assert len(clock) == 1 and clock[0]["run_id"] == "run-a"
    n0, n1 = clock[0]["nodes"]
    assert (n0["host"], n0["clock_uncertainty"], n0["clock_drift"]) == ("alpha", 0.0001, 0.00005)
    assert abs(n0["error_bound"] - 0.00015) < 1e-12
    assert (n1["clock_offset"], n1["clock_drift"]) == (-0.0123, -0.0007)
    assert abs(n1["error_bound"] - 0.0011) < 1e-12
    assert abs(clock[0]["error_bound"] - 0.0011) < 1e-12
    assert (n0["lagged"], n1["lagged"]) == (False, True) and clock[0]["lagged_nodes"] == [1]
    text = res.format("table")
    assert "node 1 (beta): offset -12.30 ms +/- 0.40 ms, drift -0.70 ms: times within 1.10 ms" in text
    assert "vk-send's lag verdict: LAGGED (dispatch lag p99 4.00 ms)" in text
    assert "times across its 2 nodes are on one axis within 1.10 ms" in text
    assert "lag verdict, run run-a" in text  # the run's own verdict is still there, next to the nodes'
    md = res.format("markdown")
    assert "- clock, run run-a node 0 (alpha)" in md
    from vk.eval.report import render_html

    assert "node 1 (beta): offset -12.30 ms" in render_html(res.to_dict(), [])


def test_a_node_lost_before_the_end_has_no_drift_and_says_so(tmp_path):
    p = ray_run(tmp_path)
    recs = [orjson.loads(x) for x in open(p, "rb")]
    del recs[-1]["ray_nodes"][1]["clock_drift"]
    recs[-1]["ray_nodes"][1]["workers_lost"] = [1]
    res = evaluate(write(tmp_path / "lost.jsonl", recs))
    n1 = res.to_dict()["overall"]["accuracy"]["ray_clock"][0]["nodes"][1]
    assert n1["drift_measured"] is False and abs(n1["error_bound"] - 0.0004) < 1e-12
    assert "drift not measured (the node was gone at the end)" in res.format("table")


def test_local_runs_have_no_ray_clock(tmp_path):
    res = evaluate(write(tmp_path / "a.jsonl", [RUN, _ok("a", 0.0), _ok("b", 1.0)]))
    assert "ray_clock" not in res.to_dict()["overall"]["accuracy"]
    assert "clock, run" not in res.format("table")


def test_retried_and_warned_answers_are_counted(tmp_path):
    recs = [RUN, _ok("a", 0.0, attempts=2), _ok("b", 1.0, attempts=1),
            _ok("c", 2.0, warning="malformed SSE event #2: not JSON"), _ok("d", 3.0),
            resp("e", t_intended=4.0, status="error", t_done=4.1, error="HTTP 500", attempts=2),
            {**END, "requests": 5, "retried": 2}]
    res = evaluate(write(tmp_path / "r.jsonl", recs))
    d = res.to_dict()
    c = d["overall"]["counts"]
    assert (c["retried"], c["ok_with_warning"]) == (2, 1)
    assert d["runs"][0]["run_end"]["retried"] == 2
    text = res.format("table")
    assert "2 requests retried on a new connection" in text and "1 ok answers with a malformed SSE line" in text
    assert "errors    1 of 5 requests (20.0%): error 1; retried 2, ok with warning 1" in text


def test_a_run_that_ended_early_is_named_in_the_headline(tmp_path):
    for ended in ("worker_lost", "unreachable", "stopped"):
        recs = [RUN, _ok("a", 0.0), {**END, "requests": 1, "ended": ended, "reason": "why"}]
        res = evaluate(write(tmp_path / f"{ended}.jsonl", recs))
        head = [ln for ln in res.format("table").splitlines() if ln.strip().startswith("warnings")]
        assert head and f"run run-a ended {ended}" in head[0], head
    recs = [RUN, _ok("a", 0.0), END]
    head = [ln for ln in evaluate(write(tmp_path / "ok.jsonl", recs)).format("table").splitlines()
            if ln.strip().startswith("warnings")]
    assert "ended" not in head[0]


def test_the_server_vk_started_is_in_the_configuration(tmp_path):
    server = {"cmd": "vk-serve --port 8000", "params": {"port": 8000}, "pid": 1, "api": "http://127.0.0.1:8000/v1",
              "log": "server.log", "start_epoch": 1.7e9, "ready_s": 1.25, "ready_probe": "/health",
              "version": {"version": "0.9"}, "models": ["sim", "sim-2"]}
    res = evaluate(write(tmp_path / "s.jsonl", [{**RUN, "server": server}, _ok("a", 0.0), END]))
    text = res.format("table")
    assert "server (started by vk): vk-serve --port 8000; ready in 1.25 s; version {'version': '0.9'}; models sim, sim-2" \
        in text
    assert res.to_dict()["runs"][0]["server"]["ready_s"] == 1.25


@pytest.mark.parametrize("stream", [True, False])
def test_save_text_keeps_reasoning_text_next_to_the_content(serve, tmp_path, stream):
    from conftest import run_vk
    from test_send import open_schedule, req, session

    srv = serve("--ttft", "0.001", "--tpot", "0.001", "--reasoning-tokens", "3")
    sched = open_schedule([session("s", [req("a", out=8)])], [0.0])
    path = write(tmp_path / "s.jsonl", sched)
    out = tmp_path / "run.jsonl"
    p = run_vk("vk-send", path, "--api", srv.url, "-o", str(out), "--workers", "1", "--save-text",
               *(() if stream else ("--no-stream",)))
    assert p.returncode == 0, p.stderr.decode()
    r = [orjson.loads(x) for x in out.read_bytes().splitlines() if b'"response"' in x][0]
    assert r["status"] == "ok" and r["usage"]["reasoning_tokens"] == 3
    assert r["text"] and r["reasoning_text"], r
    assert r["reasoning_text"] not in r["text"]
    # without --save-text: neither
    p = run_vk("vk-send", path, "--api", srv.url, "-o", str(out), "--workers", "1")
    r = [orjson.loads(x) for x in out.read_bytes().splitlines() if b'"response"' in x][0]
    assert "text" not in r and "reasoning_text" not in r
