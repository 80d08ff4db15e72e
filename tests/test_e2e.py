"""End to end: the four commands as processes, piped, against a real vk-serve, checked against what the server
was told to do and against the server's own write times (--server-timestamps).

These tests run the installed console scripts (``.venv/bin/vk-gen`` etc., next to the interpreter), not only
``python -m``: a broken entry point in pyproject.toml fails here."""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from vk import records
from vk.jsonl import read_records

WORKLOAD = """
session_generator:
  type: synthetic
  channels:
    - type: text
      body_length_generator: {type: fixed, value: 200}
  output_spec:
    text:
      output_length_generator: {type: fixed, value: 20}
"""


def vk_cmd(name: str) -> list[str]:
    """The installed console script of a vk command, next to this interpreter (make install puts it there)."""
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{path} is not installed (make install)"
    return [str(path)]


def run_vk(name: str, *args: str, input: bytes | None = None, check: bool = False, timeout: float = 120):
    p = subprocess.run([*vk_cmd(name), *args], input=input, capture_output=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{name} {' '.join(args)} exited {p.returncode}: {p.stderr.decode()}")
    return p


def server_token_times(r: dict) -> list[float]:
    """The server's write time of each token event of a response (vk-serve --server-timestamps)."""
    return [t for t, k in zip(r["events"]["server_t"], r["events"]["kind"], strict=True) if k in "crt"]


def sh(*parts: list[str]) -> str:
    return " | ".join(shlex.join(p) for p in parts)


@pytest.mark.timing
def test_pipeline_measures_what_the_server_was_told(serve, tmp_path):
    """TTFT 50 ms and 10 ms per output token at the server must come out as 50 ms and 10 ms in vk-eval: the
    client's figures agree with the server's own write times to 0.2 ms, and those with what it was told."""
    server = serve("--ttft", "0.05", "--tpot", "0.01", "--server-timestamps")
    cfg = tmp_path / "w.yaml"
    cfg.write_text(WORKLOAD)
    run = tmp_path / "run.jsonl"
    pipeline = sh(
        [*vk_cmd("vk-gen"), str(cfg), "--seed", "3", "--count", "30"],
        [*vk_cmd("vk-schedule"), "--poisson", "20", "--seed", "3"],
        [*vk_cmd("vk-send"), "--api", server.url, "--workers", "1", "-o", str(run)],
    )
    p = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], capture_output=True, timeout=180)
    assert p.returncode == 0, p.stderr.decode()

    recs = [r for _, _, r in read_records(run)]
    assert recs[0]["kind"] == "run" and recs[-1]["kind"] == "run_end"
    responses = [r for r in recs if r["kind"] == "response"]
    assert len(responses) == 30
    assert all(r["status"] == "ok" for r in responses)
    assert all(r["usage"]["completion_tokens"] == 20 for r in responses)
    # Independent of vk-eval: the raw times in the records, against the server's own write times.
    ttft = [r["t_first_token"] - r["t_sent"] for r in responses]
    tpot = [(r["t_last_token"] - r["t_first_token"]) / 19 for r in responses]
    server_ttft = [server_token_times(r)[0] - r["t_sent"] for r in responses]
    server_tpot = [(server_token_times(r)[-1] - server_token_times(r)[0]) / 19 for r in responses]
    assert statistics.median(ttft) == pytest.approx(statistics.median(server_ttft), abs=2e-4)
    assert statistics.median(tpot) == pytest.approx(statistics.median(server_tpot), abs=2e-4)
    # and the server did what it was told: TPOT to 2% (its timers on a loaded machine); its TTFT, seen from t_sent,
    # also holds the request's transfer and parsing, hence 5%
    assert statistics.median(server_ttft) == pytest.approx(0.050, rel=0.05)
    assert statistics.median(server_tpot) == pytest.approx(0.010, rel=0.02)

    # vk-eval's report agrees with the raw records.
    p = run_vk("vk-eval", str(run), "--json", check=True)
    report = json.loads(p.stdout)
    lat = report["overall"]["latency"]  # seconds
    assert report["overall"]["counts"]["ok"] == 30
    assert lat["ttft"]["p50"] == pytest.approx(statistics.median(ttft), abs=1e-9)
    assert lat["tpot"]["p50"] == pytest.approx(statistics.median(tpot), abs=1e-9)
    assert lat["tpot"]["p50"] == pytest.approx(statistics.median(server_tpot), abs=2e-4)
    assert report["overall"]["accuracy"]["timestamp_error"]["p50"] == pytest.approx(0.0, abs=5e-4)


