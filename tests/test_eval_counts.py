"""Who counts in vk-eval's and vk-sweep's figures: requests skipped after a failed turn are failures (never good),
requests cancelled by the run's stop are left out; times that run backwards; the headline's counts. Hand-built
records with known answers."""

from __future__ import annotations

import numpy as np
from test_eval import RUN, resp
from test_eval_loose import END, _ok, write

from vk.eval import evaluate


def _faulty_run(cancelled=0):
    """6 ok; s1's first turn fails (HTTP 500) and its 2 later turns are skipped; 1 timeout; ``cancelled`` more
    cancelled by the run's stop."""
    recs = [RUN] + [_ok(f"ok{i}", float(i)) for i in range(6)]
    recs += [resp("s1-0", session="s1", t_intended=6.0, status="error", t_done=6.1, error="HTTP 500")]
    recs += [resp(f"s1-{i}", session="s1", t_intended=6.0, status="skipped", t_sent=None, t_dispatched=None,
                  error="parent request 's1-0' did not succeed (error)") for i in (1, 2)]
    recs += [resp("t", t_intended=7.0, status="timeout", t_done=8.0, error="total timeout")]
    recs += [resp(f"c{i}", t_intended=8.0 + i, status="cancelled", t_done=8.5 + i,
                  error="cancelled: the run was stopped while the request was in flight") for i in range(cancelled)]
    return recs + [dict(END, ended="interrupted" if cancelled else "complete")]


def test_skipped_after_a_failed_turn_are_failures_in_every_figure(tmp_path):
    """10 requests: 6 ok, 1 error, 2 skipped after it, 1 timeout: 4 of 10 failed (40%), attainment 6 of 10, and no
    STOPPED warning (the run ended complete; before: errors 4 of 10 at 25% = 2 of 8, attainment 0.75, STOPPED)."""
    from vk.sweep import verdict

    p = write(tmp_path / "run.jsonl", _faulty_run())
    res = evaluate(p, goodput="ttft<1s")
    ev = res.to_dict()
    c = ev["overall"]["counts"]
    assert (c["failed"], c["counted"], c["error_rate"]) == (4, 10, 0.4)
    g = ev["overall"]["goodput"]
    assert (g["requests"], g["good"], g["attainment"], g["not_counted_stopped"]) == (10, 6, 0.6, 0)
    assert g["per_condition"]["ttft<1s"] == 0.6
    flags = ev["overall"]["accuracy"]["flags"]
    assert not any(f.startswith("STOPPED") for f in flags)
    assert any(f.startswith("FAILED: 4 of 10 requests failed (40.0%: 2 error or timeout, 2 skipped") for f in flags)
    head = [ln.strip() for ln in res.format("table").splitlines()]
    assert "errors    4 of 10 requests (40.0%): error 1, timeout 1, skipped 2 after a failed turn" in head
    assert not any("STOPPED" in ln for ln in head)
    # vk-sweep's verdicts share the rule
    cols = verdict.request_columns(p)
    x, stat = verdict.sample_for({"metric": "error_rate", "stat": None}, cols, None)
    assert (len(x), float(getattr(np, stat)(x))) == (10, 0.4)
    x, _ = verdict.sample_for({"metric": "attainment", "stat": None}, cols, "ttft<1s")
    assert float(x.mean()) == 0.6


