"""vk-send --ray: one run across a Ray cluster of two nodes started on this machine.

The cluster is expensive (two raylets; about 15 s to start on two cores), so one test runs every cluster check in
turn, ending with the one that removes a node: under pytest-xdist it runs once, in one worker.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import orjson
import pytest
from conftest import run_vk, vk_cmd
from test_send import closed_schedule, open_schedule, read_run, req, responses, session, write_jsonl

from vk import records
from vk.errors import VkError
from vk.jsonl import ListWriter
from vk.send import send
from vk.send.ray_pool import RAY_MISSING, measure_offset

STORE = 80 * 1024 * 1024  # object store per node (the minimum Ray accepts is about 75 MB)


def test_missing_ray_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if it were not installed
    with pytest.raises(VkError) as e:
        send([session("s0", [req("a")])], api="http://127.0.0.1:9/v1", model="m", ray="auto", output=ListWriter(),
             quiet=True, handle_signals=False)
    assert str(e.value) == RAY_MISSING


def test_unreachable_cluster_is_one_clear_line(serve):
    pytest.importorskip("ray")
    srv = serve()
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(VkError, match=f"--ray 127.0.0.1:{port}: cannot reach the Ray cluster"):
        send([session("s0", [req("a")])], api=srv.url, ray=f"127.0.0.1:{port}", output=ListWriter(), quiet=True,
             handle_signals=False)
    assert time.monotonic() - t0 < 10  # Ray alone would retry for minutes


def test_clock_offset_keeps_the_tightest_round_trip():
    """A node 5 s ahead, reached over a path that is slow one way on most round trips: the estimate comes from
    the quickest round trip and is off by no more than its stated uncertainty."""
    delays = iter([(0.02, 0.001), (0.001, 0.001), (0.015, 0.0), (0.0005, 0.0005)] * 2)

    def ping():
        there, back = next(delays)
        time.sleep(there)
        t = (time.monotonic() + 5.0, time.time() + 5.0)
        time.sleep(back)
        return t

    c = measure_offset(ping, rounds=8)
    assert c["samples"] == 8 and c["rtt"] < 0.005
    assert abs(c["mono"] - 5.0) <= c["uncertainty"] and abs(c["wall"] - 5.0) <= c["uncertainty"] + 1e-4


@pytest.fixture(scope="module")
def cluster():
    # Keep the whole cluster on loopback: by default Ray binds its nodes to the machine's own network address,
    # and the tests may reach only 127.0.0.1 (the variable makes Ray take the loopback address, as on macOS).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": STORE,
                                                      "include_dashboard": False})
    extra = c.add_node(num_cpus=1, object_store_memory=STORE)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, logging_level="ERROR")
    try:
        yield c, extra
    finally:
        ray.shutdown()
        c.shutdown()


def _ttft_and_truth(rs):
    ttft = float(np.median([r["t_first_token"] - r["t_sent"] for r in rs]))
    err = float(np.median([abs(a - b) for r in rs for a, b in zip(r["events"]["t"], r["events"]["server_t"],
                                                                      strict=True)]))
    return ttft, err


def _summary(rs):
    return sorted((r["session_id"], r["request_id"], r["status"], (r["usage"] or {}).get("completion_tokens"))
                  for r in rs)


def _vk_send(*args):
    return subprocess.Popen([*vk_cmd("vk-send"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_responses(path, n, proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and open(path, "rb").read().count(b'"kind":"response"') >= n:
            return
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} responses after {timeout} s")


def _ppid(pid: str) -> str:
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]


def _descends_from_me(pid: str) -> bool:
    """Whether this test process started it (through the cluster's raylet): another suite's Ray workers on the
    same machine are not ours to kill."""
    me = str(os.getpid())
    for _ in range(12):
        pid = _ppid(pid)
        if pid == me:
            return True
        if pid in ("0", "1"):
            return False
    return False


def _ray_worker_pid() -> int:
    """The pid of a vk-send worker process forked by a Ray relay actor of this test's cluster (it carries the
    actor's process title, and so does its parent)."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read()
            ppid = _ppid(d)
            parent = open(f"/proc/{ppid}/cmdline", "rb").read()
            if b"SenderRelay" in cmd and b"SenderRelay" in parent and _descends_from_me(d):
                return int(d)
        except OSError:
            continue
    raise AssertionError("no vk-send worker under a Ray relay")


def _accounted_once(recs, sched):
    """Every request of the schedule is accounted for exactly once: a record, or its session not started."""
    rs = responses(recs)
    keys = [(r["session_id"], r["request_id"]) for r in rs]
    assert len(keys) == len(set(keys))  # no request twice
    end = recs[-1]
    assert end["kind"] == "run_end"
    wanted = {s["session"]["id"]: {q["id"] for q in s["session"]["requests"]} for s in sched[1:]}
    got: dict[str, set] = {}
    for sid, rid in keys:
        got.setdefault(sid, set()).add(rid)
    for sid, rids in got.items():
        assert rids == wanted[sid]  # a started session has a record for every request
    assert end["sessions_started"] == len(got)
    assert end["sessions_started"] + end["sessions_not_started"] == len(wanted) == end["sessions_scheduled"]
    assert end["requests"] == len(rs)


def test_ray_cluster_runs_as_one_run(cluster, serve, tmp_path):
    import ray

    c, extra = cluster
    srv = serve("--ttft", "0.05", "--tpot", "0.01", "--server-timestamps")

    # -- the same schedule locally and on the cluster: the same requests, statuses, tokens; the same accuracy ----
    sessions = [session(f"s{i}", [req("a", out=6), req("b", parents=["a"], history="a", out=4)])
                for i in range(16)]
    sched = open_schedule(sessions, [i * 0.03 for i in range(16)])
    local, remote = ListWriter(), ListWriter()
    send(sched, api=srv.url, output=local, workers=2, handle_signals=False, quiet=True)
    end = send(sched, api=srv.url, output=remote, ray=c.address, handle_signals=False, quiet=True)
    for n, rec in enumerate(remote.records, 1):
        records.validate(rec, "ray run", n)
    head = remote.records[0]
    assert [r["kind"] for r in remote.records].count("run") == 1 and remote.records[-1] == end
    assert end["ended"] == "complete" and end["workers"] == 2 and head["workers"] == 2
    rs_local, rs_ray = responses(local.records), responses(remote.records)
    assert _summary(rs_ray) == _summary(rs_local) and all(r["status"] == "ok" for r in rs_ray)
    # two nodes, a worker on each; a session stays on one worker; every record says where it ran
    nodes = head["ray"]["nodes"]
    assert len(nodes) == 2 and sorted(w for n in nodes for w in n["workers"]) == [0, 1]
    node_of = {w: n["node"] for n in nodes for w in n["workers"]}
    assert all(r["node"] == node_of[r["worker"]] and r["worker"] == r["session_index"] % 2 for r in rs_ray)
    for n in nodes:  # one machine: the offset is measured, and it is about zero
        assert 0 < n["clock_uncertainty"] < 0.01 and abs(n["clock_offset"]) <= n["clock_uncertainty"] + 0.001
        assert n["clock_samples"] >= 8 and n["open_files_limit"] > 0
    assert [x["node"] for x in end["ray_nodes"]] == [0, 1]
    assert all(abs(x["clock_drift"]) < 0.01 and x["dispatch_lag_p99"] is not None for x in end["ray_nodes"])
    ttft_l, err_l = _ttft_and_truth(rs_local[2:])
    ttft_r, err_r = _ttft_and_truth(rs_ray[2:])
    assert abs(ttft_l - 0.05) < 0.005 and abs(ttft_r - 0.05) < 0.005
    assert err_l < 0.002 and err_r < 0.002  # event times against vk-serve's own send times

    # -- a closed loop keeps exactly N sessions active across the cluster (two workers per one-CPU node, N of them
    # in use) ---------------------------------------------------------------------------------------------------
    n = 3
    fast = serve("--ttft", "0.03", "--tpot", "0.003")
    w = ListWriter()
    end = send(closed_schedule([session(f"c{i}", [req("a", out=10)]) for i in range(24)], n), api=fast.url,
               output=w, ray=c.address, workers_per_node=2, handle_signals=False, quiet=True)
    rs = responses(w.records)
    assert end["ended"] == "complete" and len(rs) == 24 and all(r["status"] == "ok" for r in rs)
    assert w.records[0]["ray"]["workers_per_node"] == 2 and end["workers"] == n
    assert {r["node"] for r in rs} == {0, 1} and {r["worker"] for r in rs} == {0, 1, 2}
    edges = sorted([(r["t_dispatched"], 1) for r in rs] + [(r["t_done"], -1) for r in rs])
    cur = peak = 0
    for _, d in edges:
        cur += d
        peak = max(peak, cur)
    assert peak == n

    # -- SIGINT on the driver: the cluster's workers stop, the file is complete ---------------------------------
    slow = [session(f"i{i}", [req("a", out=40)]) for i in range(40)]
    sched = open_schedule(slow, [i * 0.05 for i in range(40)])
    path = write_jsonl(tmp_path / "int.jsonl", sched)
    out = str(tmp_path / "int.out")
    p = _vk_send(path, "--api", srv.url, "--ray", c.address, "-o", out)
    _wait_for_responses(out, 3, p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err.decode()
    recs = read_run(out)
    assert recs[-1]["ended"] == "interrupted"
    _accounted_once(recs, sched)
    assert any(r["status"] == "cancelled" for r in responses(recs))  # in flight when stopped
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 2:  # the driver's actors are gone: their CPUs are free
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)

    # -- one node's worker killed mid-run: its requests in flight are records with the reason, the rest not started
    sched = open_schedule(slow, [i * 0.1 for i in range(40)])
    path = write_jsonl(tmp_path / "lost.jsonl", sched)
    out = str(tmp_path / "lost.out")
    p = _vk_send(path, "--api", srv.url, "--ray", c.address, "-o", out)
    _wait_for_responses(out, 4, p)
    os.kill(_ray_worker_pid(), signal.SIGKILL)
    _, err = p.communicate(timeout=90)
    assert p.returncode == 3, err.decode()  # worker_lost
    recs = read_run(out)
    end = recs[-1]
    assert end["ended"] == "worker_lost" and "Ray worker on node" in end["reason"]
    assert "killed by SIGKILL" in end["reason"]
    _accounted_once(recs, sched)
    (lost,) = end["workers_lost"]
    w = lost["worker"]
    gone = [r for r in responses(recs) if (r.get("error") or "").startswith("worker lost:")]
    assert lost["requests_lost"] == len(gone) >= 1 and lost["sessions_not_started"] >= 1
    assert all(r["status"] == "cancelled" and r["worker"] == w and "Ray worker on node" in r["error"] for r in gone)
    assert [x["workers_lost"] for x in end["ray_nodes"]].count([w]) == 1
    survivor = [r for r in responses(recs) if r["worker"] != w]
    assert survivor and all(r["status"] == "ok" for r in survivor)
    # per-node figures from vk-eval: the lost node's group holds the lost requests
    ev = orjson.loads(run_vk("vk-eval", out, "--group-by", "node", "--json", check=True).stdout)
    counts = {g["key"]["node"]: g["summary"]["counts"] for g in ev["groups"]}
    lost_node = str(next(n["node"] for n in recs[0]["ray"]["nodes"] if w in n["workers"]))
    assert sorted(counts) == ["0", "1"] and counts[lost_node]["cancelled"] == len(gone)

    # -- a whole node lost, with --reassign-lost: its sessions still due run on the node that is left ------------
    # (Ray notices a removed node only after a few seconds: the schedule runs longer than that)
    sched = open_schedule([session(f"m{i}", [req("a", out=40)]) for i in range(80)], [i * 0.1 for i in range(80)])
    path = write_jsonl(tmp_path / "moved.jsonl", sched)
    out = str(tmp_path / "moved.out")
    p = _vk_send(path, "--api", srv.url, "--ray", c.address, "--reassign-lost", "-o", out)
    _wait_for_responses(out, 4, p)
    c.remove_node(extra, allow_graceful=False)
    _, err = p.communicate(timeout=90)
    assert p.returncode == 3, err.decode()
    recs = read_run(out)
    _accounted_once(recs, sched)
    (lost,) = recs[-1]["workers_lost"]
    assert "Ray worker on node" in lost["how"] and "lost" in lost["how"]
    assert lost["sessions_reassigned"] >= 1 and lost["sessions_not_started"] == 0
    assert recs[-1]["sessions_not_started"] == 0  # every session ran, on the node that was left where needed
    moved = [r for r in responses(recs) if r["session_index"] % 2 == lost["worker"] and r["worker"] != lost["worker"]]
    assert len(moved) == lost["sessions_reassigned"] and all(r["status"] == "ok" for r in moved)
