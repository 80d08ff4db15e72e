"""vk-eval on hand-built records with known answers."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import orjson
import pytest
from conftest import DATA, run_vk

from vk.errors import VkError
from vk.eval import compare, evaluate, plot, report, sql
from vk.eval import metrics as M

RUN = {"kind": "run", "v": 1, "run_id": "run-a", "start_epoch": 1.7e9, "api": "http://127.0.0.1:1/v1",
       "model": "sim", "endpoint": "chat", "vk_version": "0.1.0", "host": "h", "argv": [], "schedule": None,
       "lagged": False}


def resp(rid, *, run="run-a", session=None, status="ok", t_intended=0.0, t_dispatched=None, t_sent=None,
         events=None, usage=None, t_done=None, target_out=None, target_in=None, **extra):
    """A response record; token times derived from events = [(t, kind, tokens), ...]."""
    t_dispatched = t_intended if t_dispatched is None else t_dispatched
    t_sent = t_dispatched if t_sent is None else t_sent
    rec = {"kind": "response", "v": 1, "run_id": run, "session_id": session or rid, "request_id": rid,
           "status": status, "t_intended": t_intended, "t_dispatched": t_dispatched, "t_sent": t_sent}
    if events is not None:
        tok = [e for e in events if e[1] in "crt"]
        con = [e for e in events if e[1] == "c"]
        rec["t_first_byte"] = events[0][0] if events else None
        rec["t_first_token"] = tok[0][0] if tok else None
        rec["t_first_content"] = con[0][0] if con else None
        rec["t_last_token"] = tok[-1][0] if tok else None
        rec["events"] = {"t": [e[0] for e in events], "kind": "".join(e[1] for e in events),
                         "tokens": [e[2] for e in events]}
        rec["t_done"] = events[-1][0] + 0.01 if t_done is None else t_done
    else:
        rec["t_done"] = t_done
    if usage is not None:
        rec["usage"] = usage
    if target_out is not None:
        rec["target_output_tokens"] = target_out
    if target_in is not None:
        rec["target_input_tokens"] = target_in
    rec.update(extra)
    return rec


# A: reasoning then content; B: multi-token chunks; C: one token; D: error; E: timeout
A = resp("A", t_intended=1.0, t_sent=1.1,
         events=[(1.2, "e", None), (1.3, "r", 1), (1.4, "r", 1), (1.5, "c", 1), (1.6, "c", 1), (1.7, "u", None)],
         usage={"prompt_tokens": 100, "completion_tokens": 4, "reasoning_tokens": 2, "cached_tokens": 0},
         target_out=4, target_in=100)
B = resp("B", t_intended=1.9, t_sent=1.9, events=[(2.0, "c", 2), (2.2, "c", 2), (2.6, "c", 4)],
         usage={"prompt_tokens": 200, "completion_tokens": 8, "cached_tokens": 50}, target_out=8, target_in=200,
         t_done=2.6)
C = resp("C", t_intended=2.8, t_sent=3.0, events=[(3.5, "c", 1)], usage={"prompt_tokens": 10, "completion_tokens": 1},
         target_out=1, target_in=10, t_done=3.5)
D = resp("D", status="error", t_intended=3.0, t_sent=3.0, t_done=3.05, http_status=500, error="HTTP 500")
E = resp("E", status="timeout", t_intended=3.1, t_sent=3.1, t_done=4.0)
RECORDS = [RUN, A, B, C, D, E, {"kind": "run_end", "v": 1, "run_id": "run-a", "lagged": False}]


def write(path, recs):
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    return str(path)


@pytest.fixture(scope="module")
def res():
    return evaluate(RECORDS, percentiles="p50,p90,p99").to_dict()


def lat(res, m):
    return res["overall"]["latency"][m]


def test_counts(res):
    c = res["overall"]["counts"]
    assert (c["requests"], c["ok"], c["error"], c["timeout"], c["failed"]) == (5, 3, 1, 1, 2)
    assert c["error_rate"] == pytest.approx(0.4)
    assert c["output_tokens_source"] == {"usage": 3}


def test_ttft_counts_reasoning_ttfc_does_not(res):
    # A: 0.2 (reasoning at 1.3), B: 0.1, C: 0.5
    assert lat(res, "ttft")["n"] == 3
    assert lat(res, "ttft")["min"] == pytest.approx(0.1)
    assert lat(res, "ttft")["max"] == pytest.approx(0.5)
    assert lat(res, "ttft")["p50"] == pytest.approx(0.2)
    assert lat(res, "ttfc")["p50"] == pytest.approx(0.4)  # A's first content at 1.5: 0.4; B 0.1; C 0.5


def test_tpot_excludes_one_token_outputs(res):
    t = lat(res, "tpot")
    assert t["n"] == 2  # C has one token: no TPOT
    assert sorted([t["min"], t["max"]]) == pytest.approx(sorted([0.3 / 3, 0.6 / 7]))


def test_itl_variants_with_multi_token_chunks(res):
    # chunk gaps: A 0.1, 0.1, 0.1 ; B 0.2, 0.4
    ch = lat(res, "itl_chunk")
    assert ch["n"] == 5
    assert ch["mean"] == pytest.approx(0.18)
    assert ch["max"] == pytest.approx(0.4)
    # split evenly: A 3 x 0.1; B 0.2/2 twice and 0.4/4 four times -> all 0.1
    tok = lat(res, "itl_token")
    assert tok["n"] == 9
    assert tok["min"] == pytest.approx(0.1) and tok["max"] == pytest.approx(0.1)
    # with zeros: the chunk gaps plus (2-1) + (2-1) + (4-1) zeros = 5 + 5 values
    z = lat(res, "itl_token_zeros")
    assert z["n"] == 10
    assert z["mean"] == pytest.approx(0.09)
    assert z["min"] == 0.0


def test_e2e_normalized_stall_and_intended(res):
    e = lat(res, "e2e")
    # A: 1.71 - 1.1 = 0.61 ; B: 0.7 ; C: 0.5
    assert sorted([e["min"], e["p50"], e["max"]]) == pytest.approx([0.5, 0.61, 0.7])
    nl = lat(res, "normalized_latency")
    assert nl["max"] == pytest.approx(0.5)  # C: 0.5 s for one token
    assert lat(res, "max_stall")["max"] == pytest.approx(0.4)
    # from the intended time: C was due at 2.8 but sent at 3.0
    assert lat(res, "ttft_from_intended")["max"] == pytest.approx(0.7)
    assert lat(res, "e2e_from_intended")["max"] == pytest.approx(0.71)
    assert lat(res, "queue_delay")["max"] == pytest.approx(0.2)


def test_throughput_and_concurrency(res):
    w = res["overall"]["throughput"]["whole"]
    # first sent 1.1, last done 4.0 (the timeout)
    assert w["duration"] == pytest.approx(2.9)
    assert w["requests_per_s"] == pytest.approx(3 / 2.9)
    assert w["output_tokens_per_s"] == pytest.approx(13 / 2.9)
    assert w["input_tokens_per_s"] == pytest.approx(310 / 2.9)
    assert res["overall"]["concurrency"]["max"] == 2  # C with D at 3.0, C with E at 3.1


def test_accuracy_and_caching(res):
    acc = res["overall"]["accuracy"]
    assert acc["output_vs_target"]["share_exact"] == 1.0
    assert acc["chunk_tokens_histogram"] == {"1": 5, "2": 2, "4": 1}
    assert acc["events_vs_usage"]["share_mismatch"] == 0.0
    assert any(f.startswith("FAILED") for f in acc["flags"])
    ca = res["overall"]["caching"]
    assert ca["cached_share"] == pytest.approx(50 / 300)  # A and B report cached tokens
    assert ca["ideal_share"] == pytest.approx(0.0)


def test_output_tokens_without_usage_fall_back_to_events():
    r1 = resp("x", events=[(0.1, "c", 3), (0.2, "c", 2)], t_done=0.3)
    r2 = resp("y", events=[(0.1, "c", None), (0.3, "c", None), (0.4, "c", None)], t_done=0.5)
    res = evaluate([RUN, r1, r2]).to_dict()
    assert res["overall"]["counts"]["output_tokens_source"] == {"events.tokens": 1, "token events": 1}
    assert res["overall"]["tokens"]["output_tokens"]["min"] == 3
    assert res["overall"]["tokens"]["output_tokens"]["max"] == 5
    # y: TPOT = 0.3 / 2 ; x: 0.1 / 4
    assert sorted([res["overall"]["latency"]["tpot"]["min"], res["overall"]["latency"]["tpot"]["max"]]) == \
        pytest.approx([0.025, 0.15])


def test_length_problems_are_flagged():
    r = resp("s", events=[(0.1, "c", 1), (0.2, "c", 1)], usage={"completion_tokens": 2, "prompt_tokens": 5},
             target_out=10)
    res = evaluate([RUN, r]).to_dict()
    assert res["overall"]["accuracy"]["output_vs_target"]["share_stopped_early"] == 1.0
    assert any(f.startswith("LENGTH") for f in res["overall"]["accuracy"]["flags"])
    assert "LENGTH" in evaluate([RUN, r]).format("table")


def test_vk_send_lag_flag_alone_is_a_note():
    """vk-send's own flag is kept (vk_send_lagged) but is not vk-eval's verdict: A alone changes no figure."""
    res = evaluate([dict(RUN, lagged=True), A]).to_dict()
    assert res["runs"][0]["vk_send_lagged"] is True and res["runs"][0]["lagged"] is False
    assert res["overall"]["accuracy"]["notes"]


# ----------------------------------------------------------------------------------------------- fluidity


def test_fluidity_known_answer():
    # D_p = 1 s, D_d = 0.1 s; arrivals 0.5, 0.55, 0.9 meet their deadlines (1.0, 1.1, 1.2); 1.55 is 0.35 s
    # late against 1.3 -> misses floor(0.25 / 0.1) + 1 = 3 deadlines; 1.6 meets the reset deadline 1.65.
    arr = [0.5, 0.55, 0.9, 1.55, 1.6]
    fi, missed, total = M.fluidity_reference(arr, 0.0, 1.0, 0.1)
    assert (missed, total) == (3, 7)
    assert fi == pytest.approx(4 / 7)
    te = M.TokenEvents(np.array([5]), np.array([0]), np.array(arr), None, None, np.zeros(1, np.int64))
    v, m, t = M.fluidity(1, te, np.array([0.0]), 1.0, 0.1)
    assert (m[0], t[0]) == (3, 7)
    assert v[0] == pytest.approx(4 / 7)


def test_fluidity_vectorised_matches_the_papers_algorithm():
    rng = np.random.default_rng(1)
    n = 300
    lens = rng.integers(1, 40, n)
    starts = rng.uniform(0, 50, n)
    seg, times = [], []
    expect = []
    for i in range(n):
        gaps = rng.exponential(0.04, lens[i]) + (rng.random(lens[i]) < 0.05) * rng.uniform(0, 0.5, lens[i])
        arr = starts[i] + rng.uniform(0.1, 1.5) + np.cumsum(gaps)
        times += arr.tolist()
        seg += [i] * lens[i]
        expect.append(M.fluidity_reference(arr.tolist(), starts[i], 1.0, 0.05))
    te = M.TokenEvents(lens, np.r_[0, np.cumsum(lens)[:-1]], np.array(times), None, None, np.zeros(n, np.int64))
    v, m, t = M.fluidity(n, te, starts, 1.0, 0.05, chunk_rows=37)
    assert np.allclose(v, [e[0] for e in expect])
    assert np.array_equal(m, [e[1] for e in expect])
    assert np.array_equal(t, [e[2] for e in expect])


def test_fluidity_in_summary_multi_token_chunk():
    # three tokens arrive together at 0.33 (one chunk); D_p = 0.2 s -> the first token is 0.13 s late
    # (floor(0.13/0.05) + 1 = 3 missed deadlines), the next two meet 0.38 and 0.43 after the reset
    r = resp("m", events=[(0.33, "c", 3)], usage={"completion_tokens": 3})
    res = evaluate([RUN, r], fluidity="ttft=200ms,tbt=50ms").to_dict()
    f = res["overall"]["fluidity"]
    assert f["prefill_deadline"] == 0.2 and f["decode_deadline"] == 0.05
    assert f["service_index"] == pytest.approx(1 - 3 / 5)


# ----------------------------------------------------------------------------------------------- SLO, goodput


def test_goodput_failures_are_violations_and_one_token_passes_tpot():
    res = evaluate(RECORDS, goodput="ttft<300ms,tpot<95ms").to_dict()
    g = res["overall"]["goodput"]
    # A: ttft 0.2 ok, tpot 0.1 fails; B: ttft 0.1, tpot 0.0857 ok; C: ttft 0.5 fails; D, E failed
    assert (g["good"], g["requests"]) == (1, 5)
    assert g["attainment"] == pytest.approx(0.2)
    assert g["requests_per_s"] == pytest.approx(1 / 2.9)
    assert g["output_tokens_per_s"] == pytest.approx(8 / 2.9)
    res = evaluate(RECORDS, goodput="ttft<600ms,tpot<200ms").to_dict()
    assert res["overall"]["goodput"]["good"] == 3  # C has one token: no TPOT, not a violation


def test_slo_checks():
    r = evaluate(RECORDS, slo="ttft:p50<250ms,ttft:max<300ms,error_rate<50%")
    checks = {c["slo"]: c["ok"] for c in r["slo"]}
    assert checks == {"ttft:p50<250ms": True, "ttft:max<300ms": False, "error_rate<50%": True}
    assert r.slo_ok is False
    assert evaluate(RECORDS, slo="ttft:p50<250ms").slo_ok is True


@pytest.mark.parametrize("spec", ["ttft<", "ttft:p90", "ttft:q90<1s", "ttft<abc", "nosuch:p50<1"])
def test_bad_slo_specs(spec):
    with pytest.raises(VkError):
        evaluate(RECORDS, slo=spec)


def test_bad_goodput_spec():
    with pytest.raises(VkError, match="goodput"):
        evaluate(RECORDS, goodput="ttft:p50<1s")


# ----------------------------------------------------------------------------------------------- windows, groups


def test_steady_window_and_warmup_marks():
    recs = [RUN]
    for i in range(10):
        recs.append(resp(f"r{i}", t_intended=float(i), events=[(i + 0.1, "c", 1), (i + 0.2, "c", 1)],
                         usage={"completion_tokens": 2, "prompt_tokens": 10}, t_done=i + 0.2, warmup=i < 2))
    res = evaluate(recs).to_dict()["overall"]
    assert res["counts"]["warmup_excluded"] == 2
    assert res["latency"]["ttft"]["n"] == 8
    assert res["throughput"]["steady"]["window"] == "after the warm-up requests"
    assert res["throughput"]["steady"]["windows"]["run-a"][0] == pytest.approx(1.2)
    res = evaluate(recs, warmup="3s", cooldown="1900ms").to_dict()["overall"]
    w = res["throughput"]["steady"]
    assert w["windows"]["run-a"] == pytest.approx([3.0, 7.3])
    assert w["duration"] == pytest.approx(4.3)
    # responses completed inside [3, 7.3]: r3..r7
    assert w["requests"] == 5
    assert res["latency"]["ttft"]["n"] == 5  # sent at 3,4,5,6,7 (warm-up marks also excluded)


def test_group_by_annotation_and_several_runs(tmp_path):
    a = write(tmp_path / "a.jsonl", [RUN, resp("1", events=[(0.1, "c", 1)], label="x"),
                                      resp("2", events=[(0.3, "c", 1)], label="y")])
    run_b = dict(RUN, run_id="run-b", start_epoch=RUN["start_epoch"] + 100)  # later: its own time axis
    b = write(tmp_path / "b.jsonl", [run_b, resp("1", run="run-b", events=[(0.2, "c", 1)], label="x")])
    res = evaluate([a, b]).to_dict()
    assert [g["label"] for g in res["groups"]] == ["run-a", "run-b"]
    assert res["groups"][1]["summary"]["latency"]["ttft"]["p50"] == pytest.approx(0.2)
    res = evaluate([a, b], group_by="label").to_dict()
    assert {g["label"]: g["summary"]["counts"]["requests"] for g in res["groups"]} == {"x": 2, "y": 1}
    res = evaluate([a, b], group_by="run,label").to_dict()
    assert len(res["groups"]) == 3
    with pytest.raises(VkError, match="no field"):
        evaluate([a], group_by="nosuchfield")


def _shard_run(run_id, k, epoch, sends):
    sch = {"kind": "schedule", "v": 1, "mode": "open", "process": "poisson", "params": {"rate": 2.0}, "seed": 1,
           "shard": {"k": k, "n": 2}, "start_at": 1.7e9}
    head = dict(RUN, run_id=run_id, start_epoch=epoch, schedule=sch)
    return [head, *(resp(f"{run_id}-{i}", run=run_id, t_intended=t, events=[(t + 0.1, "c", 1), (t + 0.2, "c", 1)],
                         usage={"prompt_tokens": 10, "completion_tokens": 2}) for i, t in enumerate(sends))]


def test_shards_and_overlapping_runs_are_one_run_in_time(tmp_path):
    """Two shards of one schedule, run at the same time: one 10 s run at 2 req/s, not a 20 s run at 1 req/s
    (issue 14.2). The same for runs whose wall-clock spans overlap, e.g. from two machines started 0.5 s apart."""
    a = write(tmp_path / "a.jsonl", _shard_run("sa", 1, 1.7e9, [0.0, 2.0, 4.0, 6.0, 8.0, 9.7]))
    b = write(tmp_path / "b.jsonl", _shard_run("sb", 2, 1.7e9, [1.0, 3.0, 5.0, 7.0, 9.0, 9.5]))
    res = evaluate([a, b]).to_dict()
    assert res["groups"] == []  # one run on one time axis: no per-run split by default
    assert [v["shard"] for v in res["overall"]["accuracy"]["lag"]] == ["1/2", "2/2"]  # a lag verdict per shard
    whole = res["overall"]["throughput"]["whole"]
    assert whole["duration"] == pytest.approx(9.7 + 0.21, abs=1e-9)  # first send -> last done, one clock
    assert whole["requests_per_s"] == pytest.approx(12 / 9.91, rel=1e-9)
    assert res["overall"]["accuracy"]["rate"]["achieved_per_s"] == pytest.approx(11 / 9.7, rel=1e-9)
    # no shard headers, but overlapping in wall-clock time: b started 0.5 s after a
    c = write(tmp_path / "c.jsonl", _shard_run("sc", 1, 1.7e9, [0.0, 2.0, 4.0]))
    d = write(tmp_path / "d.jsonl", [dict(RUN, run_id="sd", start_epoch=1.7e9 + 0.5),
                                     resp("x", run="sd", t_intended=0.5, events=[(0.6, "c", 1)])])
    res = evaluate([c, d]).to_dict()
    assert res["groups"] == []
    assert res["overall"]["throughput"]["whole"]["duration"] == pytest.approx(4.21, abs=1e-9)
    # the same runs a minute apart: two runs, two time axes, grouped by run
    e = write(tmp_path / "e.jsonl", [dict(RUN, run_id="se", start_epoch=1.7e9 + 60),
                                     resp("x", run="se", t_intended=0.5, events=[(0.6, "c", 1)])])
    res = evaluate([c, e]).to_dict()
    assert [g["label"] for g in res["groups"]] == ["sc", "se"]


def test_sessions_turns_and_think_time():
    recs = [RUN,
            resp("t1", session="s1", t_intended=0.0, events=[(0.1, "c", 1)], t_done=0.2),
            resp("t2", session="s1", t_intended=1.2, events=[(1.5, "c", 1)], t_done=1.6),
            resp("t3", session="s1", t_intended=2.6, events=[(3.0, "c", 1)], t_done=3.1),
            resp("u1", session="s2", t_intended=0.5, events=[(0.6, "c", 1)], t_done=0.7)]
    s = evaluate(recs).to_dict()["overall"]["sessions"]
    assert s["sessions"] == 2
    assert s["turns"]["max"] == 3
    assert s["duration"]["max"] == pytest.approx(3.1)
    assert s["think_time"]["n"] == 2 and s["think_time"]["mean"] == pytest.approx(1.0)
    assert s["ttft_by_turn"]["2"]["ttft_p50"] == pytest.approx(0.3)
    assert s["ttft_by_turn"]["3"]["ttft_p50"] == pytest.approx(0.4)


def test_server_timestamp_error():
    r = resp("s", events=[(0.1, "c", 1), (0.2, "c", 1)])
    r["events"]["server_t"] = [0.098, 0.197]
    te = evaluate([RUN, r]).to_dict()["overall"]["accuracy"]["timestamp_error"]
    assert te["n"] == 2
    assert te["min"] == pytest.approx(0.002) and te["max"] == pytest.approx(0.003)


# ----------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ["table", "json", "csv", "markdown"])
def test_formats(res, fmt):
    out = evaluate(RECORDS).format(fmt)
    if fmt == "json":
        d = json.loads(out)
        assert d["overall"]["latency"]["ttft"]["n"] == 3
    elif fmt == "csv":
        assert out.startswith("group,metric,value\n")
        assert "overall,latency.ttft.p50," in out
    elif fmt == "markdown":
        assert "| ttft |" in out
    else:
        assert "ttft" in out and "itl_token_zeros" in out


def test_to_dict_is_json_and_stable(res):
    d = evaluate(RECORDS).to_dict()
    assert json.loads(json.dumps(d)) == json.loads(orjson.dumps(d))
    assert set(d) >= {"vk_eval", "inputs", "runs", "options", "definitions", "overall", "groups", "slo",
                      "timeseries"}


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_records_name_file_line_field(tmp_path):
    bad = dict(A, status="weird")
    p = write(tmp_path / "bad.jsonl", [RUN, B, bad])
    with pytest.raises(VkError, match=r"bad.jsonl:3: field 'status'"):
        evaluate(p)
    p2 = tmp_path / "broken.jsonl"
    p2.write_text(json.dumps(RUN) + "\n{not json\n")
    with pytest.raises(VkError, match=r"broken.jsonl:2"):
        evaluate(str(p2))
    p3 = write(tmp_path / "session.jsonl", [{"kind": "session", "v": 1, "id": "s", "requests": []}])
    with pytest.raises(VkError, match="vk-send output"):
        evaluate(p3)
    with pytest.raises(VkError, match="no such file"):
        evaluate(str(tmp_path / "missing.jsonl"))


def test_fast_validation_finds_the_line(tmp_path):
    bad = dict(B, v=99)
    p = write(tmp_path / "v.jsonl", [RUN, A, bad])
    with pytest.raises(VkError, match=r"v.jsonl:3: field 'v'"):
        evaluate(p, validate="fast")


# ----------------------------------------------------------------------------------------------- sql, plots, html


def test_sql_views(tmp_path):
    p = write(tmp_path / "r.jsonl", RECORDS)
    cols, rows = sql("SELECT request_id, round(ttft, 3), output_tokens FROM requests WHERE status = 'ok' "
                     "ORDER BY request_id", p, columns=True)
    assert cols[0] == "request_id"
    assert rows == [("A", 0.2, 4), ("B", 0.1, 8), ("C", 0.5, 1)]
    rows = sql("SELECT kind, count(*) FROM events GROUP BY 1 ORDER BY 1", p)
    assert dict(rows) == {"c": 6, "e": 1, "r": 2, "u": 1}
    rows = sql("SELECT run_id, model, responses FROM runs", p)
    assert rows == [("run-a", "sim", 5)]
    rows = sql("SELECT count(*) FROM sessions", p)
    assert rows == [(5,)]
    with pytest.raises(VkError, match="sql"):
        sql("SELECT nosuch FROM requests", p)


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_and_report(tmp_path):
    p = write(tmp_path / "r.jsonl", RECORDS)
    figs = plot(p, str(tmp_path / "plots"))
    names = sorted(x.rsplit("/", 1)[1] for x in figs)
    assert names == ["cdf.png", "itl_hist.png", "over_time.png", "ttft_vs_prompt.png"]
    assert all(_is_png(f) for f in figs)
    run_b = dict(RUN, run_id="run-b")
    p2 = write(tmp_path / "b.jsonl", [run_b, dict(B, run_id="run-b")])
    figs = plot([p, p2], str(tmp_path / "per-run"))
    assert len(figs) == 8 and any(f.endswith("/b-cdf.png") for f in figs)  # named after the file, not the run id
    figs = plot([p, p2], str(tmp_path / "labelled"), labels=["before", "after"])
    assert any(f.endswith("/after-cdf.png") for f in figs)
    with pytest.raises(VkError, match="one per file"):
        plot([p, p2], str(tmp_path / "labelled"), labels=["before"])
    html = report([p, p2], str(tmp_path / "rep"), slo="ttft:p99<1s", static=True)
    text = open(html, encoding="utf-8").read()
    assert text.startswith("<!DOCTYPE html>")
    assert text.count("data:image/png;base64,") == 4
    assert "run-a" in text and "run-b" in text and "ttft:p99&lt;1s" in text


def test_compare_bootstrap(tmp_path):
    rng = np.random.default_rng(0)

    def run(rid, ttft_mean):
        recs = [dict(RUN, run_id=rid)]
        for i in range(200):
            t0 = i * 0.1
            tf = t0 + rng.exponential(ttft_mean)
            recs.append(resp(f"q{i}", run=rid, t_intended=t0, events=[(tf, "c", 1), (tf + 0.02, "c", 1)],
                             usage={"completion_tokens": 2}))
        return write(tmp_path / f"{rid}.jsonl", recs)

    a, b, c = run("a", 0.1), run("b", 0.2), run("c", 0.1)
    res = compare(a, b, bootstrap=300)
    row = next(r for r in res["metrics"] if r["metric"] == "ttft" and r["stat"] == "mean")
    assert row["diff"] > 0 and row["significant"] is True
    lo, hi = row["ci"]
    assert lo < row["diff"] < hi
    res = compare(a, c, bootstrap=300)
    row = next(r for r in res["metrics"] if r["metric"] == "ttft" and r["stat"] == "p50")
    assert row["significant"] is False


# ----------------------------------------------------------------------------------------------- the command


def test_cli_report_check_and_errors(tmp_path):
    p = write(tmp_path / "r.jsonl", RECORDS)
    ok = run_vk("vk-eval", p, "--slo", "ttft:p50<250ms", "--check")
    assert ok.returncode == 0, ok.stderr
    assert b"ttft" in ok.stdout and b"SLOs" in ok.stdout
    miss = run_vk("vk-eval", p, "--slo", "ttft:max<300ms", "--check", "--json")
    assert miss.returncode == 1
    assert json.loads(miss.stdout)["slo"][0]["ok"] is False
    assert b"missed" in miss.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "response", "v": 1}\n')
    err = run_vk("vk-eval", str(bad))
    assert err.returncode == 2
    lines = err.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "bad.jsonl:1" in lines[0] and "Traceback" not in lines[0]
    err = run_vk("vk-eval", p, "--slo", "ttft<<1")
    assert err.returncode == 2 and len(err.stderr.decode().strip().splitlines()) == 1


def test_cli_subcommands(tmp_path):
    p = write(tmp_path / "r.jsonl", RECORDS)
    out = run_vk("vk-eval", "sql", "SELECT count(*) AS n FROM requests", p, "--format", "csv", check=True)
    assert out.stdout == b"n\n5\n"
    out = run_vk("vk-eval", "report", str(tmp_path / "rep"), p, check=True)
    assert (tmp_path / "rep" / "report.html").exists()
    out = run_vk("vk-eval", "plot", p, "-o", str(tmp_path / "figs"), check=True)
    assert len(out.stdout.splitlines()) == 4 and _is_png(tmp_path / "figs" / "cdf.png")
    out = run_vk("vk-eval", "compare", p, p, "--json", "--bootstrap", "50", check=True)
    assert json.loads(out.stdout)["metrics"]
    # stdin and --help with examples
    out = subprocess.run([sys.executable, "-m", "vk.eval.cli", "-", "--format", "json"], input=open(p, "rb").read(),
                         capture_output=True)
    assert out.returncode == 0 and json.loads(out.stdout)["inputs"] == ["<stdin>"]
    h = run_vk("vk-eval", "--help", check=True)
    assert b"Examples" in h.stdout and b"vk-eval sql" in h.stdout


def test_sample_file_in_tests_data():
    res = evaluate(str(DATA / "eval" / "small-run.jsonl")).to_dict()
    assert res["overall"]["counts"]["ok"] > 0
    assert not math.isnan(res["overall"]["latency"]["ttft"]["p50"])


def test_events_without_token_counts_and_time_series():
    r1 = resp("a", events=[(0.1, "e", None), (0.2, "c", None), (0.4, "c", None), (0.5, "u", None)],
              usage={"completion_tokens": 6, "prompt_tokens": 3})
    del r1["events"]["tokens"]
    r2 = resp("b", t_intended=1.0, events=[(1.2, "c", 3), (1.3, "c", 1)], usage={"completion_tokens": 4})
    res = evaluate([RUN, r1, r2]).to_dict()
    acc = res["overall"]["accuracy"]
    assert acc["chunk_tokens_histogram"] == {"1": 1, "3": 1, "unknown": 2}
    assert acc["events_vs_usage"]["share_per_event_counts"] == 0.5
    assert acc["events_vs_usage"]["tokens_per_token_event"] == pytest.approx(10 / 4)
    assert res["overall"]["latency"]["itl_chunk"]["n"] == 2
    ts = res["timeseries"]["run-a"]
    width = ts["t"][1] - ts["t"][0]
    assert sum(ts["output_tokens_per_s"]) * width == pytest.approx(10, rel=1e-3)
    assert sum(ts["completed_per_s"]) * width == pytest.approx(2, rel=1e-3)


def test_db_file_and_empty_input(tmp_path):
    import duckdb

    p = write(tmp_path / "r.jsonl", RECORDS)
    db = str(tmp_path / "run.duckdb")
    evaluate(p, db=db)
    con = duckdb.connect(db)
    assert con.execute("SELECT count(*) FROM requests WHERE status = 'ok'").fetchone()[0] == 3
    assert con.execute("SELECT count(*) FROM events").fetchone()[0] == 10
    con.close()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(VkError, match="no records"):
        evaluate(str(empty))
    with pytest.raises(VkError, match="no response records"):
        evaluate([RUN])


def test_prompt_tokens_first_turns():
    r = resp("a", events=[(0.1, "c", 1)], usage={"prompt_tokens": 108, "completion_tokens": 1}, target_in=100)
    p = evaluate([RUN, r]).to_dict()["overall"]["accuracy"]["prompt_vs_target"]
    assert p["first_turns"] == {"n": 1, "share_exact": 0.0, "mean_diff": 8.0, "max_abs_diff": 8.0}


def test_token_event_selection_sql_and_numpy_paths_agree(monkeypatch):
    from vk.eval.core import Data

    # non-contiguous token events (an empty chunk between two content chunks) and server times
    r = resp("nc", events=[(0.1, "e", None), (0.2, "c", 1), (0.25, "e", None), (0.4, "c", 2), (0.5, "u", None)],
             usage={"completion_tokens": 3})
    r["events"]["server_t"] = [0.09, 0.19, 0.24, 0.39, 0.49]
    recs = RECORDS + [r]
    fast = evaluate(recs).to_dict()
    monkeypatch.setattr(Data, "USE_SQL_TOKEN_FILTER", False)
    slow = evaluate(recs).to_dict()
    assert fast == slow
    assert fast["overall"]["latency"]["itl_chunk"]["n"] == 6
    assert fast["overall"]["accuracy"]["timestamp_error"]["n"] == 2


def test_lean_load_agrees_with_the_full_table(tmp_path):
    # evaluate without --db reads a lean table (no events struct) and the event times from the file again;
    # with --db it stores every field: the same figures either way, fast or full validation
    r = resp("nc", events=[(0.1, "e", None), (0.2, "c", 1), (0.25, "e", None), (0.4, "c", 2), (0.5, "u", None)],
             usage={"completion_tokens": 3}, worker=3)
    r["events"]["server_t"] = [0.09, 0.19, 0.24, 0.39, 0.49]
    p = write(tmp_path / "r.jsonl", RECORDS + [r])
    kw = dict(goodput="ttft<300ms", warmup=1.5, cooldown=0.5, group_by="worker")
    lean = evaluate(p, validate="fast", **kw).to_dict()
    full = evaluate(p, validate="fast", db=str(tmp_path / "x.duckdb"), **kw).to_dict()
    assert lean == full == evaluate(p, **kw).to_dict()
    assert [g["label"] for g in lean["groups"]] == ["3", "(none)"]  # numbers first, in numeric order


@pytest.mark.parametrize("field,events", [
    ("events.kind", {"t": [0.1, 0.2], "kind": "c", "tokens": [1, 1]}),
    ("events.tokens", {"t": [0.1, 0.2], "kind": "cc", "tokens": [1]}),
    ("events.server_t", {"t": [0.1, 0.2], "kind": "cc", "server_t": [0.1]}),
])
def test_fast_validation_names_event_length_errors(tmp_path, field, events):
    bad = dict(C, events=events)
    p = write(tmp_path / "e.jsonl", [RUN, A, B, bad])
    with pytest.raises(VkError, match=rf"e.jsonl:4: field '{field}'"):
        evaluate(p, validate="fast")


def test_table_prints_shares_as_percentages_with_their_meaning(res):
    text = evaluate(RECORDS, goodput="ttft<300ms").format("table")
    # A, B and C produced exactly their target output lengths
    assert "output tokens (usage) vs planned (target_output_tokens): 100% equal, 0% stopped early" in text
    assert "exact 1" not in text
    assert "p99 ms" in text and "duration s" in text and "output tok/s" in text
    # 2 of the 5 measured requests are within 300 ms and complete (D and E failed, C's TTFT is 500 ms)
    assert "40.0% of measured requests met every objective (2 of 5)" in text
    from vk.eval.result import _pct

    assert [_pct(x) for x in (0, 1, 0.5, 0.0004, 0.99996, None)] == ["0%", "100%", "50.0%", "<0.1%", ">99.9%", "-"]


def test_cache_is_used_while_the_file_is_unchanged(tmp_path):
    import os

    p = write(tmp_path / "c.jsonl", RECORDS)
    cache = tmp_path / "c.jsonl.vk-eval-cache"
    want = evaluate(p, goodput="ttft<300ms").to_dict()
    assert evaluate(p, goodput="ttft<300ms", cache=True).to_dict() == want  # written
    assert (cache / "key.json").exists() and (cache / "t.npy").exists()
    # a hit reads the cache, not the JSON: prove it by making the cached times differ from the file's
    t = np.load(cache / "t.npy")
    np.save(cache / "t.npy", t + 1.0)
    hit = evaluate(p, goodput="ttft<300ms", cache=True).to_dict()
    assert hit["overall"]["latency"]["ttft"] == want["overall"]["latency"]["ttft"]  # scalars: from the table
    assert hit["overall"]["fluidity"] != want["overall"]["fluidity"]  # event times: from the cache
    # a changed file (size and modification time) invalidates it
    write(tmp_path / "c.jsonl", RECORDS + [dict(C, request_id="C2")])
    os.utime(p, ns=(1, 1))
    again = evaluate(p, goodput="ttft<300ms", cache=True).to_dict()
    assert again["overall"]["counts"]["requests"] == 6
    assert again == evaluate(p, goodput="ttft<300ms").to_dict()


def test_steady_window_starts_with_measured_traffic_when_warmup_sessions_run_long():
    """A long multi-turn warm-up session must not push the steady window to the run's tail."""
    recs = [RUN]
    for turn in range(5):  # warm-up session: turns at 0, 2, 4, 6, 8 s, done at 8.2
        recs.append(resp(f"w{turn}", session="warm", t_intended=2.0 * turn, warmup=True,
                         events=[(2.0 * turn + 0.1, "c", 1)], usage={"completion_tokens": 1, "prompt_tokens": 5}))
    for i in range(8):  # measured single requests from 1 s on
        recs.append(resp(f"m{i}", t_intended=1.0 + i, events=[(1.1 + i, "c", 1)],
                         usage={"completion_tokens": 1, "prompt_tokens": 5}))
    w = evaluate(recs).to_dict()["overall"]["throughput"]["steady"]
    assert w["windows"]["run-a"][0] == pytest.approx(1.0)  # the first measured send, not the warm-up's end (8.11)


