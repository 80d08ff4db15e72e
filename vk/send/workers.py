"""Worker processes (``--workers N``): each runs an engine on its own event loop; the parent shards sessions to
them through pipes and collects their records."""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
import threading
import time

import orjson

from vk.jsonl import dumps
from vk.send.clock import RunClock
from vk.send.collector import set_reason
from vk.send.engine import Config, Engine
from vk.send.feed import SWITCH_INTERVAL, QueueView, ThreadFeed, new_loop
from vk.send.inputs import feeder

_mono = time.monotonic



def worker_main(cfg: Config, in_conn, out_conn, stop_event, progress: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    loop = new_loop()
    asyncio.set_event_loop(loop)
    lock = threading.Lock()

    def emit(rec: dict) -> None:
        line = dumps(rec)
        with lock:
            out_conn.send_bytes(line)

    clock = RunClock()
    engine = Engine(cfg, clock, loop, emit)
    feed = ThreadFeed(loop)
    out_conn.send_bytes(b"#ready")
    msg = in_conn.recv_bytes()  # b"start MONO0 EPOCH0"
    _, m0, _e0 = msg.split()
    clock.set_start(float(m0))

    def reader() -> None:
        try:
            while True:
                b = in_conn.recv_bytes()
                if not b:
                    break
                if not feed.put(orjson.loads(b)):
                    return
        except (EOFError, OSError):
            pass
        feed.end()

    threading.Thread(target=reader, daemon=True, name="vk-send-reader").start()

    async def watch_stop() -> None:
        while True:
            await asyncio.sleep(0.02)
            if stop_event.is_set():
                engine.request_stop("stopped")
                return
            if progress:
                with lock:
                    out_conn.send_bytes(b"#inflight %d %d" % (engine.inflight, engine.sessions_done))

    async def main() -> None:
        w = loop.create_task(watch_stop())
        try:
            await engine.run(QueueView(feed))
        finally:
            w.cancel()

    gc.collect()
    gc.freeze()
    gc.disable()
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        loop.run_until_complete(main())
    finally:
        feed.stop.set()
        stats = {"sessions_started": engine.sessions_started, "sessions_done": engine.sessions_done,
                 "sessions_not_started": engine.sessions_not_started,
                 "duration_reached": engine.duration_reached,
                 "kernel_timestamps": getattr(engine.client, "kts_ok", None)}
        with lock:
            out_conn.send_bytes(b"#done " + orjson.dumps(stats))
        out_conn.close()



def run_workers(cfg, clock, stream_in, collector, state, input_error, procs, pipes, stop_event,
                 handle_signals) -> dict:
    from multiprocessing.connection import wait

    workers = len(procs)
    collector.on_stop = lambda reason, ended: (set_reason(state, reason, ended), stop_event.set())
    start_msg = b"start %r %r" % (clock.mono0, clock.epoch0)
    for in_w, _ in pipes:
        in_w.send_bytes(start_msg)
    feed_stop = threading.Event()

    def put(rec) -> bool:
        if feed_stop.is_set():
            return False
        w = rec.get("index", 0) % workers
        try:
            pipes[w][0].send_bytes(orjson.dumps(rec))
        except (OSError, ValueError):
            return False
        return True

    def end() -> None:
        for in_w, _ in pipes:
            try:
                in_w.send_bytes(b"")
            except (OSError, ValueError):
                pass

    old = {}
    if handle_signals and threading.current_thread() is threading.main_thread():
        def on_signal(signum, _frame):
            state["signals"] += 1
            name = signal.Signals(signum).name
            if state["signals"] >= 2:
                for p in procs:
                    if p.is_alive():
                        p.kill()
                collector.exit_now()
            print(f"\nvk-send: {name}: stopping (cancelling requests in flight; again to exit at once)",
                  file=sys.stderr)
            set_reason(state, f"interrupted by {name}", "interrupted")
            feed_stop.set()
            stop_event.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, on_signal)

    th = threading.Thread(target=feeder, args=(stream_in, put, end, input_error, lambda e: None), daemon=True,
                          name="vk-send-feeder")
    th.start()
    alive = {out_r: i for i, (_, out_r) in enumerate(pipes)}
    stats = {"sessions_started": 0, "sessions_done": 0, "sessions_not_started": 0, "duration_reached": False,
             "kernel_timestamps": None}
    inflight = [0] * workers
    sessions = [0] * workers
    try:
        while alive:
            for c in wait(list(alive), timeout=0.25):
                try:
                    msg = c.recv_bytes()
                except (EOFError, OSError):
                    alive.pop(c, None)
                    continue
                if msg[:1] == b"{":
                    collector.add(orjson.loads(msg), msg)
                elif msg.startswith(b"#inflight"):
                    _, a, b = msg.split()
                    inflight[alive[c]] = int(a)
                    sessions[alive[c]] = int(b)
                    collector.inflight = sum(inflight)
                    collector.sessions_done = sum(sessions)
                elif msg.startswith(b"#done"):
                    st = orjson.loads(msg[6:])
                    for k in ("sessions_started", "sessions_done", "sessions_not_started"):
                        stats[k] += st.get(k, 0)
                    stats["duration_reached"] |= bool(st.get("duration_reached"))
                    if st.get("kernel_timestamps") is not None:
                        stats["kernel_timestamps"] = st["kernel_timestamps"]
            if state["ended"] is not None:
                feed_stop.set()
            if collector.bar is not None and _mono() - collector.t_bar > 0.5:
                collector.refresh_bar()
    finally:
        feed_stop.set()
        for in_w, _ in pipes:
            try:
                in_w.close()
            except OSError:
                pass
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        for sig, h in old.items():
            signal.signal(sig, h)
    return stats
