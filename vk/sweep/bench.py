"""vk-sweep bench: how long a capacity search takes against a server whose capacity is known, and how close it
lands; and, against the engine model, whether the search agrees with a dense grid at a fraction of its cost.

Known answer: vk-serve in fixed-latency mode with ``--max-num-seqs c`` is an M/D/c FIFO queue (service time
``ttft + (n - 1) * tpot`` for ``n`` output tokens). The capacity under ``ttft:p90<X`` for the probe protocol
(Poisson arrivals for the probe's duration from an empty server, the first warm-up sessions not measured) is
computed by simulating that queue (:func:`mdc_capacity`), independently of the search.
"""

from __future__ import annotations

import heapq
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np

WORKLOAD = {
    "session_generator": {
        "type": "synthetic",
        "session_graph": {"type": "single_request"},
        "channels": [{"type": "text", "body_length_generator": 40}],
        "output_spec": {"text": {"output_length_generator": 10}},
    }
}


def mdc_wait_p90(rate: float, c: int, service: float, duration: float, warmup: int, rng, reps: int = 200) -> float:
    """Median over replications of the p90 queueing wait of the measured requests of one probe."""
    out = []
    for _ in range(reps):
        n = rng.poisson(rate * duration)
        arrivals = np.sort(rng.uniform(0, duration, n))
        free = [0.0] * c  # a heap of the times the c slots are free
        waits = []
        for a in arrivals:
            start = max(a, heapq.heappop(free))
            heapq.heappush(free, start + service)
            waits.append(start - a)
        w = np.array(waits[warmup:])
        if len(w):
            out.append(np.percentile(w, 90))
    return float(np.median(out))


def mdc_capacity(wait_p90_limit: float, c: int, service: float, duration: float, warmup: int) -> float:
    """The largest Poisson rate whose p90 wait stays within the limit (bisection over the simulation)."""
    lo, hi = 0.1, 4 * c / service
    for _ in range(14):
        mid = math.sqrt(lo * hi)
        if mdc_wait_p90(mid, c, service, duration, warmup, np.random.default_rng(7)) <= wait_p90_limit:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def _sessions(path: str, count: int = 100) -> str:
    from vk.gen import generate
    from vk.jsonl import dumps

    with open(path, "wb") as fh:
        for s in generate(WORKLOAD, seed=1, count=count):
            fh.write(dumps(s))
    return path


def run(quick: bool = False) -> list[dict]:
    from vk.pipeline import serving
    from vk.sweep import sweep

    rows = []
    tmp = tempfile.mkdtemp(prefix="vk-sweep-bench-")
    try:
        sessions = _sessions(os.path.join(tmp, "sessions.jsonl"))
        # 1. known capacity: M/D/16, 130 ms of service, ttft:p90<75ms
        c, ttft, tpot, duration, warmup = 16, 0.04, 0.01, (1.5 if quick else 3.0), 10
        service = ttft + 9 * tpot
        truth = mdc_capacity(0.075 - ttft, c, service, duration, warmup)
        with serving("--ttft", str(ttft), "--tpot", str(tpot), "--max-num-seqs", str(c)) as api:
            t0 = time.monotonic()
            res = sweep(sessions, api=api, output=os.path.join(tmp, "known"), search="rate", start=40,
                        slo="ttft:p90<75ms", duration=duration, warmup=warmup, tolerance=0.2)
            wall = time.monotonic() - t0
        a = res.answer or {}
        lo, hi = a.get("last_pass"), a.get("first_fail")
        inside = lo is not None and hi is not None and lo <= truth <= hi
        rows.append({"figure": f"capacity search, vk-serve M/D/{c} (130 ms service), ttft:p90<75ms, "
                               f"{duration:g} s probes",
                     "value": f"{wall:.1f} s wall, {res.end['probe_time_s']:.1f} s probing, {res.end['probes']} "
                              f"probes; answer [{lo}, {hi}] sessions/s (confidence {a.get('confidence')}), "
                              f"true capacity {truth:.1f}",
                     "target": "interval contains the capacity; <= half a 12-point grid's probe time "
                               f"({6 * duration:g} s)",
                     "ok": inside and res.end["probe_time_s"] <= 6 * duration})
        if lo and hi:
            mid = math.sqrt(lo * hi)
            rows.append({"figure": "how close: the interval's geometric middle against the true capacity",
                         "value": f"{(mid / truth - 1) * 100:+.1f}% (interval width {(hi / lo - 1) * 100:.0f}%)",
                         "target": "-", "ok": None})
        # 2. engine model: a dense 12-point grid against the search
        grid = [2 * (i + 1) for i in range(12)]
        gdur = 1.0 if quick else 2.0
        with serving("--speed", "0.1", "--max-num-seqs", "8") as api:
            g = sweep(sessions, api=api, output=os.path.join(tmp, "engine-grid"), poisson=grid, slo="ttft:p90<300ms",
                      duration=gdur, saturation=False)
            s = sweep(sessions, api=api, output=os.path.join(tmp, "engine-search"), search="rate", start=4,
                      slo="ttft:p90<300ms", duration=gdur, tolerance=0.2)
        ga, sa = g.answer or {}, s.answer or {}
        ok = (ga.get("last_pass") is not None and sa.get("last_pass") is not None
              and ga["last_pass"] <= (sa.get("first_fail") or math.inf)
              and sa["last_pass"] <= (ga.get("first_fail") or math.inf))
        rows.append({"figure": "engine model (--speed 0.1 --max-num-seqs 8), ttft:p90<300ms: search vs dense grid",
                     "value": f"search [{sa.get('last_pass')}, {sa.get('first_fail')}] in "
                              f"{s.end['probe_time_s']:.1f} s; grid [{ga.get('last_pass')}, {ga.get('first_fail')}] "
                              f"in {g.end['probe_time_s']:.1f} s",
                     "target": "the two brackets agree (the search's last pass below the grid's first failure, and "
                               "the grid's last pass below the search's first failure)", "ok": ok})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


if __name__ == "__main__":
    for r in run(quick="--quick" in sys.argv):
        print(r)
