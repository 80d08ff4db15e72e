"""vk-schedule end to end: the command on real files and pipes, and the Python API over the same engine."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import orjson
import pytest
from conftest import run_vk

from vk import records
from vk.errors import VkError
from vk.schedule import schedule, schedule_stats


def session(i, trace_time=None, n_requests=1, **extra):
    reqs = [records.new_request(f"r{j}", messages=[{"role": "user", "content": f"question {i}.{j} " * 5}],
                                parents=[f"r{j - 1}"] if j else [], history=f"r{j - 1}" if j else None,
                                think_time=0.5 * j, output_tokens=16) for j in range(n_requests)]
    return records.new_session(f"s{i}", reqs, trace_time=trace_time, **extra)


def write_sessions(path: Path, sessions) -> Path:
    path.write_bytes(b"".join(orjson.dumps(s) + b"\n" for s in sessions))
    return path


def parse(out: bytes) -> tuple[dict, list[dict]]:
    recs = [orjson.loads(line) for line in out.splitlines() if line.strip()]
    for n, r in enumerate(recs, 1):
        records.validate(r, "<out>", n)
    assert recs[0]["kind"] == "schedule"
    assert all(r["kind"] == "scheduled_session" for r in recs[1:])
    return recs[0], recs[1:]


@pytest.fixture
def sessions_file(tmp_path):
    return write_sessions(tmp_path / "sessions.jsonl", [session(i, n_requests=1 + i % 3) for i in range(2000)])


@pytest.fixture
def trace_file(tmp_path):
    rng = np.random.default_rng(11)
    t = 1000.0 + np.cumsum(rng.exponential(0.5, 3000))
    return write_sessions(tmp_path / "trace.jsonl",
                          [session(i, trace_time=round(float(x), 3), n_requests=1 + i % 2) for i, x in enumerate(t)])


# ---------------------------------------------------------------------------------------------------------------
# the command


def test_poisson_cli_output_splices_sessions_and_is_reproducible(tmp_path):
    # an input line with odd spacing, key order and an unknown field: its bytes must come out untouched
    odd = (b'{"requests": [{"id": "r0", "parents": [], "prompt": "hi \\u00e9", "output_tokens": 3}],  '
           b'"label": {"x": [1, 2.50]}, "kind": "session", "v": 1, "id": "odd"}')
    lines = [orjson.dumps(session(i)) for i in range(300)]
    lines.insert(5, odd)
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\r\n\n")
    p1 = run_vk("vk-schedule", str(src), "--poisson", "20", "--seed", "3", check=True)
    p2 = run_vk("vk-schedule", "--poisson", "20", "--seed", "3", input=src.read_bytes(), check=True)
    p3 = run_vk("vk-schedule", str(src), "--poisson", "20", "--seed", "4", check=True)
    assert p1.stdout == p2.stdout  # same input and seed: same bytes, file or pipe
    assert p1.stdout != p3.stdout
    header, ss = parse(p1.stdout)
    assert header == {"kind": "schedule", "v": 1, "mode": "open", "process": "poisson",
                      "params": {"rate": 20.0}, "seed": 3}
    assert [s["index"] for s in ss] == list(range(301))
    starts = [s["start"] for s in ss]
    assert starts == sorted(starts) and starts[0] > 0
    out_lines = p1.stdout.splitlines()
    assert out_lines[6] == (b'{"kind":"scheduled_session","v":1,"index":5,"start":' + repr(starts[5]).encode()
                            + b',"session":' + odd + b"}")
    assert ss[0]["session"] == orjson.loads(lines[0])
    # the summary goes to stderr
    assert b"301 sessions" in p1.stderr and b"asked 20" in p1.stderr
    # the Python API gives the same records
    api = list(schedule([orjson.loads(x) for x in lines], poisson=20, seed=3))
    assert api == [orjson.loads(x) for x in out_lines]


def test_duration_or_max_sessions_whichever_first(sessions_file):
    _, ss = parse(run_vk("vk-schedule", str(sessions_file), "--poisson", "100", "--duration", "5",
                         "--max-sessions", "1000", check=True).stdout)
    assert 400 < len(ss) < 600 and ss[-1]["start"] < 5
    _, ss = parse(run_vk("vk-schedule", str(sessions_file), "--poisson", "100", "--duration", "50",
                         "--max-sessions", "123", check=True).stdout)
    assert len(ss) == 123
    # without --cycle the input running out ends the schedule
    p = run_vk("vk-schedule", str(sessions_file), "--constant", "10", "--duration", "1000", check=True)
    _, ss = parse(p.stdout)
    assert len(ss) == 2000 and b"end of input" in p.stderr


def test_cycle_reuses_input_with_distinct_ids(tmp_path):
    src = write_sessions(tmp_path / "few.jsonl", [session(i) for i in range(7)])
    header, ss = parse(run_vk("vk-schedule", str(src), "--poisson", "5", "--max-sessions", "30", "--cycle",
                              check=True).stdout)
    assert header["cycle"] is True and len(ss) == 30
    ids = [s["session"]["id"] for s in ss]
    assert len(set(ids)) == 30
    assert ids[:8] == ["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s0#2"]
    assert ss[7]["session"]["copy_of"] == "s0"
    # a copy is a new request to the server: its first word differs (one token for another), the rest is the same
    a, b = ss[0]["session"]["requests"][0], ss[7]["session"]["requests"][0]
    ca, cb = a["messages"][0]["content"], b["messages"][0]["content"]
    assert ca != cb and ca.split(" ", 1)[1] == cb.split(" ", 1)[1]
    _, same = parse(run_vk("vk-schedule", str(src), "--poisson", "5", "--max-sessions", "30", "--cycle",
                           "--identical-copies", check=True).stdout)
    assert same[7]["session"]["requests"] == same[0]["session"]["requests"]
    # from stdin too (spooled to a temporary file)
    p = run_vk("vk-schedule", "--constant", "1", "--duration", "20.5", "--cycle", input=src.read_bytes(), check=True)
    _, ss = parse(p.stdout)
    assert len(ss) == 20 and ss[-1]["session"]["id"] == "s5#3"


def test_warmup_shard_and_start_at(sessions_file):
    args = [str(sessions_file), "--gamma", "30", "--cv", "2", "--seed", "9", "--max-sessions", "1000",
            "--warmup", "10"]
    _, full = parse(run_vk("vk-schedule", *args, check=True).stdout)
    assert [s.get("warmup", False) for s in full[:12]] == [True] * 10 + [False] * 2
    shards = []
    for k in (1, 2, 3):
        header, ss = parse(run_vk("vk-schedule", *args, "--shard", f"{k}/3", "--start-at", "1767225600",
                                  check=True).stdout)
        assert header["shard"] == {"k": k, "n": 3} and header["start_at"] == 1767225600
        assert all(s["index"] % 3 == k - 1 for s in ss)
        shards.append(ss)
    merged = sorted((s for sh in shards for s in sh), key=lambda s: s["index"])
    # the shards partition the schedule exactly: same sessions, same starts, same warm-up marks, no overlap
    assert merged == full
    assert sum(len(s) for s in shards) == len(full) == len({s["index"] for s in merged})


def test_closed_loop_header(sessions_file):
    header, ss = parse(run_vk("vk-schedule", str(sessions_file), "--concurrency", "8", "--ramp-up", "30",
                              "--rate-limit", "5", "--max-sessions", "50", "--warmup", "2", check=True).stdout)
    assert header["mode"] == "closed" and header["concurrency"] == 8
    assert header["ramp_up"] == 30 and header["rate_limit"] == 5
    assert len(ss) == 50 and all(s["start"] is None for s in ss)
    assert ss[1]["warmup"] and "warmup" not in ss[2]


def test_stats_only_prints_the_summary(sessions_file):
    p = run_vk("vk-schedule", str(sessions_file), "--poisson", "10", "--stats", check=True)
    assert p.stdout == b""
    text = p.stderr.decode()
    assert "2000 sessions" in text and "gap CV" in text and "dispersion" in text
    p = run_vk("vk-schedule", str(sessions_file), "--poisson", "10", "--stats", "--json", check=True)
    s = orjson.loads(p.stderr)
    assert s["sessions"] == 2000 and s["asked_rate"] == 10 and abs(s["cv"] - 1) < 0.1
    p = run_vk("vk-schedule", str(sessions_file), "--poisson", "10", "-q", check=True)
    assert p.stderr == b""


def test_time_varying_processes_through_the_command(sessions_file):
    header, ss = parse(run_vk("vk-schedule", str(sessions_file), "--stages", "5:20,0:10,20:20", "--cycle",
                              check=True).stdout)
    assert header["duration"] == 50 and header["process"] == "stages"
    t = np.array([s["start"] for s in ss])
    assert t.max() < 50 and not ((t >= 20) & (t < 30)).any()
    assert abs(len(t) - 500) < 4 * math.sqrt(500)
    header, ss = parse(run_vk("vk-schedule", str(sessions_file), "--ramp", "0:40:50", check=True).stdout)
    t = np.array([s["start"] for s in ss])
    assert abs(len(t) - 1000) < 4 * math.sqrt(1000)
    assert ((t < 25).sum()) < ((t >= 25).sum()) / 2  # a quarter of the mass in the first half
    header, ss = parse(run_vk("vk-schedule", str(sessions_file), "--onoff", "50:0:2:8", "--duration", "100",
                              check=True).stdout)
    assert header["params"]["mean_rate"] == 10.0


# ---------------------------------------------------------------------------------------------------------------
# trace replay


def test_replay_keeps_trace_timestamps(trace_file):
    trace = [orjson.loads(x) for x in trace_file.read_bytes().splitlines()]
    tt = np.array([s["trace_time"] for s in trace])
    _, ss = parse(run_vk("vk-schedule", str(trace_file), "--replay", check=True).stdout)
    assert [s["session"] for s in ss] == trace
    assert np.allclose([s["start"] for s in ss], tt - tt[0], atol=1e-6)
    # --speedup divides the gaps, --max-idle caps them (after the speedup)
    _, ss = parse(run_vk("vk-schedule", str(trace_file), "--replay", "--speedup", "4", "--max-idle", "0.3",
                         check=True).stdout)
    want = np.concatenate(([0.0], np.cumsum(np.minimum(np.diff(tt) / 4, 0.3))))
    assert np.allclose([s["start"] for s in ss], want, atol=1e-5)


def test_replay_thinning_keeps_whole_sessions(trace_file):
    trace = {s["id"]: s for s in (orjson.loads(x) for x in trace_file.read_bytes().splitlines())}
    tt = np.array([s["trace_time"] for s in trace.values()])
    natural = (len(tt) - 1) / (tt[-1] - tt[0])
    header, ss = parse(run_vk("vk-schedule", str(trace_file), "--replay", "--target-rate", f"{natural / 2}",
                              check=True).stdout)
    assert header["params"]["copies"] == 1 and header["params"]["keep"] == pytest.approx(0.5)
    assert abs(len(ss) - 1500) < 4 * math.sqrt(750)
    base = tt[0]
    for s in ss:
        orig = trace[s["session"]["id"]]
        assert s["session"] == orig  # whole sessions, untouched
        assert s["start"] == pytest.approx(orig["trace_time"] - base, abs=1e-6)  # at their own trace time


def test_replay_superposition_reaches_target_with_distinct_copies(trace_file):
    trace = {s["id"]: s for s in (orjson.loads(x) for x in trace_file.read_bytes().splitlines())}
    tt = np.array([s["trace_time"] for s in trace.values()])
    natural = (len(tt) - 1) / (tt[-1] - tt[0])
    target = natural * 2.5
    header, ss = parse(run_vk("vk-schedule", str(trace_file), "--replay", "--target-rate", f"{target}",
                              "--seed", "2", check=True).stdout)
    p = header["params"]
    assert p["copies"] == 3 and p["factor"] == pytest.approx(2.5, rel=1e-3)
    span = p["period"]
    assert abs(len(ss) / span - target) / target < 4 / math.sqrt(7500)
    ids = [s["session"]["id"] for s in ss]
    assert len(set(ids)) == len(ids)
    starts = [s["start"] for s in ss]
    assert starts == sorted(starts) and 0 <= starts[0] and starts[-1] < span
    copies = 0
    for s in ss:
        sess = s["session"]
        orig = trace[sess.get("copy_of", sess["id"])]
        if "copy_of" in sess:
            copies += 1
            assert sess["id"] in (f"{orig['id']}#2", f"{orig['id']}#3")
        rest = {k: v for k, v in sess.items() if k not in ("id", "copy_of", "requests")}
        assert rest == {k: v for k, v in orig.items() if k not in ("id", "requests")}  # its own dynamics are kept
        for r, o in zip(sess["requests"], orig["requests"], strict=True):
            # a new request to the server: only the first word differs
            words, owords = r["messages"][0]["content"].split(" "), o["messages"][0]["content"].split(" ")
            changed = "copy_of" in sess and o.get("history") is None  # later turns continue their own copy
            assert words[1:] == owords[1:] and (words[0] != owords[0]) == changed
    # copy 1 (the trace itself) and copy 2 are whole, copy 3 is thinned to half
    assert p["keep"] == pytest.approx(0.5, rel=1e-3)
    assert sum(1 for s in ss if "copy_of" not in s["session"]) == len(trace)
    assert sum(1 for s in ss if s["session"]["id"].endswith("#2")) == len(trace)
    assert abs(copies / len(ss) - 1.5 / 2.5) < 0.03
    # the same seed gives the same bytes; the copies' shifts are drawn from the seed
    again = run_vk("vk-schedule", str(trace_file), "--replay", "--target-rate", f"{target}", "--seed", "2").stdout
    assert again == run_vk("vk-schedule", "--replay", "--target-rate", f"{target}", "--seed", "2",
                           input=trace_file.read_bytes()).stdout


def test_replay_cycle_repeats_the_trace(trace_file):
    _, ss = parse(run_vk("vk-schedule", str(trace_file), "--replay", "--speedup", "10", "--cycle",
                         "--duration", "400", check=True).stdout)
    ids = [s["session"]["id"] for s in ss]
    assert len(set(ids)) == len(ids) and ids[3000] == "s0#2"
    starts = [s["start"] for s in ss]
    assert starts == sorted(starts) and starts[-1] < 400


# ---------------------------------------------------------------------------------------------------------------
# errors: one line naming the file, line and field; exit 2


@pytest.mark.parametrize("args,msg", [
    ([], "choose how sessions start"),
    (["--poisson", "1", "--concurrency", "2"], "choose one way"),
    (["--gamma", "5"], "--cv"),
    (["--cv", "2", "--poisson", "5"], "--cv goes with --gamma"),
    (["--poisson", "0"], "--poisson: must be > 0"),
    (["--ramp", "1:2"], "--ramp: expected FROM:TO:SECONDS"),
    (["--stages", "10:60,x:5"], "--stages (stage 2 rate): expected a number"),
    (["--onoff", "0:0:1:1"], "cannot both be 0"),
    (["--poisson", "5", "--speedup", "2"], "--speedup goes with --replay"),
    (["--poisson", "5", "--rate-limit", "2"], "--rate-limit goes with --concurrency"),
    (["--poisson", "5", "--cycle"], "--cycle needs --duration"),
    (["--concurrency", "4", "--cycle", "--duration", "60"], "--max-sessions"),
    (["--poisson", "5", "--shard", "4/3"], "--shard"),
    (["--poisson", "5", "--shard", "x"], "--shard: expected K/N"),
    (["--poisson", "5", "--seed", "-1"], "--seed: must be >= 0"),
])
def test_bad_flags(sessions_file, args, msg):
    p = run_vk("vk-schedule", str(sessions_file), *args)
    assert p.returncode == 2
    err = p.stderr.decode()
    assert msg in err and "Traceback" not in err
    assert err.startswith("vk-schedule: ")


@pytest.mark.parametrize("line,args,msg", [
    (b"{not json", [], "in.jsonl:3: not valid JSON"),
    (b'{"kind":"response","v":1,"id":"x","requests":[]}', [], "in.jsonl:3: field 'kind': expected 'session'"),
    (b'{"kind":"session","v":1,"id":"x"}', [], "in.jsonl:3: field 'requests': missing"),
    (b'{"kind":"session","v":9,"id":"x","requests":[{}]}', [], "in.jsonl:3: field 'v'"),
    (b"[1, 2]", [], "in.jsonl:3: expected a JSON object"),
    (b'{"kind":"session","v":1,"id":"x","requests":[{"id":"a","parents":["zz"],"prompt":"p"}]}',
     ["--validate"], "in.jsonl:3: field 'requests[0].parents': unknown request id 'zz'"),
])
def test_bad_input_names_file_line_field(tmp_path, line, args, msg):
    src = tmp_path / "in.jsonl"
    src.write_bytes(orjson.dumps(session(0)) + b"\n" + orjson.dumps(session(1)) + b"\n" + line + b"\n")
    p = run_vk("vk-schedule", str(src), "--poisson", "5", *args)
    assert p.returncode == 2
    err = p.stderr.decode().strip()
    assert msg in err and "\n" not in err, err


def test_bad_replay_input(tmp_path):
    src = write_sessions(tmp_path / "in.jsonl", [session(0, trace_time=5.0), session(1)])
    p = run_vk("vk-schedule", str(src), "--replay")
    assert p.returncode == 2 and "in.jsonl:2: field 'trace_time': missing" in p.stderr.decode()
    src = write_sessions(tmp_path / "in.jsonl", [session(0, trace_time=5.0), session(1, trace_time=4.0)])
    p = run_vk("vk-schedule", str(src), "--replay")
    assert p.returncode == 2 and "in.jsonl:2: field 'trace_time': goes back in time" in p.stderr.decode()
    p = run_vk("vk-schedule", str(tmp_path / "missing.jsonl"), "--poisson", "1")
    assert p.returncode == 2 and "no such file" in p.stderr.decode()


def test_help_has_examples():
    p = run_vk("vk-schedule", "--help", check=True)
    assert b"Examples:" in p.stdout and b"--poisson" in p.stdout


# ---------------------------------------------------------------------------------------------------------------
# the Python API


def test_api_schedule_and_stats():
    sessions = [session(i) for i in range(5000)]
    recs = list(schedule(sessions, poisson=25, seed=1, warmup=3))
    header, ss = recs[0], recs[1:]
    assert header["process"] == "poisson" and len(ss) == 5000
    assert ss[0]["warmup"] and ss[0]["session"] == sessions[0]
    st = schedule_stats(recs)
    assert st["sessions"] == 5000 and st["warmup"] == 3
    assert abs(st["rate"] - 25) / 25 < 0.06 and abs(st["cv"] - 1) < 0.06
    assert st["asked_rate"] == 25 and st["asked_cv"] == 1
    # lazy: an endless generator with max_sessions
    def endless():
        i = 0
        while True:
            yield session(i)
            i += 1

    recs = list(schedule(endless(), constant=2, max_sessions=10))
    assert [r["start"] for r in recs[1:]] == [0.5 * k for k in range(1, 11)]
    with pytest.raises(VkError, match="--gamma RATE needs --cv"):
        schedule(sessions, gamma=3)


# ---------------------------------------------------------------------------------------------------------------
# end to end: the schedule drives vk-send against vk-serve


def test_schedule_drives_vk_send(tmp_path, serve):
    srv = serve("--ttft", "0.01", "--tpot", "0.001")
    src = write_sessions(tmp_path / "few.jsonl", [session(i) for i in range(4)])
    sched = run_vk("vk-schedule", str(src), "--constant", "10", "--warmup", "2", "--cycle", "--max-sessions", "7",
                   "-q", check=True).stdout
    _, ss = parse(sched)
    run = run_vk("vk-send", "--api", srv.url, input=sched, check=True).stdout
    resp = [r for r in (orjson.loads(x) for x in run.splitlines()) if r["kind"] == "response"]
    assert len(resp) == 7 and all(r["status"] == "ok" for r in resp)
    by_id = {r["session_id"]: r for r in resp}
    for s in ss:
        r = by_id[s["session"]["id"]]
        assert r["session_index"] == s["index"]
        assert r["t_intended"] == pytest.approx(s["start"], abs=1e-6)  # root requests start at the offset
        assert r["warmup"] == s.get("warmup", False)
    assert by_id["s0#2"]["copy_of"] == "s0"  # the copy's provenance reaches the responses


def test_sessions_marked_warmup_stay_warmup():
    """A session that says warmup: true (vk-gen's rag warm-ups) is scheduled as warm-up, without --warmup."""
    lines = [
        b'{"kind":"session","v":1,"id":"w","warmup":true,"requests":[{"id":"a","parents":[],"prompt":"x"}]}',
        b'{"kind":"session","v":1,"id":"m","requests":[{"id":"a","parents":[],"prompt":"\\"warmup\\":true"}]}',
    ]
    p = run_vk("vk-schedule", "--poisson", "1", "-q", input=b"\n".join(lines) + b"\n", check=True)
    out = [orjson.loads(x) for x in p.stdout.splitlines()][1:]
    assert [r.get("warmup", False) for r in out] == [True, False]


def test_cache_share_counts_the_history_a_request_inherits(tmp_path):
    """A request that continues a conversation is sent with its parent's prompt and output: an infinite prefix
    cache serves those plus the declared shared prefix (vk-eval's ideal cache share, from the targets)."""
    r0 = records.new_request("r0", messages=[{"role": "user", "content": "a"}], input_tokens=100, prefix_tokens=20,
                             output_tokens=50)
    r1 = records.new_request("r1", messages=[{"role": "user", "content": "b"}], parents=["r0"], history="r0",
                             input_tokens=10, output_tokens=16)
    r2 = records.new_request("r2", messages=[{"role": "user", "content": "c"}], parents=["r1"], history="r1",
                             input_tokens=5, output_tokens=16)
    path = write_sessions(tmp_path / "s.jsonl", [records.new_session("s0", [r0, r1, r2])])
    s = orjson.loads(run_vk("vk-schedule", str(path), "--poisson", "1", "--stats", "--json", check=True).stderr)
    # prompts: 100, 100 + 50 + 10 = 160, 160 + 16 + 5 = 181; cached: 20, 150, 176
    assert (s["input_tokens"], s["predicted_cached_tokens"]) == (441, 346)