@pytest.mark.timing
def test_files_replay_the_same_schedule(serve, tmp_path):
    """A cached schedule file runs again against a second server; both runs evaluate side by side."""
    a = serve("--ttft", "0.02", "--tpot", "0.005", "--server-timestamps")
    b = serve("--ttft", "0.06", "--tpot", "0.005", "--server-timestamps")
    cfg = tmp_path / "w.yaml"
    cfg.write_text(WORKLOAD)
    sessions = run_vk("vk-gen", str(cfg), "--seed", "1", "--count", "10", check=True).stdout
    sched = tmp_path / "sched.jsonl"
    sched.write_bytes(run_vk("vk-schedule", "--constant", "20", "--seed", "1", input=sessions, check=True).stdout)
    for server, name in ((a, "a"), (b, "b")):
        run_vk("vk-send", str(sched), "--api", server.url, "--workers", "1", "-o", str(tmp_path / f"{name}.jsonl"),
               check=True)
    ra = [r for _, _, r in read_records(tmp_path / "a.jsonl") if r["kind"] == "response"]
    rb = [r for _, _, r in read_records(tmp_path / "b.jsonl") if r["kind"] == "response"]
    assert len(ra) == len(rb) == 10
    for runs in (ra, rb):  # the client's TTFT against the server's first write (medians: a loaded machine
        # may preempt either process between a write and its timestamp now and then)
        assert statistics.median(r["t_first_token"] - r["t_sent"] for r in runs) == pytest.approx(
            statistics.median(server_token_times(r)[0] - r["t_sent"] for r in runs), abs=5e-4)
    sa = statistics.median(server_token_times(r)[0] - r["t_sent"] for r in ra)
    sb = statistics.median(server_token_times(r)[0] - r["t_sent"] for r in rb)
    assert sb - sa == pytest.approx(0.04, rel=0.03)
    ta = statistics.median(r["t_first_token"] - r["t_sent"] for r in ra)
    tb = statistics.median(r["t_first_token"] - r["t_sent"] for r in rb)
    assert tb - ta == pytest.approx(sb - sa, abs=5e-4)
    p = run_vk("vk-eval", "compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"))
    assert p.returncode == 0, p.stderr.decode()
    assert b"ttft" in p.stdout.lower()


def test_every_stage_output_validates(serve, tmp_path):
    """Each intermediate stream is made only of valid records of the expected kinds."""
    server = serve("--ttft", "0.005", "--tpot", "0.001")
    cfg = tmp_path / "w.yaml"
    cfg.write_text(WORKLOAD)
    sessions = run_vk("vk-gen", str(cfg), "--count", "5", check=True).stdout
    sched = run_vk("vk-schedule", "--concurrency", "2", input=sessions, check=True).stdout
    out = run_vk("vk-send", "--api", server.url, "--workers", "1", input=sched, check=True).stdout
    for blob, kinds in ((sessions, {"session"}), (sched, {"schedule", "scheduled_session"}),
                        (out, {"run", "response", "run_end"})):
        lines = [orjson.loads(x) for x in blob.splitlines() if x.strip()]
        assert {r["kind"] for r in lines} == kinds
        for i, r in enumerate(lines, 1):
            records.validate(r, "stream", i)


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "session", "v": 1, "id": "s1", "requests": [{"id": "a", "parents": ["zz"], '
                   '"messages": []}]}\n')
    sched = tmp_path / "sched.jsonl"
    sched.write_text('{"kind": "schedule", "v": 1, "mode": "open", "process": "poisson", "params": {}, "seed": 1}\n'
                     '{"kind": "scheduled_session", "v": 1, "index": 0, "start": 0, "session": '
                     + bad.read_text().strip() + '}\n')
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"kind": "session", "v": 1, "id": "s1"}\n')
    for cmd, args, where in (
        ("vk-schedule", ["--poisson", "1", "--validate", str(bad)], "bad.jsonl:1"),  # full check on request
        ("vk-schedule", ["--poisson", "1", str(broken)], "broken.jsonl:1"),  # the quick check of every line
        ("vk-send", ["--api", "http://127.0.0.1:9/v1", str(sched)], "sched.jsonl:2"),
    ):
        p = run_vk(cmd, *args)
        assert p.returncode == 2, (cmd, p.stderr)
        err = p.stderr.decode().strip()
        assert "\n" not in err and "Traceback" not in err, err
        assert where in err, err
    p = run_vk("vk-gen", str(tmp_path / "missing.yaml"))
    assert p.returncode == 2 and "missing.yaml" in p.stderr.decode()


