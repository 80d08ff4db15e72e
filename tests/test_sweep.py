"""vk-sweep: grids, capacity search against a server with a known answer, saturation stop, resume, re-scoring."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import orjson
import pytest

from tests.conftest import run_vk
from vk import records
from vk.errors import RecordError
from vk.sweep.bench import mdc_capacity
from vk.sweep.saturation import Monitor
from vk.sweep.verdict import decide

TTFT, TPOT, NOUT = 0.04, 0.01, 10
SERVICE = TTFT + (NOUT - 1) * TPOT  # 130 ms: the service time of every request in vk-serve's fixed mode

WORKLOAD = """
session_generator:
  type: synthetic
  session_graph: {type: single_request}
  channels:
    - type: text
      body_length_generator: 40
  output_spec:
    text:
      output_length_generator: 10
"""


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep-sessions")
    cfg = d / "w.yaml"
    cfg.write_text(WORKLOAD)
    p = run_vk("vk-gen", str(cfg), "--count", "60", "--seed", "1", check=True)
    path = d / "sessions.jsonl"
    path.write_bytes(p.stdout)
    return str(path)


def sweep_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "vk.sweep.cli", *args]


def lines(path) -> list[dict]:
    return [orjson.loads(x) for x in open(path, "rb") if x.strip()]


# the independent answer: vk.sweep.bench.mdc_capacity simulates the probe protocol (Poisson arrivals for DURATION s,
# the WARMUP first sessions not measured, an empty server at the start) on an M/D/c FIFO queue; it shares no code
# with the search


def capacity(wait_p90_limit: float, c: int, duration: float, warmup: int) -> float:
    return mdc_capacity(wait_p90_limit, c, SERVICE, duration, warmup)


# --------------------------------------------------------------------------------------------------------------
# capacity search against vk-serve's M/D/c mode: the interval contains the computed capacity


# A probe offered exactly the capacity is a coin flip by nature (the sweep says so: an uncertain verdict, repeated,
# and a low confidence), so the thresholds put the capacity at least 5% away from every value the search visits
# (40, 80, 160, then midpoints 113.1, 134.5 or 95.12): capacities of about 149, 105 and 103 sessions/s.
SLOS = {
    # name: (objective, the p90 wait it allows)
    "loose": ("ttft:p90<600ms", 0.600 - TTFT),
    "tight-ttft": ("ttft:p90<75ms", 0.075 - TTFT),
    # TPOT is fixed in this mode (tokens flow at --tpot once a request runs), so the per-token objective that
    # load can break is the per-token latency of the whole request (GuideLLM's TPOT, vk's normalized_latency)
    "tight-tpot": ("normalized_latency:p90<16ms", 0.016 * NOUT - SERVICE),
}


@pytest.mark.timing
@pytest.mark.parametrize("name", list(SLOS))
def test_search_finds_the_known_capacity(serve, sessions, tmp_path, name):
    c, duration, warmup = 16, 3.0, 10
    slo, wait_limit = SLOS[name]
    truth = capacity(wait_limit, c, duration, warmup)
    srv = serve("--ttft", str(TTFT), "--tpot", str(TPOT), "--max-num-seqs", str(c))
    out = tmp_path / name
    p = subprocess.run(sweep_cmd(sessions, "--api", srv.url, "-o", str(out), "--search", "rate", "--start", "40",
                                 "--slo", slo, "--duration", str(duration), "--warmup", str(warmup),
                                 "--tolerance", "0.3", "--max-probes", "8", "--json", "-q"),
                       capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr.decode()
    res = orjson.loads(p.stdout)
    ans = res["end"]["answer"]
    table = "\n".join(f"{q['probe']} {q['verdict']} {q['checks'][0]['value']}" for q in res["probes"])
    assert ans["last_pass"] is not None and ans["first_fail"] is not None, table
    assert ans["last_pass"] <= truth <= ans["first_fail"], f"capacity {truth:.2f}/s not in {ans}\n{table}"
    # at most half the probe time of a dense 12-point grid over the same range
    assert res["end"]["probe_time_s"] <= 0.5 * 12 * duration, f"{res['end']}\n{table}"
    # every probe's run header says it belongs to the sweep
    for q in res["probes"]:
        hdr = lines(out / q["dir"] / "run.jsonl")[0]
        assert hdr["sweep"] == {"sweep_id": res["sweep"]["sweep_id"], "probe": q["probe"], "knob": "poisson",
                                "value": q["value"], "attempt": q["attempt"], "seed": q["seed"]}
    # the records are valid
    for rec in lines(out / "sweep.jsonl"):
        records.validate(rec, "sweep.jsonl")


def test_search_agrees_with_a_dense_grid_on_the_engine_model(serve, sessions, tmp_path):
    import vk

    srv = serve("--speed", "0.1", "--max-num-seqs", "8")  # continuous batching, about 13 sessions/s here
    grid = vk.sweep(sessions, api=srv.url, output=tmp_path / "grid", poisson=[2 * (i + 1) for i in range(12)],
                    slo="ttft:p90<300ms", duration=3, warmup=2, saturation=False)
    search = vk.sweep(sessions, api=srv.url, output=tmp_path / "search", search="rate", start=4,
                      slo="ttft:p90<300ms", duration=3, warmup=2, tolerance=0.2)
    g, s = grid.answer, search.answer
    assert g["last_pass"] is not None and g["first_fail"] is not None, grid.table()
    assert s["last_pass"] is not None and s["first_fail"] is not None, search.table()
    # the two brackets agree: each one's last pass is below the other's first failure
    assert g["last_pass"] <= s["first_fail"] and s["last_pass"] <= g["first_fail"], grid.table() + search.table()
    assert search.end["probe_time_s"] <= 0.5 * grid.end["probe_time_s"], search.table()


# --------------------------------------------------------------------------------------------------------------
# saturation stop


def test_probe_at_ten_times_capacity_stops_early(serve, sessions, tmp_path):
    c = 1
    cap = c / SERVICE  # 7.7/s
    srv = serve("--ttft", str(TTFT), "--tpot", str(TPOT), "--max-num-seqs", str(c))
    out = tmp_path / "sat"
    p = subprocess.run(sweep_cmd(sessions, "--api", srv.url, "-o", str(out), "--poisson", f"{10 * cap:.0f}",
                                 "--duration", "20", "--json", "-q", "--drain-timeout", "30"),
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    probe = orjson.loads(p.stdout)["probes"][0]
    sat = probe["saturation"]
    assert sat is not None and sat["rule"] == "arrivals outpace completions"
    assert probe["ended"] == "stopped" and probe["verdict"] == "fail"
    assert sat["t"] < 6, sat  # not the 20 s asked for
    assert sat["completed"] < 0.2 * sat["arrived"] and sat["in_flight"][1] > sat["in_flight"][0]
    assert sat["server_queue"][1] > sat["server_queue"][0]  # the server's own gauges agree: its queue grows
    assert probe["wall_s"] < 8
    end = lines(out / probe["dir"] / "run.jsonl")[-1]
    assert end["kind"] == "run_end" and end["ended"] == "stopped"


def test_saturation_test_leaves_a_stable_load_alone():
    # a stable load: 50 sessions/s, each done 0.2 s after it is due
    starts = [i / 50 for i in range(500)]
    mon = Monitor("/nonexistent", starts, {}, threading.Event(), min_time=2.0)
    mon.first_durations = [0.2] * 10
    for t in (2.0, 4.0, 8.0):
        mon.answered = [s + 0.2 for s in starts if s + 0.2 <= t]
        assert mon.check(t) is None
    # the same arrivals, a server finishing 5 a second
    mon.answered = [0.2 * (i + 1) for i in range(20)]
    ev = mon.check(4.0)
    assert ev is not None and ev["arrived"] == 100 and ev["completed"] == 10
    # a server still filling up (sessions of 1.5 s) is not mistaken for a saturated one
    mon.first_durations = [1.5] * 10
    mon.answered = [s + 1.5 for s in starts if s + 1.5 <= 4.0]
    assert mon.check(4.0) is None


def _feed(mon, recs, t):
    """Give the monitor the response records done by run time ``t`` (vk-send writes a record when it ends)."""
    for r in recs:
        if r["t_done"] <= t and r["request_id"] not in mon._given:
            mon._given.add(r["request_id"])
            mon._add(r)


def test_long_multi_turn_sessions_at_light_load_are_not_saturated():
    """10 sessions/s for 10 s, each 5 turns 2 s apart (8.1 s long), every request answered in 0.1 s: an idle
    server. Before, no session had finished by half the probe (t = 5), which read as saturated."""
    starts = [i / 10 for i in range(100)]
    recs = []
    for i, s0 in enumerate(starts):
        for k in range(5):
            t0 = s0 + 2.0 * k
            recs.append({"kind": "response", "session_id": f"s{i}", "request_id": f"s{i}-{k}", "t_intended": t0,
                         "t_sent": t0, "t_first_token": t0 + 0.01, "t_done": t0 + 0.1})
    recs.sort(key=lambda r: r["t_done"])
    mon = Monitor("/nonexistent", starts, {f"s{i}": 5 for i in range(100)}, threading.Event(), min_time=2.0,
                  duration=10.0)
    mon._given = set()
    for t in (2.0, 3.0, 5.0, 6.0, 8.0, 10.0, 14.0):
        _feed(mon, recs, t)
        assert mon.check(t) is None, t
    # the same sessions on a server answering 2 first turns a second: saturated, by the main rule
    mon = Monitor("/nonexistent", starts, {}, threading.Event(), min_time=2.0, duration=10.0)
    mon._given = set()
    slow = [{"kind": "response", "session_id": f"s{i}", "request_id": f"s{i}-0", "t_intended": s0, "t_sent": s0,
             "t_first_token": 0.5 * (i + 1) - 0.01, "t_done": 0.5 * (i + 1)} for i, s0 in enumerate(starts)]
    _feed(mon, slow, 10.0)
    ev = mon.check(10.0)
    assert ev is not None and ev["rule"] == "arrivals outpace completions"
    assert ev["arrived"] in (49, 50) and ev["completed"] == 10  # due in (5, 10] s (5.0 itself: float rounding)


# --------------------------------------------------------------------------------------------------------------
# grid, resume after an interruption, re-scoring without traffic, plots


def test_grid_resume_rescore_and_overlay(serve, sessions, tmp_path):
    srv = serve("--ttft", str(TTFT), "--tpot", str(TPOT), "--max-num-seqs", "4")
    out = tmp_path / "grid"
    args = sweep_cmd(sessions, "--api", srv.url, "-o", str(out), "--poisson", "5,10,15,20", "--duration", "1.5",
                     "--slo", "ttft:p90<300ms", "--seed", "3")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (out / "poisson-15" / "run.jsonl").exists():  # interrupted during the third probe
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err.decode()
    assert (out / "poisson-10" / "probe.json").exists() and not (out / "poisson-15" / "probe.json").exists()
    kept = (out / "poisson-5" / "run.jsonl").read_bytes()

    p = subprocess.run([*args, "--json"], capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    res = orjson.loads(p.stdout)
    assert [q["probe"] for q in res["probes"]] == ["poisson-5", "poisson-10", "poisson-15", "poisson-20"]
    assert [bool(q.get("reused")) for q in res["probes"]] == [True, True, False, False]
    assert (out / "poisson-5" / "run.jsonl").read_bytes() == kept
    assert all(q["verdict"] == "pass" for q in res["probes"])
    assert len(lines(out / "sweep.jsonl")) == 6  # header, four probes, footer

    # a second sweep (another server) to overlay; then re-score both with no server running
    srv2 = serve("--ttft", "0.03", "--tpot", str(TPOT), "--max-num-seqs", "2")
    out2 = tmp_path / "grid2"
    p = subprocess.run(sweep_cmd(sessions, "--api", srv2.url, "-o", str(out2), "--poisson", "5,10,20",
                                 "--duration", "1.5", "--slo", "ttft:p90<300ms", "-q"), capture_output=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    srv.stop()
    srv2.stop()
    p = run_vk("vk-eval", "sweep", str(out), "--slo", "ttft:p90<20ms", "--json")
    assert p.returncode == 0, p.stderr.decode()
    again = orjson.loads(p.stdout)
    assert all(q["verdict"] == "fail" for q in again["probes"])  # TTFT is at least 20 ms here
    assert again["end"]["answer"]["first_fail"] == 5
    assert [q["ttft_p50"] for q in again["probes"]] == [q["ttft_p50"] for q in res["probes"]]
    figs = tmp_path / "figs"
    p = run_vk("vk-eval", "sweep", str(out), str(out2), "--plot", str(figs))
    assert p.returncode == 0, p.stderr.decode()
    assert sorted(os.listdir(figs)) == ["goodput-load.png", "latency-throughput.png", "pareto.png"]
    from vk.sweep import rescore
    from vk.sweep.plots import plot_sweeps

    both = rescore([out, out2])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = []
    orig = plt.close
    plt.close = lambda fig=None: (seen.append(fig), orig(fig))
    try:
        plot_sweeps(both, str(tmp_path / "figs2"))
    finally:
        plt.close = orig
    pareto = seen[-1]
    assert len(pareto.axes[0].get_lines()) == 2  # one line per sweep, in one figure


# --------------------------------------------------------------------------------------------------------------
# verdicts, records, options


def test_verdict_confidence_and_uncertainty():
    ok = {"slo": "a", "threshold": 1.0, "ok": True, "support": 0.99, "ci": [0.5, 0.9]}
    shaky = {"slo": "b", "threshold": 1.0, "ok": True, "support": 0.7, "ci": [0.8, 1.2]}
    bad = {"slo": "c", "threshold": 1.0, "ok": False, "support": 0.01, "ci": [1.1, 1.5]}
    assert decide([ok]) == {"verdict": "pass", "confidence": 0.99, "uncertain": False}
    d = decide([ok, shaky])
    assert d["verdict"] == "pass" and d["uncertain"] and d["confidence"] == pytest.approx(0.69)
    d = decide([shaky, bad])
    assert d == {"verdict": "fail", "confidence": 0.99, "uncertain": False}
    assert decide([]) == {"verdict": None, "confidence": None, "uncertain": False}


def test_a_grid_without_objectives_has_no_answer():
    """A saturated probe fails without objectives, but that bounds no capacity: no 'between - (last passing) and 4
    (first failing)'."""
    from vk.sweep.result import SweepResult
    from vk.sweep.search import answer

    sat = {"t": 3.0, "rule": "arrivals outpace completions"}
    probes = [{"probe": "poisson-2", "value": 2.0, "verdict": None, "checks": []},
              {"probe": "poisson-4", "value": 4.0, "verdict": "fail", "confidence": 1.0, "checks": [],
               "saturation": dict(sat, window=[1.5, 3.0], arrived=30, completed=3, in_flight=[5, 30],
                                  ttft_first_quarter=0.01, ttft_last_quarter=0.5)}]
    assert answer(probes) is None
    header = records.new_sweep("s" * 8, "grid", "poisson", seed=0)
    text = SweepResult(header, probes, records.new_sweep_end("s", answer=None)).table()
    assert "answer: none (no objectives given" in text and "between" not in text
    # with objectives, the same failure does bound it
    probes[0].update(verdict="pass", confidence=0.99, checks=[{"slo": "ttft:p90<1s", "metric": "ttft", "ok": True,
                                                               "value": 0.2, "ci": None, "support": 0.99}])
    assert answer(probes)["first_fail"] == 4.0
    text = SweepResult(dict(header, objectives="ttft:p90<1s"), probes,
                       records.new_sweep_end("s", answer=answer(probes))).table()
    assert "answer: poisson between 2 (last passing) and 4 (first failing)" in text