# ------------------------------------------------------------------------------------------ lag verdict (14.3)


def _lag_run(lagged_header, sends, ttft=0.02, jitter=0.0):
    """A run: request i intended at 0.1 * i and sent at ``sends[i]``; ttft 20 ms plus a spread of ``jitter``."""
    recs = [dict(RUN, lagged=lagged_header)]
    spread = np.abs(np.random.default_rng(1).normal(0, jitter, len(sends)))
    for i, ts in enumerate(sends):
        t = ts + ttft + spread[i]
        recs.append(resp(f"q{i}", t_intended=0.1 * i, t_dispatched=ts, t_sent=ts, events=[(t, "c", 1), (t + 0.01, "c", 1)],
                         usage={"prompt_tokens": 10, "completion_tokens": 2}))
    recs.append({"kind": "run_end", "v": 1, "run_id": "run-a", "lagged": lagged_header, "lag_threshold": 0.001})
    return recs


def test_small_dispatch_lag_is_not_lagged():
    """vk-send flags 2 ms of dispatch lag (threshold 1 ms), but nothing reported moved beyond its noise: no LAGGED
    verdict, no banner; a note says why (issue 14.3: make demo on a small machine)."""
    sends = [0.1 * i + (0.002 if i % 10 == 0 else 0.0001) for i in range(200)]
    res = evaluate(_lag_run(True, sends, jitter=0.003))
    acc = res["overall"]["accuracy"]
    assert acc["lagged_runs"] == [] and not any(f.startswith("LAGGED") for f in acc["flags"])
    assert res["runs"][0]["lagged"] is False and res["runs"][0]["vk_send_lagged"] is True
    assert "no reported figure moved" in acc["notes"][0]
    assert "warnings  none" in res.format("table")