@pytest.mark.parametrize("cmd", ["vk-gen", "vk-schedule", "vk-send", "vk-eval", "vk-serve"])
def test_help_has_examples_and_version(cmd):
    p = run_vk(cmd, "--help", check=True)
    assert b"Example" in p.stdout
    v = run_vk(cmd, "--version", check=True)
    assert v.stdout.decode().strip() == f"{cmd} 0.1.0"


def test_slow_upstream_is_not_client_lag(serve, tmp_path):
    """In a pipe, the run's clock starts with the first session, not when vk-send starts: an upstream stage that
    takes a second to produce its first record (vk-gen loading a tokenizer) must not read as dispatch lag."""
    server = serve("--ttft", "0.005", "--tpot", "0.001")
    cfg = tmp_path / "w.yaml"
    cfg.write_text(WORKLOAD)
    sched = tmp_path / "sched.jsonl"
    sessions = run_vk("vk-gen", str(cfg), "--count", "10", check=True).stdout
    sched.write_bytes(run_vk("vk-schedule", "--constant", "20", "-q", input=sessions, check=True).stdout)
    run = tmp_path / "run.jsonl"
    header, rest = sched.read_bytes().split(b"\n", 1)
    (tmp_path / "h.jsonl").write_bytes(header + b"\n")
    (tmp_path / "r.jsonl").write_bytes(rest)
    pipeline = (f"(cat {tmp_path / 'h.jsonl'}; sleep 1.5; cat {tmp_path / 'r.jsonl'}) | "
                + shlex.join([*vk_cmd("vk-send"), "--api", server.url, "--workers", "1", "--lag-threshold", "0.5",
                             "-o", str(run)]))
    p = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    recs = [r for _, _, r in read_records(run)]
    assert recs[-1]["kind"] == "run_end" and recs[-1]["lagged"] is False, recs[-1]
    assert recs[-1]["dispatch_lag_p99"] < 0.5  # 1.5 s when the clock starts with the header (a loaded CI
    # machine adds milliseconds, hence the loose bound)


def test_declared_prefix_reaches_the_records_and_the_ideal_cache_share(serve, tmp_path):
    """Shared-prefix workloads: every response carries its declared prefix, and vk-eval's ideal cache share counts
    it (with a shared system prompt and single requests, the ideal share is the prefix's share of the prompt)."""
    server = serve("--profile", "llama3.1-8b-h100", "--speed", "20")
    sessions = run_vk("vk-gen", "--count", "12", "--seed", "2",
                      "--set", "input.length={type: fixed, value: 100}", "--set", "output.length.value=4",
                      "--set", "channel.shared_prefix_ratio=0.5", "--set", "channel.shared_prefix_probability=1",
                      check=True).stdout
    declared = {s["id"]: s["requests"][0].get("prefix_tokens", 0)
                for s in (orjson.loads(x) for x in sessions.splitlines())}
    assert all(v > 0 for v in declared.values())
    sched = run_vk("vk-schedule", "--concurrency", "1", "-q", input=sessions, check=True).stdout
    run = tmp_path / "run.jsonl"
    run_vk("vk-send", "--api", server.url, "--workers", "1", "-o", str(run), input=sched, check=True)
    responses = [r for _, _, r in read_records(run) if r["kind"] == "response"]
    assert {r["session_id"]: r["target_prefix_tokens"] for r in responses} == declared
    report = json.loads(run_vk("vk-eval", str(run), "--json", check=True).stdout)
    caching = report["overall"]["caching"]
    prompt = sum(r["usage"]["prompt_tokens"] for r in responses)
    history = sum(r["usage"]["prompt_tokens"] - r["target_input_tokens"] for r in responses)
    assert caching["ideal_share"] == pytest.approx((history + sum(declared.values())) / prompt, rel=1e-6)
    assert caching["cached_share"] > 0  # vk-serve's prefix cache served the shared prompt