def test_cancelled_by_the_run_stop_are_left_out_and_said(tmp_path):
    """The same run stopped with 3 requests cancelled: still 4 of 10 (they are left out), and STOPPED names 3."""
    p = write(tmp_path / "run.jsonl", _faulty_run(cancelled=3))
    res = evaluate(p, goodput="ttft<1s")
    ev = res.to_dict()
    c = ev["overall"]["counts"]
    assert (c["measured"], c["failed"], c["counted"], c["error_rate"]) == (13, 4, 10, 0.4)
    g = ev["overall"]["goodput"]
    assert (g["requests"], g["good"], g["not_counted_stopped"]) == (10, 6, 3)
    flags = ev["overall"]["accuracy"]["flags"]
    assert [f for f in flags if f.startswith("STOPPED")] == [
        "STOPPED: 3 requests were cancelled by the run's stop (sent or not); they are not counted as the server's "
        "failures (error rate, goodput)"]
    head = [ln.strip() for ln in res.format("table").splitlines()]
    assert ("errors    4 of 10 requests (40.0%): error 1, timeout 1, skipped 2 after a failed turn; cancelled by the "
            "run's stop 3 (not counted)") in head


def test_an_end_before_the_send_is_said_and_never_a_negative_latency(tmp_path):
    """Issue 13.8: t_done = t_sent - 0.1 ms passed silently (warnings none, e2e min -0.10 ms). Within the 1 ms
    slack it is a TIMES warning naming the request and the count, and e2e is taken as 0; beyond it, exit 2."""
    from test_eval import run_vk

    recs = [RUN] + [_ok(f"ok{i}", float(i)) for i in range(3)]
    recs[2] = dict(recs[2], t_done=recs[2]["t_sent"] - 0.0001)
    res = evaluate(write(tmp_path / "back.jsonl", recs + [END]))
    ev = res.to_dict()
    e2e = ev["overall"]["latency"]["e2e"]
    assert e2e["min"] == 0.0 and e2e["n"] == 3
    flags = [f for f in ev["overall"]["accuracy"]["flags"] if f.startswith("TIMES")]
    assert len(flags) == 1 and "1 requests" in flags[0] and "0.1 ms" in flags[0] and "'ok1' of run run-a" in flags[0]
    head = [ln.strip() for ln in res.format("table").splitlines()]
    assert any(ln.startswith("warnings") and "TIMES" in ln for ln in head)
    recs[2] = dict(recs[2], t_done=recs[2]["t_sent"] - 0.002)
    r = run_vk("vk-eval", write(tmp_path / "back2.jsonl", recs + [END]))
    assert r.returncode == 2 and b"t_done" in r.stderr and b"before t_sent" in r.stderr, r.stderr


def test_headline_counts_requests_and_sessions_of_one_population(tmp_path):
    """A warm-up session of 2 requests and 3 measured sessions of 2: 8 requests in 4 sessions, warm-up said
    (before: 8 requests in 3 sessions, the requests counted with the warm-up, the sessions without)."""
    recs = [RUN]
    for i, sid in enumerate(("warm", "a", "b", "c")):
        for k in range(2):
            recs.append(_ok(f"{sid}{k}", 2.0 * i + k, session=sid, warmup=sid == "warm"))
    res = evaluate(write(tmp_path / "w.jsonl", recs + [END]))
    c = res.to_dict()["overall"]["counts"]
    assert (c["requests"], c["sessions"], c["warmup_excluded"]) == (8, 4, 2)
    assert res.format("table").splitlines()[0].startswith(
        "vk-eval: 8 requests in 4 sessions (warm-up included: 2 requests, not measured)")


def test_lagged_warning_names_ttfc_from_intended_once_when_it_is_ttfts_sample():
    """Content-only answers: ttfc_from_intended is ttft_from_intended's sample; the LAGGED warning named both, as
    separate findings (and the tables show one row)."""
    from test_eval import _lag_run

    res = evaluate(_lag_run(False, [0.1 * i + 0.05 for i in range(100)], jitter=0.001), percentiles="p50,p99")
    flag = next(f for f in res["overall"]["accuracy"]["flags"] if f.startswith("LAGGED"))
    assert "ttfc_from_intended p50 is" not in flag and "ttfc_from_intended the same" in flag
    changed = {c["metric"] for c in res["overall"]["accuracy"]["lag"][0]["from_intended_changed"]}
    assert changed == {"ttft_from_intended", "e2e_from_intended"}