def test_lag_that_changes_figures_is_lagged_and_shows_them():
    """Sends 50 ms late each: the *_from_intended figures are 50 ms above the ones from t_sent (far beyond their
    noise); sends bunched into bursts: the arrival process is not the scheduled one. Both name the figure."""
    late = [0.1 * i + 0.05 for i in range(100)]
    res = evaluate(_lag_run(False, late, jitter=0.001), percentiles="p50,p99")
    v = res["overall"]["accuracy"]["lag"][0]
    assert v["lagged"] and res["runs"][0]["lagged"] is True
    changed = {(c["metric"], c["stat"]): c for c in v["from_intended_changed"]}
    assert changed[("ttft_from_intended", "p50")]["added"] == pytest.approx(0.05, abs=1e-9)
    assert "ttft_from_intended p50 is" in res["overall"]["accuracy"]["flags"][0]
    assert v["arrivals"]["distorted"] is False  # a constant delay keeps every gap
    bursts = [0.1 * i + (0.5 - 0.1 * (i % 5)) for i in range(100)]  # five at a time, every 0.5 s
    v = evaluate(_lag_run(True, bursts))["overall"]["accuracy"]["lag"][0]
    assert v["arrivals"]["distorted"] is True and v["arrivals"]["gap_distance_share"] > 0.5
    assert any("gaps between sends" in f for f in v["findings"])


