"""Bench for vk-serve: streamed tokens/s with 1,000 concurrent streams on one core, and step-timing error.

The server runs in a subprocess pinned to CPU 0; the load client runs here, pinned to CPU 1 (when the machine
has two cores), as a minimal HTTP/1.1 client on asyncio protocols that counts content events without parsing
JSON. Each of the N connections sends streaming chat requests back to back (keep-alive) with ``ignore_eos``.

The engine is configured with a constant step time (``--t-fixed``, every other constant 0) so that the offered
load is known: N streams / step time tokens per second. The figures:

- tokens/s the client received during the window (target >= 50,000 with 1,000 streams);
- tokens per CPU-second of the server process (user + system time from /proc): what one core sustains,
  independent of other processes competing for the machine's cores (wall-clock figures are not);
- step-timing error: how late steps end versus the model (server's ``vk_serve_step_lag_seconds`` histogram,
  window difference), as the share of steps within 1 ms and the mean;
- the same load in fixed-latency mode (``--ttft``/``--tpot``): tokens/s, and how late tokens are written versus
  their planned times (the same histogram counts tokens in that mode).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request

import orjson

PAT = b'"delta":{"content":'


def _metrics(base: str) -> dict:
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    out = {}
    for ln in text.splitlines():
        if ln.startswith("vk_serve_step_lag_seconds") or ln.startswith("vk_serve_steps_total"):
            name, val = ln.rsplit(" ", 1)
            le = re.search(r'le="([^"]+)"', name)
            key = name.split("{", 1)[0] + (f'{{le="{le.group(1)}"}}' if le else "")
            out[key] = float(val)
    return out


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), or NaN elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def _lag_summary(m0: dict, m1: dict) -> tuple[float, float, float]:
    """(share of steps within 1 ms, mean lag, count) over the window."""
    def d(key):
        return m1.get(key, 0.0) - m0.get(key, 0.0)

    n = d("vk_serve_step_lag_seconds_count")
    within = d('vk_serve_step_lag_seconds_bucket{le="0.001"}')
    mean = d("vk_serve_step_lag_seconds_sum") / n if n else float("nan")
    return (within / n if n else float("nan")), mean, n


def _load(host: str, port: int, streams: int, max_tokens: int, warmup: float, window: float, base: str,
          pid: int):
    """A raw-socket load client: ``streams`` keep-alive connections, each sending streaming requests back to back.

    It polls epoll without blocking, in 1 ms ticks, as a loaded client does: a reader that blocks in epoll until
    each single event arrives makes every server write pay for waking it up (in this VM that triples the server's
    cost per token), which measures the client's idleness rather than the server. Content events are counted
    without parsing JSON.
    """
    import random
    import select
    import socket

    rng = random.Random(1)

    def request() -> bytes:
        body = orjson.dumps({"model": "vk-sim", "messages": [{"role": "user", "content": "Tell me a story."}],
                             "stream": True, "max_tokens": rng.randint(max_tokens // 2, max_tokens * 3 // 2),
                             "ignore_eos": True, "stream_options": {"include_usage": True}})
        return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: %s:%d\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (host.encode(), port, len(body), body))

    from vk.serve.server import raise_fd_limit

    raise_fd_limit()
    ep = select.epoll()
    conns = {}
    for _ in range(streams):
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        ep.register(sock.fileno(), select.EPOLLIN)
        conns[sock.fileno()] = [sock, b""]
        sock.send(request())
    tokens = lost = 0
    t_start = time.perf_counter()
    t_window = t_start + warmup
    t_stop = t_window + window
    m0 = None
    k0 = 0
    tick = 0.001
    while True:
        t = time.perf_counter()
        if m0 is None and t >= t_window:
            k0, t0, c0 = tokens, time.perf_counter(), _cpu_seconds(pid)
            m0 = _metrics(base)
        if t >= t_stop:
            break
        for fd, _ev in ep.poll(0):
            c = conns.get(fd)
            if c is None:
                continue
            try:
                data = c[0].recv(262144)
            except BlockingIOError:
                continue
            if not data:
                ep.unregister(fd)
                del conns[fd]
                lost += 1
                continue
            d = c[1] + data
            tokens += d.count(PAT)
            if b"data: [DONE]" in d:
                c[1] = b""
                c[0].send(request())
            else:
                c[1] = d[-(len(PAT) - 1):]
        spent = time.perf_counter() - t
        if spent < tick:
            time.sleep(tick - spent)
    t1, k1, c1 = time.perf_counter(), tokens, _cpu_seconds(pid)
    m1 = _metrics(base)
    for c in conns.values():
        c[0].close()
    ep.close()
    return (k1 - k0) / (t1 - t0), m0, m1, lost, (k1 - k0) / (c1 - c0) if c1 > c0 else float("nan")


def measure(streams: int = 1000, step: float = 0.018, warmup: float = 2.0, window: float = 5.0,
            max_tokens: int = 400, extra_args: tuple = ()) -> dict:
    """Run the server and the load; return tokens/s and step-lag figures."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    server_cpu, client_cpu = cpus[0], cpus[-1]
    args = ["--host", "127.0.0.1", "--port", "0", "--max-num-seqs", str(streams + 8), "--t-fixed", str(step),
            "--t-weights", "0", "--t-token", "0", "--t-kv", "0", *extra_args]
    code = (f"import os,sys; os.sched_setaffinity(0, {{{server_cpu}}}) if hasattr(os, 'sched_setaffinity') "
            "else None; from vk.serve.cli import main; main(sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        url = proc.stdout.readline().strip()
        if not url.startswith("http"):
            raise RuntimeError(f"vk-serve did not start: {proc.stderr.read()}")
        base = url[:-3]
        host, port = re.match(r"http://([^:]+):(\d+)", url).groups()
        if hasattr(os, "sched_setaffinity"):
            old = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {client_cpu})
        try:
            tps, m0, m1, lost, per_cpu = _load(host, int(port), streams, max_tokens, warmup, window, base,
                                               proc.pid)
        finally:
            if hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, old)
        within, mean, nsteps = _lag_summary(m0, m1)
        return {"tokens_per_s": tps, "offered": streams / step, "steps": nsteps, "lag_within_1ms": within,
                "lag_mean": mean, "tokens_per_cpu_s": per_cpu, "lost": lost, "same_core": server_cpu == client_cpu}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(quick: bool = False) -> list[dict]:
    if quick:
        r = measure(streams=100, step=0.01, warmup=0.8, window=1.0, max_tokens=100)
        f = measure(streams=100, step=0.01, warmup=0.8, window=1.0, max_tokens=100,
                    extra_args=("--ttft", "0.02", "--tpot", "0.01"))
        label = "100 streams (quick)"
    else:
        r = measure()
        # fixed-latency mode, the same offered load: each token is due at arrival + ttft + k tpot
        f = measure(extra_args=("--ttft", "0.02", "--tpot", "0.018"))
        label = "1,000 streams"
    note = " (server and client share one core)" if r["same_core"] else ""
    return [
        {"figure": f"vk-serve streamed tokens/s, {label}, server on one core{note}",
         "value": f"{r['tokens_per_s']:,.0f} (offered {r['offered']:,.0f})",
         "target": ">= 50,000" if not quick else "-", "ok": (r["tokens_per_s"] >= 50000) if not quick else None},
        {"figure": f"vk-serve streamed tokens per CPU-second of the server, {label} (capacity of one core)",
         "value": f"{r['tokens_per_cpu_s']:,.0f}", "target": ">= 50,000" if not quick else "-",
         "ok": (r["tokens_per_cpu_s"] >= 50000) if not quick else None},
        {"figure": f"vk-serve step ends within 1 ms of the model, {label}",
         "value": f"{100 * r['lag_within_1ms']:.1f}% of {r['steps']:.0f} steps (mean lag {1e3 * r['lag_mean']:.2f} ms)",
         "target": ">= 99%" if not quick else "-", "ok": (r["lag_within_1ms"] >= 0.99) if not quick else None},
        {"figure": f"vk-serve fixed-latency mode: streamed tokens/s and tokens within 1 ms of their time, {label}",
         "value": f"{f['tokens_per_s']:,.0f} (offered {f['offered']:,.0f}); {100 * f['lag_within_1ms']:.1f}% "
                  f"(mean lag {1e3 * f['lag_mean']:.2f} ms)",
         "target": ">= 99%" if not quick else "-", "ok": (f["lag_within_1ms"] >= 0.99) if not quick else None},
    ]


if __name__ == "__main__":
    import json

    quick = "--quick" in sys.argv
    for row in run(quick):
        print(json.dumps(row))
