"""vk-send's benchmark (``make bench``): dispatch capacity, event-timestamp accuracy, concurrent streams.

Each figure runs ``vk-send --workers 1`` pinned to core 0 against ``vk-serve`` pinned to core 1:

1. the highest open-loop Poisson rate of single-request sessions with 64-token streams that one worker sustains
   with p99 dispatch lag under 1 ms (and the events/s that carries);
2. the event-timestamp error against vk-serve's own send times (``--server-timestamps``) with 1,000 concurrent
   streams at 20 tokens/s, delivered in bursts (the engine model with a fixed 50 ms step: every stream gets its
   token in the same step, as a batching server does), for the raw client with kernel receive timestamps, the
   same client timing in Python after the read, aiohttp, and the raw client over https (TLS through memory BIOs,
   self-signed certificate passed with --cacert), each with vk-send's CPU time per event;
3. the largest number of concurrent open streams held without errors (and the open-file limit);
4. p99 dispatch lag with ``--scrape`` (the server's /metrics every second) against the same schedule without it,
   in alternating runs, so that the difference can be read against the run-to-run spread.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import orjson

from vk import records

PY = sys.executable


def _affinity(cpu: int):
    def fn():
        if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > cpu:
            os.sched_setaffinity(0, {cpu})

    return fn


class _Serve:
    def __init__(self, *args: str):
        self.proc = subprocess.Popen([PY, "-m", "vk.serve.cli", "--host", "127.0.0.1", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=_affinity(1), env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = self.proc.stdout.readline()
        if not line.startswith("http"):
            self.proc.kill()
            raise RuntimeError(f"vk-serve did not start: {line!r} {self.proc.stderr.read()[-500:]}")
        self.url = line.strip()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _schedule(path: str, starts, out_tokens: int, prompt: str = "Hello there, tell me a story.") -> None:
    with open(path, "wb") as f:
        f.write(orjson.dumps(records.new_schedule("open", "bench", seed=0)) + b"\n")
        for i, t in enumerate(starts):
            s = records.new_session(f"s{i}", [records.new_request(
                "a", messages=[{"role": "user", "content": prompt}], output_tokens=out_tokens,
                output_control="ignore_eos")])
            f.write(orjson.dumps(records.new_scheduled_session(s, float(t), i)) + b"\n")


_LAST_CPU = [0.0]


def _send(sched: str, out: str, url: str, *extra: str, timeout: float = 300) -> tuple[list[dict], dict, str]:
    import resource

    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run([PY, "-m", "vk.send.cli", sched, "--api", url, "--model", "vk-sim", "-o", out,
                        "--workers", "1", "--first-byte-timeout", "60", *extra],
                       capture_output=True, preexec_fn=_affinity(0), timeout=timeout)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # only vk-send was reaped in between
    _LAST_CPU[0] = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    recs = [orjson.loads(x) for x in open(out, "rb")] if os.path.exists(out) else []
    resp = [r for r in recs if r.get("kind") == "response"]
    end = recs[-1] if recs and recs[-1].get("kind") == "run_end" else {}
    return resp, end, p.stderr.decode()[-300:]


def bench_rate(tmp: str, quick: bool) -> list[dict]:
    srv = _Serve("--ttft", "0.01", "--tpot", "0.001")
    rates = [50] if quick else [100, 200, 300, 400, 500, 600, 800, 1000]
    dur = 1.0 if quick else 4.0
    best = None
    tried = []
    try:
        for rate in rates:
            rng = np.random.default_rng(rate)
            n = int(rate * dur)
            starts = np.cumsum(rng.exponential(1 / rate, n))
            starts -= starts[0]
            sched = os.path.join(tmp, f"rate{rate}.jsonl")
            _schedule(sched, starts, 64)
            resp, end, err = _send(sched, os.path.join(tmp, f"rate{rate}.out"), srv.url)
            ok = [r for r in resp if r["status"] == "ok"]
            p99 = end.get("dispatch_lag_p99")
            span = max(r["t_done"] for r in ok) - min(r["t_dispatched"] for r in ok) if ok else 1
            events = sum(len(r["events"]["t"]) for r in ok)
            got = {"rate": rate, "p99": p99, "errors": len(resp) - len(ok), "events_s": events / span,
                   "cpu_event": _LAST_CPU[0] / max(events, 1), "cpu_share": _LAST_CPU[0] / span,
                   "p50": end.get("dispatch_lag_p50"),
                   "achieved": (len(ok) - 1) / (max(r["t_dispatched"] for r in ok) - min(r["t_dispatched"]
                                                                                      for r in ok))}
            tried.append(got)
            if p99 is not None and p99 < 0.001 and got["errors"] == 0 and len(resp) == n:
                best = got
            elif not quick and p99 is not None and p99 > 0.05 and rate >= 800:
                break  # far off at a high rate: higher ones will not pass
            # a failure at a lower rate does not end the search: on a shared machine another process taking the
            # core for a few milliseconds fails one run, and the per-rate figures below show it
    finally:
        srv.stop()
    cpu = [f"{t['rate']}/s: {t['cpu_event'] * 1e6:.1f} us/event, {t['cpu_share'] * 100:.0f}% of a core"
           for t in tried]
    cpu_row = {"figure": "vk-send CPU (user+sys) per streamed event, all work included (load-independent)",
               "value": "; ".join(cpu), "target": "(capacity: 1 core / this)", "ok": None}
    detail = "; ".join(f"{t['rate']}/s: p99 lag {t['p99'] * 1e3:.2f} ms" if t["p99"] is not None
                       else f"{t['rate']}/s: no data" for t in tried)
    if best is None:
        return [{"figure": "open-loop Poisson rate at p99 dispatch lag < 1 ms (1 worker, 64-token streams)",
                 "value": f"none passed ({detail}; machine load {os.getloadavg()[0]:.1f})", "target": ">= 400 req/s",
                 "ok": False}, cpu_row]
    return [
        {"figure": "open-loop Poisson rate at p99 dispatch lag < 1 ms (1 worker, 64-token streams)",
         "value": f"{best['rate']} req/s (achieved {best['achieved']:.0f}/s, p99 lag {best['p99'] * 1e3:.2f} ms; "
                  f"{detail})",
         "target": ">= 400 req/s", "ok": None if quick else best["rate"] >= 400},
        {"figure": "streamed events/s at that rate (1 worker)", "value": f"{best['events_s']:,.0f}",
         "target": ">= 25,000", "ok": None if quick else best["events_s"] >= 25000},
        cpu_row,
    ]


def _self_signed(tmp: str) -> tuple[str, str] | None:
    """A throw-away certificate for 127.0.0.1 (openssl command), or None without openssl."""
    cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
    try:
        # an ECDSA P-256 key: the server's handshakes cost a fraction of RSA's (1,000 connections open at once)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", key, "-out", cert,
                        "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return cert, key


def bench_timestamps(tmp: str, quick: bool) -> list[dict]:
    n = 100 if quick else 1000
    tokens = 20 if quick else 60
    server_args = ("--server-timestamps", "--t-fixed", "0.05", "--t-weights", "0", "--t-token", "0", "--t-kv", "0",
                   "--max-num-seqs", str(max(n, 256)), "--max-num-batched-tokens", "1000000",
                   "--num-blocks", "1000000")
    srv = _Serve(*server_args)
    tls = _self_signed(tmp)
    srv_tls = _Serve(*server_args, "--tls-cert", tls[0], "--tls-key", tls[1]) if tls else None
    rows = []
    try:
        starts = np.linspace(0, 0.5, n)
        sched = os.path.join(tmp, "ts.jsonl")
        _schedule(sched, starts, tokens, prompt="hi")
        variants = [("raw client, kernel receive timestamps", srv, []),
                    ("raw client, time taken after the read", srv, ["--no-kernel-timestamps"])]
        if not quick:
            variants.append(("aiohttp client", srv, ["--client", "aiohttp"]))
        if srv_tls is not None:
            variants.append(("https, raw client over TLS, kernel receive timestamps", srv_tls,
                             ["--cacert", tls[0]]))
        else:
            rows.append({"figure": "event-timestamp error over https", "value": "not measured (no openssl command)",
                         "target": "p99 < 2 ms", "ok": None})
        for name, server, extra in variants:
            resp, end, err = _send(sched, os.path.join(tmp, "ts.out"), server.url, *extra)
            errs = []
            peak = 0
            for r in resp:
                ev = r.get("events") or {}
                st = ev.get("server_t")
                if r["status"] != "ok" or not st:
                    continue
                for k, a, b in zip(ev["kind"], ev["t"], st, strict=False):
                    if k == "c" and b is not None:
                        errs.append(a - b)
            if resp:
                edges = sorted([(r["t_sent"] or 0, 1) for r in resp] + [(r["t_done"] or 0, -1) for r in resp])
                cur = 0
                for _, d in edges:
                    cur += d
                    peak = max(peak, cur)
            nerr = sum(r["status"] != "ok" for r in resp)
            if not errs:
                rows.append({"figure": f"event-timestamp error, {n} streams in bursts ({name})",
                             "value": f"no data ({nerr} errors; {err.strip()[-120:]})", "target": "p99 < 2 ms",
                             "ok": False})
                continue
            e = np.abs(np.array(errs))
            ok = bool(np.percentile(e, 99) < 0.002) and nerr == 0
            events = sum(len(r["events"]["t"]) for r in resp if r["status"] == "ok")
            measured = "kernel receive timestamps" in name
            rows.append({
                "figure": f"event-timestamp error, {n} streams x 20 tok/s in bursts ({name})",
                "value": f"p50 {np.percentile(e, 50) * 1e3:.3f} ms, p99 {np.percentile(e, 99) * 1e3:.3f} ms, "
                         f"max {e.max() * 1e3:.2f} ms over {len(e):,} events; peak {peak} open streams, "
                         f"{nerr} errors; CPU {_LAST_CPU[0] / max(events, 1) * 1e6:.1f} us/event",
                "target": "p99 < 2 ms" if measured else "(comparison)",
                "ok": (None if quick else ok) if measured else None,
            })
    finally:
        srv.stop()
        if srv_tls is not None:
            srv_tls.stop()
    return rows


def bench_streams(tmp: str, quick: bool) -> list[dict]:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    sizes = [200] if quick else [2500, 5000, 10000]
    best = None
    note = ""
    for n in sizes:
        srv = _Serve("--ttft", "4", "--tpot", "0.5")
        try:
            starts = np.linspace(0, 2.5, n)
            sched = os.path.join(tmp, f"streams{n}.jsonl")
            _schedule(sched, starts, 3, prompt="hi")
            resp, end, err = _send(sched, os.path.join(tmp, f"streams{n}.out"), srv.url, "--lag-threshold", "1")
        finally:
            srv.stop()
        nerr = sum(r["status"] != "ok" for r in resp)
        edges = sorted([(r["t_sent"] or 0, 1) for r in resp] + [(r["t_done"] or 0, -1) for r in resp])
        cur = peak = 0
        for _, d in edges:
            cur += d
            peak = max(peak, cur)
        if nerr == 0 and len(resp) == n:
            best = (n, peak)
        else:
            kinds = sorted({(r.get("error") or "")[:60] for r in resp if r["status"] != "ok"})[:2]
            note = f"; {n}: {nerr} errors {kinds}"
            break
    lim = f"open-file limit {hard} (hard), raised from {soft}" if soft < hard else f"open-file limit {hard}"
    value = (f"{best[0]:,} streams (peak {best[1]:,} open at once); {lim}{note}" if best
             else f"none held ({lim}{note})")
    return [{"figure": "concurrent open streams held without errors (1 worker)", "value": value,
             "target": ">= 10,000", "ok": None if quick else bool(best and best[1] >= 10000)}]


def bench_smoke(tmp: str) -> list[dict]:
    """quick=True: one short run through the same code path (seconds), no figures to quote."""
    srv = _Serve("--ttft", "0.01", "--tpot", "0.001", "--server-timestamps")
    try:
        sched = os.path.join(tmp, "smoke.jsonl")
        _schedule(sched, np.linspace(0, 0.5, 50), 16)
        resp, end, err = _send(sched, os.path.join(tmp, "smoke.out"), srv.url)
    finally:
        srv.stop()
    ok = [r for r in resp if r["status"] == "ok"]
    e = [abs(a - b) for r in ok for a, b in zip(r["events"]["t"], r["events"]["server_t"], strict=False)
         if b is not None]
    p99 = end.get("dispatch_lag_p99")
    return [{"figure": "smoke: 50 sessions at 100/s (quick run, not a figure)",
             "value": f"{len(ok)}/{len(resp)} ok, p99 dispatch lag "
                      f"{'-' if p99 is None else f'{p99 * 1e3:.2f} ms'}, event-time error p99 "
                      f"{np.percentile(e, 99) * 1e3 if e else float('nan'):.3f} ms",
             "target": "", "ok": None}]


def bench_scrape(tmp: str, quick: bool) -> list[dict]:
    """Does ``--scrape`` (the server's /metrics every second, by a process of its own) disturb the send loop? p99
    dispatch lag in alternating runs of one schedule with and without it, so that the difference can be read
    against the run-to-run spread."""
    rate, dur, pairs = (100, 2.0, 1) if quick else (300, 6.0, 3)
    srv = _Serve("--ttft", "0.01", "--tpot", "0.001")
    rng = np.random.default_rng(7)
    starts = np.cumsum(rng.exponential(1 / rate, int(rate * dur)))
    starts -= starts[0]
    sched = os.path.join(tmp, "scrape.jsonl")
    _schedule(sched, starts, 64)
    lag: dict[str, list[float]] = {"without": [], "with": []}
    samples = 0
    try:
        for i in range(pairs):
            for how, extra in (("without", ()), ("with", ("--scrape",))):
                resp, end, err = _send(sched, os.path.join(tmp, f"scrape-{how}{i}.out"), srv.url, *extra)
                if end.get("dispatch_lag_p99") is not None:
                    lag[how].append(end["dispatch_lag_p99"] * 1e3)
                if how == "with":
                    with open(os.path.join(tmp, f"scrape-{how}{i}.out"), "rb") as f:
                        samples += sum(b'"kind":"server_metric"' in ln for ln in f)
    finally:
        srv.stop()
    if not lag["without"] or not lag["with"]:
        return [{"figure": "p99 dispatch lag with --scrape vs without", "value": "no data", "target": "", "ok": False}]
    a, b = np.median(lag["without"]), np.median(lag["with"])
    spread = max(lag["without"]) - min(lag["without"])
    runs = ", ".join(f"{x:.2f}" for x in lag["without"]) + " / " + ", ".join(f"{x:.2f}" for x in lag["with"])
    return [{"figure": f"p99 dispatch lag without / with --scrape (1 s; {rate} req/s, {pairs} alternating pairs)",
             "value": f"median {a:.2f} / {b:.2f} ms (runs {runs} ms; {samples} samples scraped)",
             "target": "difference within the spread of the runs without",
             "ok": None if quick else bool(b - a <= max(spread, 0.1))}]


def bench_parse_styles(quick: bool) -> list[dict]:
    """The one stream loop's cost per event for each framing (vk.send.apis): a 1,000-token answer parsed as the
    OpenAI SSE stream, Anthropic's typed SSE events and Bedrock's binary event-stream frames (in-process)."""
    from types import SimpleNamespace

    from vk.send.apis import adapter_class
    from vk.send.clock import RunClock
    from vk.send.sse import parse_stream
    from vk.serve.apis.bedrock import event_frame

    n = 100 if quick else 1000
    word = "whale"
    streams = {
        "openai": [b'data: {"id":"x","choices":[{"index":0,"delta":{"content":" %s"},"finish_reason":null}]}\n\n'
                   % word.encode()] * n,
        "anthropic": [b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                      b'"delta":{"type":"text_delta","text":" %s"}}\n\n' % word.encode()] * n,
        "bedrock": [event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": " " + word}})] * n,
    }
    clock = RunClock()
    clock.set_start(time.monotonic())
    parts = []
    for style, pieces in streams.items():
        cls = adapter_class(style)
        adapter = cls.__new__(cls)  # parsing needs no credentials or connection settings
        adapter.cfg = SimpleNamespace(endpoint="chat", model="m", stream=True, continuous_usage=False)
        if style == "openai":
            adapter.completions = False
        chunks = [(time.monotonic(), p) for p in pieces]
        reps = 3 if quick else 20
        t0 = time.perf_counter()
        for _ in range(reps):
            out = parse_stream(chunks, clock, False, adapter)
        per = (time.perf_counter() - t0) / reps / n
        assert out["events"]["kind"].count("c") == n
        parts.append(f"{style} {per * 1e6:.2f}")
    return [{"figure": f"stream parsing per event, by framing ({n}-event answer, in-process)",
             "value": ", ".join(parts) + " us", "target": "same order as openai", "ok": None}]


def run(quick: bool = False) -> list[dict]:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vk-send-bench-") as tmp:
        if quick:
            return bench_smoke(tmp)
        rows = [{"figure": "machine load when the vk-send bench started (1-min load average, 2 cores)",
                 "value": f"{os.getloadavg()[0]:.2f}", "target": "(other work competes for the cores)",
                 "ok": None}]
        rows += bench_rate(tmp, quick)
        rows += bench_scrape(tmp, quick)
        rows += bench_timestamps(tmp, quick)
        rows += bench_streams(tmp, quick)
        rows += bench_parse_styles(quick)
    rows.append({"figure": "vk-send bench wall time", "value": f"{time.monotonic() - t0:.0f} s", "target": "",
                 "ok": None})
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(f"{row['figure']}: {row['value']}  [target {row['target']}; ok={row['ok']}]")