def test_sweep_records_validate():
    rec = records.new_sweep_probe("s", "poisson-4", 0, "poisson", 4.0, verdict="maybe")
    with pytest.raises(RecordError, match="verdict"):
        records.validate(rec)
    end = records.new_sweep_end("s", answer={"last_pass": 8, "first_fail": 4})
    with pytest.raises(RecordError, match="answer"):
        records.validate(end)
    records.validate(records.new_sweep("s", "search", "poisson", seed=0))


@pytest.mark.parametrize("args,message", [
    (["--duration", "1"], "choose what to sweep"),
    (["--poisson", "1,x", "--duration", "1"], "--poisson: 'x' is not a number"),
    (["--poisson", "1", "--concurrency", "2", "--duration", "1"], "one knob at a time"),
    (["--search", "rate", "--duration", "1"], "--search needs objectives"),
    (["--search", "rate", "--slo", "ttft:p90<bad", "--duration", "1"], "--slo"),
    (["--poisson", "1,2"], "--duration SECONDS and/or --max-sessions N"),
])
def test_bad_options_are_one_line(sessions, tmp_path, args, message):
    p = subprocess.run(sweep_cmd(sessions, "--api", "http://127.0.0.1:9/v1", "-o", str(tmp_path / "x"), *args),
                       capture_output=True, timeout=60)
    err = p.stderr.decode()
    assert p.returncode == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_between_command_runs_between_probes_and_its_failure_stops(serve, sessions, tmp_path):
    srv = serve("--ttft", "0.01", "--tpot", "0.001")
    marks = tmp_path / "marks"
    p = subprocess.run(sweep_cmd(sessions, "--api", srv.url, "-o", str(tmp_path / "a"), "--poisson", "5,10,20",
                                 "--duration", "0.5", "--cooldown", "0.2", "--between-cmd", f"echo x >> {marks}",
                                 "-q"), capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr.decode()
    assert marks.read_text() == "x\nx\n"  # between the three probes, not before the first
    p = subprocess.run(sweep_cmd(sessions, "--api", srv.url, "-o", str(tmp_path / "b"), "--poisson", "5,10",
                                 "--duration", "0.5", "--between-cmd", "echo cache reset failed >&2; exit 3", "-q"),
                       capture_output=True, timeout=60)
    assert p.returncode == 2 and "--between-cmd exited 3: cache reset failed" in p.stderr.decode()
    assert (tmp_path / "b" / "poisson-5" / "probe.json").exists()


def test_reused_probes_are_scored_under_the_objectives_of_the_run_that_reuses_them(serve, sessions, tmp_path):
    srv = serve("--ttft", "0.01", "--tpot", "0.001")
    base = sweep_cmd(sessions, "--api", srv.url, "-o", str(tmp_path / "a"), "--poisson", "5,10", "--duration", "0.5",
                     "--json", "-q")
    first = orjson.loads(subprocess.run([*base, "--slo", "ttft:p90<1s"], capture_output=True, timeout=60).stdout)
    assert [q["verdict"] for q in first["probes"]] == ["pass", "pass"]
    p = subprocess.run([*base, "--slo", "ttft:p90<1ms"], capture_output=True, timeout=60)
    again = orjson.loads(p.stdout)
    assert [(q["verdict"], q["reused"]) for q in again["probes"]] == [("fail", True), ("fail", True)]
    assert [q["run_id"] for q in again["probes"]] == [q["run_id"] for q in first["probes"]]  # no new traffic
