"""vk-send --ray's benchmark (``make bench``, stage ``ray``): what a Ray cluster costs and what limits one driver.

1. The cost of the engine: the same open-loop schedules (64-token streams) through one driver with 2 Ray workers
   (a one-node Ray cluster on this machine) and with 2 local workers, against the same vk-serve: dispatch lag and
   errors at each rate.
2. The driver's record write rate: response records (64 events each) through the driver's path alone (parse,
   ledger, counts, writer thread, one flushed line each) into a file.
3. The record transfer rate through Ray: a relay actor with records ready, drained by the driver's pump into the
   local pipe run_workers reads (Ray calls in batches of ``BATCH``), records/s.

The README projects these to a 100-node cluster: one driver carries min(write rate, transfer rate) records/s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import orjson

from vk import records
from vk.send.bench import _schedule, _Serve
from vk.send.ray_pool import SenderRelay

PY = sys.executable
STORE = 100 * 1024 * 1024


class FillRelay(SenderRelay):
    """A relay whose "worker" has ``n`` records ready at once (the transfer rate without a server)."""

    def fill(self, line: bytes, n: int) -> None:
        def put() -> None:
            for _ in range(n):
                self.out.put(line)
            self.out.put(None)

        self.proc = type("Done", (), {"exitcode": 0})()
        threading.Thread(target=put, daemon=True).start()


def _record(i: int) -> dict:
    """A response record as a worker writes it: 64 token events."""
    t = [0.05 + 0.002 * k for k in range(64)]
    rec = records.new_response("r" * 36, f"s{i}", "a", "ok", session_index=i, warmup=False, worker=0,
                               target_input_tokens=20, target_output_tokens=64, target_prefix_tokens=None)
    rec.update(http_status=200, error=None, t_intended=1.0, t_dispatched=1.0001, t_sent=1.0002,
               t_first_byte=1.04, t_first_token=1.05, t_first_content=1.05, t_last_token=1.18, t_done=1.181,
               events={"t": t, "kind": "c" * 64}, usage={"prompt_tokens": 20, "completion_tokens": 64},
               finish_reason="length", x_request_id=f"vk-0-{i}-0", attempts=1, protocol="http/1.1",
               server_request_id=f"chatcmpl-{i}", node=0)
    return rec


def bench_write_rate(tmp: str, n: int) -> dict:
    from vk.jsonl import Writer, dumps
    from vk.send.collector import Collector

    lines = [dumps(_record(i)) for i in range(n)]
    with Writer(os.path.join(tmp, "write.jsonl")) as w:
        col = Collector(w, None, False, None)
        for i in range(n):
            col.ledger.add({"index": i, "session": {"id": f"s{i}", "requests": [{"id": "a"}]}})
        col.start_writer(lambda: None)
        t0 = time.perf_counter()
        for line in lines:
            col.add(orjson.loads(line), line)
        col.stop_writer()
        dt = time.perf_counter() - t0
    return {"rate": n / dt, "bytes": len(lines[0])}


def bench_transfer_rate(n: int, streams: int = 1) -> float:
    """Records/s from ``streams`` relays at once (n each) into the driver's pipes, read as run_workers reads them."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    import ray

    from vk.send.ray_pool import RayWorker

    actors = [ray.remote(FillRelay).options(num_cpus=0, max_concurrency=4).remote() for _ in range(streams)]
    node = {"node": 0, "host": "bench", "clock": {"mono": 0.0}}
    rws = [RayWorker(ray, w, a, node, mp.get_context("fork")) for w, a in enumerate(actors)]
    line = orjson.dumps(_record(0)) + b"\n"
    ray.get([a.fill.remote(line, n) for a in actors])
    t0 = time.perf_counter()
    for rw in rws:
        rw.up.start()
    got = 0
    open_ = {rw.up_r for rw in rws}
    while open_:
        for c in wait(list(open_)):
            try:
                c.recv_bytes()
                got += 1
            except EOFError:
                open_.discard(c)
    dt = time.perf_counter() - t0
    for a in actors:
        ray.kill(a)
    return got / dt


def _send(sched: str, out: str, url: str, *extra: str) -> tuple[list, dict]:
    subprocess.run([PY, "-m", "vk.send.cli", sched, "--api", url, "--model", "vk-sim", "-o", out,
                    "--first-byte-timeout", "60", *extra], capture_output=True, timeout=300)
    recs = [orjson.loads(x) for x in open(out, "rb")] if os.path.exists(out) else []
    return [r for r in recs if r.get("kind") == "response"], (recs[-1] if recs else {})


def bench_engine(tmp: str, address: str, quick: bool) -> list[dict]:
    srv = _Serve("--ttft", "0.01", "--tpot", "0.001")
    rows = []
    try:
        for rate in ([50] if quick else [200, 400]):
            dur = 1.0 if quick else 4.0
            rng = np.random.default_rng(rate)
            starts = np.cumsum(rng.exponential(1 / rate, int(rate * dur)))
            starts -= starts[0]
            sched = os.path.join(tmp, f"eng{rate}.jsonl")
            _schedule(sched, starts, 64)
            got = {}
            for label, extra in (("local", ("--workers", "2")), ("ray", ("--ray", address))):
                resp, end = _send(sched, os.path.join(tmp, f"eng{rate}{label}.out"), srv.url, *extra)
                ok = sum(r["status"] == "ok" for r in resp)
                p50, p99 = end.get("dispatch_lag_p50"), end.get("dispatch_lag_p99")
                got[label] = (f"p99 lag {'-' if p99 is None else f'{p99 * 1e3:.2f} ms'} (p50 "
                              f"{'-' if p50 is None else f'{p50 * 1e3:.2f} ms'}), {ok}/{len(starts)} ok")
            rows.append({"figure": f"{rate}/s open loop, 64-token streams: 2 local workers vs 2 Ray workers",
                         "value": f"local: {got['local']}; Ray: {got['ray']}", "target": "(the engine's cost)",
                         "ok": None})
    finally:
        srv.stop()
    return rows


def run(quick: bool = False) -> list[dict]:
    try:
        import ray
        from ray.cluster_utils import Cluster
    except ImportError:
        return [{"figure": "vk-send --ray", "value": "Ray is not installed (pip install 'vk[ray]')", "target": "",
                 "ok": None}]
    t0 = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory(prefix="vk-ray-bench-") as tmp:
        w = bench_write_rate(tmp, 5_000 if quick else 100_000)
        rows.append({"figure": "driver record write rate (parse, ledger, counts, writer thread, flushed line)",
                     "value": f"{w['rate']:,.0f} records/s ({w['bytes']:,} bytes each: 64 events)",
                     "target": "(one driver's ceiling)", "ok": None})
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the cluster on loopback only (see tests/test_ray.py)
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": STORE,
                                                          "include_dashboard": False})
        try:
            ray.init(address=c.address, log_to_driver=False, logging_level="ERROR")
            one = bench_transfer_rate(5_000 if quick else 200_000)
            four = bench_transfer_rate(2_000 if quick else 50_000, streams=4)
            rows.append({"figure": "record transfer rate through Ray (relay actors -> driver pumps -> pipes)",
                         "value": f"{one:,.0f} records/s from one worker, {four:,.0f} records/s from 4 at once",
                         "target": "", "ok": None})
            rows += bench_engine(tmp, c.address, quick)
        finally:
            ray.shutdown()
            c.shutdown()
    rows.append({"figure": "vk-send --ray bench wall time", "value": f"{time.monotonic() - t0:.0f} s",
                 "target": "", "ok": None})
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(f"{row['figure']}: {row['value']}")
