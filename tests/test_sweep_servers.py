"""vk-sweep --server-cmd / --server-grid: the server under test started per configuration, and nothing left behind."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time

import orjson
import pytest

from tests.test_sweep import lines, sessions, sweep_cmd  # noqa: F401 - the module-scoped sessions fixture
from vk.launch import group_alive
from vk.sweep.servers import config_name, parse_server_grid

SERVE = shlex.join([sys.executable, "-m", "vk.serve.cli"]) + " --port {port} --ttft 0.02 --tpot 0.005"


def test_two_server_configurations_restart_once_and_leave_nothing(sessions, tmp_path):  # noqa: F811
    out = tmp_path / "cfg"
    args = sweep_cmd(sessions, "-o", str(out), "--server-cmd", SERVE + " --max-num-seqs {max_num_seqs}",
                     "--server-grid", "max_num_seqs=1,4", "--poisson", "5,10", "--duration", "1", "--json", "-q")
    p = subprocess.run(args, capture_output=True, timeout=180)
    assert p.returncode == 0, p.stderr.decode()
    res = orjson.loads(p.stdout)
    assert [r["sweep"]["server_params"] for r in res] == [{"max_num_seqs": 1}, {"max_num_seqs": 4}]
    pids = set()
    for name, seqs in (("max_num_seqs=1", 1), ("max_num_seqs=4", 4)):
        for probe in ("poisson-5", "poisson-10"):
            hdr = lines(out / name / probe / "run.jsonl")[0]
            assert hdr["server"]["params"]["max_num_seqs"] == seqs
            assert f"--max-num-seqs {seqs}" in hdr["server"]["cmd"]
            pids.add(hdr["server"]["pid"])
        assert (out / name / "server.log").exists()
    assert len(pids) == 2  # one start per configuration: restarted once
    for pid in pids:
        assert not group_alive(pid)
    # run again: every probe reused, and no server started at all
    p = subprocess.run(args, capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    again = orjson.loads(p.stdout)
    assert all(q.get("reused") for r in again for q in r["probes"])


def test_a_server_that_fails_to_start_is_one_error_and_nothing_runs(sessions, tmp_path):  # noqa: F811
    cmd = shlex.join([sys.executable, "-c", "import sys; print('no GPU here', file=sys.stderr); sys.exit(3)"])
    p = subprocess.run(sweep_cmd(sessions, "-o", str(tmp_path / "x"), "--server-cmd", cmd + " {port}",
                                 "--poisson", "5", "--duration", "1"), capture_output=True, timeout=60)
    err = p.stderr.decode()
    assert p.returncode == 2, err
    assert err.startswith("vk-sweep: ") and "no GPU here" in err


def test_sigint_stops_the_started_server(sessions, tmp_path):  # noqa: F811
    out = tmp_path / "int"
    proc = subprocess.Popen(sweep_cmd(sessions, "-o", str(out), "--server-cmd", SERVE, "--poisson", "5,10",
                                      "--duration", "3"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    run = out / "poisson-5" / "run.jsonl"
    while not (run.exists() and run.read_bytes().endswith(b"\n")):  # the run header is written
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    pid = lines(out / "poisson-5" / "run.jsonl")[0]["server"]["pid"]
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert not group_alive(pid)


@pytest.mark.parametrize("spec,combos", [
    ("a=1,2;b=x", [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]),
    ([{"max_num_seqs": 32}, {"max_num_seqs": 64, "block_size": 16}],
     [{"max_num_seqs": 32}, {"max_num_seqs": 64, "block_size": 16}]),
])
def test_server_grid(spec, combos):
    assert parse_server_grid(spec) == combos
    assert config_name(combos[-1]) in ("a=2,b=x", "max_num_seqs=64,block_size=16")


def test_server_grid_file(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("- {max_num_seqs: 8}\n- {max_num_seqs: 16}\n")
    assert parse_server_grid(str(f)) == [{"max_num_seqs": 8}, {"max_num_seqs": 16}]
