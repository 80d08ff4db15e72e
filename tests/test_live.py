"""vk-eval live: followers on a pseudo-terminal (rich) and on a pipe (plain lines) watch a real vk-send run against
vk-serve while it is written; at the end their figures are vk-eval's on the finished file."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import struct
import subprocess
import threading
import time

import pytest

from tests.conftest import run_vk, vk_cmd

WORKLOAD = """
session_generator:
  type: synthetic
  session_graph:
    type: linear
    num_request_generator: {type: uniform, min: 1, max: 3}
    request_wait_generator: {type: fixed, value: 0.1}
    inherit_history: true
  channels:
    - type: text
      body_length_generator: {type: fixed, value: 64}
  output_spec:
    text:
      output_length_generator: {type: fixed, value: 30}
"""
SLO = "ttft:p90<500ms,error_rate<1%"
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def _pty_follower(args: list[str]) -> tuple[subprocess.Popen, threading.Thread, bytearray]:
    import fcntl
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 170, 0, 0))
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=subprocess.PIPE, close_fds=True,
                            env={**os.environ, "TERM": "xterm-256color"})
    os.close(slave)
    screen = bytearray()

    def read():
        while True:
            r, _, _ = select.select([master], [], [], 0.2)
            if r:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:  # the other side closed
                    break
                if not data:
                    break
                screen.extend(data)
            elif proc.poll() is not None:
                break
        os.close(master)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return proc, t, screen


def _ms(v):
    return f"{v * 1000:.2f}"


def test_live_follows_a_real_run_and_ends_with_vk_evals_figures(serve, tmp_path):
    server = serve("--ttft", "0.03", "--tpot", "0.004", "--fault-500", "0.08", "--seed", "5")
    cfg = tmp_path / "w.yaml"
    cfg.write_text(WORKLOAD)
    sessions = run_vk("vk-gen", str(cfg), "--seed", "5", "--count", "60", check=True).stdout
    sched = tmp_path / "sched.jsonl"
    sched.write_bytes(run_vk("vk-schedule", "--poisson", "15", "--seed", "5", "-q", input=sessions, check=True).stdout)
    run = tmp_path / "run.jsonl"
    live = [*vk_cmd("vk-eval"), "live", str(run), "--slo", SLO, "--schedule", str(sched), "--interval", "0.5"]
    # both followers start before vk-send has created the file
    tty, tty_reader, screen = _pty_follower([*live, "--final-json", str(tmp_path / "tty.json")])
    plain = subprocess.Popen([*live, "--final-json", str(tmp_path / "plain.json")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    time.sleep(0.5)
    send = run_vk("vk-send", str(sched), "--api", server.url, "--workers", "1", "-o", str(run), timeout=120)
    assert send.returncode == 0, send.stderr.decode()
    out, err = plain.communicate(timeout=60)  # ends by itself: the footer arrived
    assert plain.returncode == 0, err.decode()
    assert tty.wait(60) == 0, tty.stderr.read().decode()
    tty_reader.join(10)

    d = json.loads(run_vk("vk-eval", str(run), "--slo", SLO, "--json", check=True).stdout)
    for name in ("tty.json", "plain.json"):  # the followers' own evaluation at the end is vk-eval's
        got = json.loads((tmp_path / name).read_text())
        for k in ("overall", "groups", "slo", "timeseries"):
            assert got[k] == d[k], (name, k)
    s = d["overall"]
    c = s["counts"]
    assert 0 < c["error"] < c["requests"]  # the run had errors to show
    ttft = "/".join(_ms(s["latency"]["ttft"][p]) for p in ("p50", "p90", "p99"))
    tpot = "/".join(_ms(s["latency"]["tpot"][p]) for p in ("p50", "p90", "p99"))
    from vk.eval.result import headline

    # plain mode: periodic lines while the run went on, then the last line and vk-eval's headline
    lines = out.decode().splitlines()
    progress = [ln for ln in lines if ln.startswith("t=")]
    nsessions = d["overall"]["sessions"]["sessions"]
    started = [int(m.group(1)) for ln in progress if (m := re.search(r"sessions (\d+) started", ln))]
    assert any(0 < n < nsessions for n in started), progress  # it saw the run half way
    last = progress[-1]
    assert f"TTFT p50/p90/p99 {ttft} ms" in last and f"TPOT p50/p90/p99 {tpot} ms" in last
    kinds = ", ".join(f"{k} {n}" for k, n in (("error HTTP 500", c["error"]), ("skipped", c["skipped"])) if n)
    assert f"errors {c['failed']} of {c['measured']} ({kinds})" in last  # skipped: children of failed turns
    assert f"sessions {nsessions} started, {nsessions} due, {nsessions} done of {nsessions}" in last
    assert f"rate {s['accuracy']['rate']['achieved_per_s']:,.2f} req/s sent" in last
    assert "SLO 1 of 2 met; MISSED error_rate<1% (overall)" in last
    tail = lines[lines.index("final (vk-eval over the whole run):") + 1:]
    assert [x.strip() for x in tail] == headline(d)

    # the terminal: rich's live view, redrawn while the run went on; its last frame shows vk-eval's figures
    text = ANSI.sub(b"", bytes(screen)).decode(errors="replace")
    assert text.count("vk-eval live") >= 3  # redrawn, not printed once
    frame = text[text.rindex("╭"):]
    row = re.search(r"│ TTFT\s+│([^\n]+)", frame).group(1)
    cells = [x.strip() for x in row.split("│") if x.strip()]
    assert cells[3:6] == ttft.split("/")  # whole-run p50 p90 p99
    assert re.search(rf"error HTTP 500\s+│\s+{c['error']}\s+│", frame)
    assert "error_rate<1%" in frame and "MISSED" in frame and "ended: complete" in frame
    assert [x.strip() for x in text[text.rindex("final (vk-eval"):].splitlines()[1:] if x.strip()] == headline(d)


def test_live_reads_a_stream_cut_mid_line(tmp_path):
    """`-`: records arriving over a pipe (ssh host tail -f) in pieces that cut lines; a stream that ends before
    the footer is exit 1 with one line, a finished one exit 0 with vk-eval's figures."""
    src = os.path.join(os.path.dirname(__file__), "data", "eval", "small-run.jsonl")
    data = open(src, "rb").read()
    d = json.loads(run_vk("vk-eval", src, "--json", check=True).stdout)
    for body, code in ((data, 0), (data[: data.rindex(b'{"kind":"run_end"')], 1)):
        p = subprocess.Popen([*vk_cmd("vk-eval"), "live", "-", "--interval", "0.2", "--final-json",
                              str(tmp_path / "f.json")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        for i in range(0, len(body), 97):  # 97-byte pieces: most lines arrive in several
            p.stdin.write(body[i:i + 97])
            p.stdin.flush()
            time.sleep(0.02)
        p.stdin.close()
        out = p.stdout.read().decode()
        assert p.wait(30) == code, p.stderr.read().decode()
        assert json.loads((tmp_path / "f.json").read_text())["overall"] == d["overall"]
        assert "final (vk-eval over the whole " + ("run" if code == 0 else "input") in out
        if code:
            assert "ended before the run's footer" in p.stderr.read().decode()


def test_live_bad_line_names_file_and_line(tmp_path):
    src = os.path.join(os.path.dirname(__file__), "data", "eval", "small-run.jsonl")
    bad = tmp_path / "bad.jsonl"
    lines = open(src).read().splitlines()
    bad.write_text("\n".join(lines[:2] + ['{"kind": "response", "v": 1}'] + lines[2:]) + "\n")
    p = run_vk("vk-eval", "live", str(bad), "--plain", timeout=30)
    assert p.returncode == 2 and b"bad.jsonl:3" in p.stderr and b"Traceback" not in p.stderr
    p = run_vk("vk-eval", "live", str(bad), "--slo", "ttft:p90<5", timeout=30)  # no unit: refused at once
    assert p.returncode == 2 and b"Traceback" not in p.stderr


@pytest.mark.parametrize("window", ["0s", "x"])
def test_live_bad_window(window):
    p = run_vk("vk-eval", "live", "nothing.jsonl", "--window", window, timeout=30)
    assert p.returncode == 2 and b"Traceback" not in p.stderr