def test_tpot_is_undefined_without_two_token_events_and_the_sql_view_agrees():
    """A non-streamed answer (one event carrying 5 tokens) has no TPOT, not 0 ms (issue 14.5); the SQL view's tpot
    uses the same output tokens as the report (usage, else the events), so a row without usage has one too."""
    whole = resp("W", t_intended=0.0, events=[(0.5, "c", 5)], usage={"prompt_tokens": 10, "completion_tokens": 5})
    no_usage = resp("N", t_intended=1.0, events=[(1.1, "c", 1), (1.2, "c", 1), (1.3, "c", 1)])
    res = evaluate([RUN, whole, no_usage]).to_dict()
    tpot = res["overall"]["latency"]["tpot"]
    assert tpot["n"] == 1 and tpot["p50"] == pytest.approx(0.1)
    rows = dict(sql("SELECT request_id, tpot FROM requests ORDER BY 1", [RUN, whole, no_usage]))
    assert rows["W"] is None and rows["N"] == pytest.approx(0.1)
    assert "TPOT      p50" in evaluate([RUN, no_usage]).format("table")
    assert "TPOT      undefined" in evaluate([RUN, whole]).format("table")


def test_html_report_tables_are_tables_and_tokens_include_reasoning(tmp_path):
    """The HTML report renders every table as an HTML table, not a sideways-scrolling <pre> (issue 14.5), opens with
    the headline and shows each SLO threshold as read; the token table has a reasoning_tokens row."""
    p = write(tmp_path / "run.jsonl", RECORDS)
    page = open(report(p, str(tmp_path / "rep"), slo="ttft:p99<1s", static=True)).read()
    assert "<pre>" not in page
    assert page.count("<table>") >= 5
    assert "<td>reasoning_tokens</td>" in page and "&lt; 1000 ms" in page
    assert page.index("class='headline'") < page.index("<h2>")
    assert evaluate(RECORDS).to_dict()["overall"]["tokens"]["reasoning_tokens"]["n"] == 1


