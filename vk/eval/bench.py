"""vk-eval bench: time and peak memory to summarise N response records with 64 events each.

The records are generated into a temporary directory (shaped like vk-send output: a run header, responses with
a role-prelude event, 62 content events with per-event token counts and a usage-only event, a run_end footer),
then ``vk.eval.evaluate`` runs in a child process so that its peak memory (ru_maxrss) is its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import orjson

EVENTS = 64


def generate(path: str, n: int, seed: int = 0, rate: float = 1000.0) -> None:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 101]))
    run = {"kind": "run", "v": 1, "run_id": "bench", "start_epoch": 1.7e9, "api": "http://127.0.0.1:8000/v1",
           "model": "vk-sim", "endpoint": "chat", "vk_version": "bench", "host": "bench", "argv": [],
           "schedule": {"kind": "schedule", "v": 1, "mode": "open", "process": "poisson", "params": {"rate": rate},
                        "seed": seed}, "lagged": False}
    kinds = "e" + "c" * (EVENTS - 2) + "u"
    tokens = [None] + [1] * (EVENTS - 2) + [None]
    batch = 20000
    start = 0.0
    with open(path, "wb") as f:
        f.write(orjson.dumps(run) + b"\n")
        for b0 in range(0, n, batch):
            m = min(batch, n - b0)
            starts = start + np.cumsum(rng.exponential(1 / rate, m))
            start = float(starts[-1])
            ttft = np.maximum(rng.gamma(4.0, 0.0125, m), 0.002)
            gaps = rng.exponential(0.01, (m, EVENTS - 3))
            tok = (starts + ttft)[:, None] + np.concatenate([np.zeros((m, 1)), np.cumsum(gaps, 1)], 1)
            t = np.concatenate([(starts + 0.001)[:, None], tok, tok[:, -1:] + 0.0005], 1)  # prelude, tokens, usage
            t = np.round(t, 6)
            tl = t.tolist()
            st = np.round(starts, 6).tolist()
            lines = []
            for i in range(m):
                ti = tl[i]
                s = st[i]
                rec = {"kind": "response", "v": 1, "run_id": "bench", "session_id": f"s{b0 + i}", "request_id": "r0",
                       "session_index": b0 + i, "worker": 0, "status": "ok", "http_status": 200,
                       "t_intended": s, "t_dispatched": s, "t_sent": s, "t_first_byte": ti[0],
                       "t_first_token": ti[1], "t_first_content": ti[1], "t_last_token": ti[-2],
                       "t_done": ti[-1], "events": {"t": ti, "tokens": tokens, "kind": kinds},
                       "usage": {"prompt_tokens": 512, "completion_tokens": EVENTS - 2, "cached_tokens": 0},
                       "finish_reason": "length", "target_input_tokens": 512, "target_output_tokens": EVENTS - 2}
                lines.append(orjson.dumps(rec))
            f.write(b"\n".join(lines) + b"\n")
        f.write(orjson.dumps({"kind": "run_end", "v": 1, "run_id": "bench", "lagged": False}) + b"\n")
        # written back to disk before the timed summary, which would otherwise share the machine with the
        # kernel's writeback of the file just generated
        f.flush()
        os.fsync(f.fileno())


CHILD = """
import sys, time, resource
t0 = time.perf_counter()
from vk.eval import evaluate
r = evaluate(sys.argv[1], goodput="ttft<1s,tpot<50ms", cache=sys.argv[3] == "cache")
el = time.perf_counter() - t0
assert r.to_dict()["overall"]["counts"]["ok"] == int(sys.argv[2])
ru = resource.getrusage(resource.RUSAGE_SELF)
print(el, ru.ru_maxrss, ru.ru_utime + ru.ru_stime)
"""


def run(quick: bool = False) -> list[dict]:
    n = 20_000 if quick else 1_000_000
    with tempfile.TemporaryDirectory(prefix="vk-eval-bench-") as tmp:
        path = os.path.join(tmp, "run.jsonl")
        g0 = time.perf_counter()
        generate(path, n)
        gen_s = time.perf_counter() - g0
        size = os.path.getsize(path)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        p = subprocess.run([sys.executable, "-c", CHILD, path, str(n), "cold"], capture_output=True, text=True)
        if p.returncode != 0:
            return [{"figure": f"vk-eval: summarise {n:,} responses x {EVENTS} events",
                     "value": "failed: " + (p.stderr.strip().splitlines() or ["?"])[-1], "target": "< 10 s",
                     "ok": False}]
        el, rss_kb, cpu = p.stdout.split()
        el = float(el)
        cpu = float(cpu)
        rss_mb = int(rss_kb) / 1024
        # --cache: the first run writes the cache (timed too), the second reads it
        cached = []
        for _ in range(2):
            p = subprocess.run([sys.executable, "-c", CHILD, path, str(n), "cache"], capture_output=True, text=True)
            cached.append(p.stdout.split() if p.returncode == 0 else None)
    target = 10.0
    cache_rows = []
    if all(cached):
        (w_el, _, _), (c_el, c_rss, c_cpu) = cached
        cache_rows = [{"figure": "vk-eval --cache: the same summary from the cache (first run writes it)",
                       "value": f"{float(c_el):.2f} s, {float(c_cpu):.1f} s CPU, {int(c_rss) / 1024:,.0f} MiB "
                                f"(writing: {float(w_el):.1f} s)", "target": "-", "ok": None}]
    return [
        {"figure": f"vk-eval: summarise {n:,} responses x {EVENTS} events ({size / 1e6:,.0f} MB JSONL)",
         "value": f"{el:.2f} s ({n / el:,.0f} responses/s)", "target": f"< {target:g} s at 1M",
         "ok": el < target if not quick else None},
        {"figure": "vk-eval: CPU time of that summary (user+sys; load average before it)",
         "value": f"{cpu:.1f} s (load {load:.1f})", "target": "-", "ok": None},
        {"figure": "vk-eval: peak memory (RSS) of that summary", "value": f"{rss_mb:,.0f} MiB", "target": "reported",
         "ok": None},
        *cache_rows,
        {"figure": f"vk-eval bench: generating the {n:,}-record input", "value": f"{gen_s:.1f} s", "target": "-",
         "ok": None},
    ]


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    for row in run(quick):
        print(f"{row['figure']:<70} {row['value']:>28}  target {row['target']:<10} "
              f"{'' if row['ok'] is None else ('ok' if row['ok'] else 'MISSED')}")