# ------------------------------------------------------------------------------------------ issue 13: input, disk


def _one_line(p, code):
    err = "\n".join(ln for ln in p.stderr.decode().strip().splitlines() if "warning:" not in ln)
    assert p.returncode == code, (p.returncode, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_cut_last_line_is_read_up_to_it_with_one_warning(tmp_path):
    whole = b"".join(orjson.dumps(r) + b"\n" for r in [RUN, A, B])
    p = tmp_path / "cut.jsonl"
    p.write_bytes(whole + orjson.dumps(C)[:40])  # the writer died inside line 4
    out = run_vk("vk-eval", str(p), "--json")
    assert out.returncode == 0 and b"Traceback" not in out.stderr
    cut = [ln for ln in out.stderr.decode().splitlines() if "last line is cut" in ln]
    assert len(cut) == 1 and "cut.jsonl:4: the last line is cut" in cut[0] and "warning" in cut[0]
    d = json.loads(out.stdout)
    assert d["overall"]["counts"]["requests"] == 2
    assert any("no run_end footer" in w for w in d["warnings"])  # the footer is missing too: said in the result
    for fast in ("fast", "full"):
        assert evaluate(str(p), validate=fast)["overall"]["counts"]["requests"] == 2
    p.write_bytes(whole + orjson.dumps(C))  # a whole last record without its newline is read, silently
    assert evaluate(str(p))["overall"]["counts"]["requests"] == 3


def test_missing_footer_interrupted_run_and_no_header_are_said(tmp_path):
    res = evaluate([RUN, A, B])
    assert any("no run_end footer" in w for w in res["warnings"])
    end = {"kind": "run_end", "v": 1, "run_id": "run-a", "ended": "interrupted", "reason": "SIGINT"}
    res = evaluate([RUN, A, B, end])
    assert any("ended interrupted (SIGINT)" in w for w in res["warnings"])
    assert "INPUT" in res.format("table").splitlines()[6]  # the headline's warnings line
    res = evaluate([A, B])
    assert any("without a run header" in w for w in res["warnings"])
    assert evaluate(RECORDS)["warnings"] == []


def test_requests_cancelled_by_the_run_stop_are_not_server_failures():
    """Ctrl-C cancels the requests in flight: they are neither goodput misses nor errors (issue 13.4: 88.6%
    reported when the server met every objective)."""
    cancelled = resp("X", status="cancelled", t_intended=1.0, t_sent=1.0, t_done=1.2,
                     error="cancelled: the run was stopped while the request was in flight")
    res = evaluate([RUN, A, B, cancelled], goodput="ttft<1s").to_dict()
    g = res["overall"]["goodput"]
    assert (g["requests"], g["good"], g["attainment"], g["not_counted_stopped"]) == (2, 2, 1.0, 1)
    assert res["overall"]["counts"]["error_rate"] == 0.0
    assert any(f.startswith("STOPPED") for f in res["overall"]["accuracy"]["flags"])


def test_full_disk_is_one_line_naming_the_file_exit_74(tmp_path):
    p = write(tmp_path / "run.jsonl", RECORDS)
    for args in (["--json"], ["-o", "/dev/full"]):
        with open("/dev/full", "wb") as full:
            q = subprocess.run([sys.executable, "-m", "vk.eval.cli", p, *args], stdout=full, stderr=subprocess.PIPE)
        err = q.stderr.decode().strip()
        assert q.returncode == 74 and "no space left" in err and len(err.splitlines()) == 1, err
        assert ("<stdout>" if args == ["--json"] else "/dev/full") in err
    for args, name in ((["--db", str(tmp_path / "x.duckdb")], "x.duckdb"),
                       (["plot", str(tmp_path / "plots")], "plots/"),
                       (["report", str(tmp_path / "rep")], "report.html"),
                       (["--cache"], "run.jsonl.vk-eval-cache")):
        cmd = [sys.executable, "-m", "vk.eval.cli", *args, p] if args[0] in ("plot", "report") else \
            [sys.executable, "-m", "vk.eval.cli", p, *args]
        q = subprocess.run(["bash", "-c", 'ulimit -f 1; exec "$@"', "sh", *cmd], capture_output=True)
        err = q.stderr.decode().strip()
        assert q.returncode == 74, (args, err)
        assert "no space left" in err and name in err and "Traceback" not in err, err


@pytest.mark.parametrize("change, where", [
    (lambda r: r["events"].__setitem__("t", ["x"] * len(r["events"]["t"])), "field 'events.t'"),
    (lambda r: r.__setitem__("t_sent", -0.5), "field 't_sent': negative"),
    (lambda r: r.__setitem__("t_done", r["t_sent"] - 0.1), "field 't_done'"),
])
def test_bad_times_are_one_line_and_exit_2(tmp_path, change, where):
    bad = json.loads(json.dumps(B))
    change(bad)
    p = write(tmp_path / "bad.jsonl", [RUN, A, bad])
    for v in ("full", "fast"):
        err = _one_line(run_vk("vk-eval", p, "--validate", v), 2)
        assert "bad.jsonl:3" in err and where in err, err


def test_bad_options_are_one_line_and_exit_2(tmp_path):
    p = write(tmp_path / "run.jsonl", RECORDS)
    (tmp_path / "d").mkdir()
    assert "is a directory" in _one_line(run_vk("vk-eval", p, "--db", str(tmp_path / "d")), 2)
    assert "is a directory" in _one_line(run_vk("vk-eval", "sql", "select 1", p, "--db", str(tmp_path / "d")), 2)
    assert "p150" in _one_line(run_vk("vk-eval", p, "--slo", "ttft:p150<5ms"), 2)
    assert "write 50ms or 0.05s" in _one_line(run_vk("vk-eval", p, "--slo", "ttft:p90<50", "--check"), 2)
    assert "40ms or 2400s" in _one_line(run_vk("vk-eval", p, "--slo", "ttft:p90<40m"), 2)
    assert "write 50ms" in _one_line(run_vk("vk-eval", p, "--goodput", "ttft<50"), 2)


def test_group_by_bucket_is_one_table_in_numeric_order():
    """--group-by input_bucket: buckets in numeric order, one row each in one table, not a whole report per group
    (issue 14.5: about 550 lines for 7 buckets, sorted as text)."""
    recs = [RUN] + [resp(f"g{i}", t_intended=0.1 * i, events=[(0.1 * i + 0.05, "c", 1), (0.1 * i + 0.06, "c", 1)],
                         usage={"prompt_tokens": n, "completion_tokens": 2})
                    for i, n in enumerate([3, 70, 130, 1100, 9, 300, 600] * 2)]
    res = evaluate(recs, group_by="input_bucket")
    labels = [g["label"] for g in res["groups"]]
    assert labels == ["2-3", "8-15", "64-127", "128-255", "256-511", "512-1023", "1024-2047"]
    text = res.format("table")
    assert text.count("Latency (ms") == 1 and "By input_bucket" in text
    rows = [ln.split()[0] for ln in text.split("By input_bucket")[1].splitlines()[4:11]]
    assert rows == labels
    assert len(text.splitlines()) < 110
