"""Worker processes (``--workers N``): each runs an engine on its own event loop; the parent hands sessions to
them through pipes and collects their records.

Open loop: session i goes to worker i % N (start times are absolute, so any split keeps the schedule). Closed
loop: a worker gets a session only when one of its slots is free (credits), so that exactly ``concurrency``
sessions are active whatever the number of workers. The parent keeps a ledger of the sessions it handed out; a
worker that dies without saying goodbye is noticed: its started sessions get a record for every request that has
none, the others are counted as not started (or handed to another worker, ``reassign``), and the run ends
``worker_lost``. A worker whose parent dies exits at once (parent-death signal on Linux; no pipe ends of its
siblings or of the parent are held, so a write to the dead parent fails instead of blocking)."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
import queue
import signal
import sys
import threading
import time

import orjson

from vk.errors import VkError
from vk.jsonl import dumps
from vk.records import STATUS_CANCELLED, new_response
from vk.send.clock import RunClock
from vk.send.collector import STOP_SIGNALS, set_reason
from vk.send.engine import Config, Engine, _Sess
from vk.send.feed import SWITCH_INTERVAL, QueueView, ThreadFeed, new_loop
from vk.send.inputs import feeder

_mono = time.monotonic



PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int, worker: int) -> None:
    """Exit when the parent dies: the parent-death signal (Linux) is SIGTERM, which only this does to a worker
    (the parent stops workers through ``stop_event``); say so on stderr, since this worker's records that the parent
    had not written yet are lost with it."""

    def on_term(_signum, _frame) -> None:
        if os.getppid() != parent_pid:
            os.write(2, b"vk-send: worker %d: the parent process %d died; exiting (records it had not written "
                        b"yet are lost)\n" % (worker, parent_pid))
        os._exit(1)

    signal.signal(signal.SIGTERM, on_term)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: a write to the dead parent's pipe fails instead
        pass
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        on_term(signal.SIGTERM, None)


class WorkerEngine(Engine):
    """The engine, telling the parent when a session starts (so that a lost worker's sessions can be told apart)."""

    on_session_start = None

    def _start_session(self, ss: dict, t_start: float) -> _Sess:
        s = super()._start_session(ss, t_start)
        self.on_session_start(s, t_start)
        return s


def worker_main(cfg: Config, in_conn, out_conn, stop_event, progress: bool, inherited, parent_pid: int) -> None:
    for c in inherited:  # the parent's ends of this worker's pipes and of its elder siblings' pipes
        c.close()
    for sig in STOP_SIGNALS:
        if sig != signal.SIGTERM:
            signal.signal(sig, signal.SIG_IGN)  # the parent decides (a Ctrl-C reaches the whole process group)
    _die_with_parent(parent_pid, cfg.worker)
    try:
        import setproctitle

        setproctitle.setproctitle(f"vk-send worker {cfg.worker}")  # the parent's command line is not ours to show
    except ImportError:  # pragma: no cover - optional at run time
        pass
    loop = new_loop()
    asyncio.set_event_loop(loop)
    lock = threading.Lock()

    def emit(rec: dict) -> None:
        line = dumps(rec)
        with lock:
            out_conn.send_bytes(line)

    clock = RunClock()
    engine = WorkerEngine(cfg, clock, loop, emit)

    def on_session_start(s: _Sess, t_start: float) -> None:
        msg = b"#s " + orjson.dumps([s.index, s.sess.get("id"), t_start - clock.mono0])
        with lock:
            out_conn.send_bytes(msg)

    engine.on_session_start = on_session_start
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
        stats = {"duration_reached": engine.duration_reached,
                 "kernel_timestamps": getattr(engine.client, "kts_ok", None)}
        with lock:
            out_conn.send_bytes(b"#done " + orjson.dumps(stats))
        out_conn.close()


def start_workers(ctx, cfg: Config, workers: int, stop_event, progress: bool) -> tuple[list, list]:
    """Fork the workers; returns (processes, [(to_worker, from_worker)]) once each said it is ready."""
    procs, pipes = [], []
    for w in range(workers):
        slots = cfg.concurrency // workers + (1 if w < cfg.concurrency % workers else 0)
        # a closed loop's rate limit is the whole run's: each worker gets its slots' share
        rate = cfg.rate_limit * slots / cfg.concurrency if cfg.rate_limit and cfg.mode == "closed" else cfg.rate_limit
        wcfg = Config(**{**cfg.__dict__, "worker": w, "concurrency": slots, "rate_limit": rate})
        in_r, in_w = ctx.Pipe(duplex=False)
        out_r, out_w = ctx.Pipe(duplex=False)
        inherited = [c for pair in pipes for c in pair] + [in_w, out_r]
        p = ctx.Process(target=worker_main, args=(wcfg, in_r, out_w, stop_event, progress, inherited, os.getpid()),
                        daemon=True, name=f"vk-send-worker-{w}")
        p.start()
        in_r.close()
        out_w.close()
        procs.append(p)
        pipes.append((in_w, out_r))
    for _, out_r in pipes:
        try:
            ok = out_r.recv_bytes() == b"#ready"
        except (EOFError, OSError):
            ok = False
        if not ok:
            for p in procs:
                p.kill()
            raise VkError("a worker process failed to start")
    return procs, pipes


def _how_it_ended(p) -> str:
    p.join(1.0)
    if getattr(p, "how_it_ended", None):  # a Ray worker says itself (vk.send.ray_pool.RayWorker)
        return p.how_it_ended
    return exit_description(p.exitcode)


def exit_description(code: int | None) -> str:
    """How a worker process ended, in words, from its exit code (negative: the signal that killed it)."""
    if code is None:
        return "its pipe closed"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _lost_record(cfg: Config, e, rid: str, worker: int, how: str, t_rel: float) -> dict:
    """A request of a lost worker's started session that has no record: what the parent knows of it."""
    ss = e.ss
    sess = ss["session"]
    r = next(x for x in sess["requests"] if x["id"] == rid)
    rec = new_response(cfg.run_id, sess["id"], rid, STATUS_CANCELLED, session_index=ss.get("index"),
                       warmup=bool(ss.get("warmup", False)), worker=worker,
                       target_input_tokens=r.get("input_tokens"), target_output_tokens=r.get("output_tokens"),
                       target_prefix_tokens=r.get("prefix_tokens"))
    rec["error"] = (f"worker lost: vk-send worker {worker} ended ({how}) before recording this request "
                    "(it may have been sent; nothing of its answer is known)")
    rec["t_done"] = round(t_rel, 7)
    return rec


def run_workers(cfg, clock, stream_in, collector, state, input_error, procs, pipes, stop_event,
                handle_signals, input_status: dict, reassign: bool = False, quiet: bool = False) -> dict:
    from multiprocessing.connection import wait

    workers = len(procs)
    ledger = collector.ledger
    collector.on_stop = lambda reason, ended: (set_reason(state, reason, ended), stop_event.set())
    start_msg = b"start %r %r" % (clock.mono0, clock.epoch0)
    for in_w, _ in pipes:
        in_w.send_bytes(start_msg)
    feed_stop = threading.Event()
    send_locks = [threading.Lock() for _ in range(workers)]
    alive_w = set(range(workers))
    ended_w: set[int] = set()  # workers told that no more sessions come
    input_done = threading.Event()
    closed = cfg.mode == "closed"
    # closed loop: one credit per free slot; a worker gets a session only for a credit
    credits: queue.SimpleQueue = queue.SimpleQueue()
    if closed:
        for w in range(workers):
            for _ in range(cfg.concurrency // workers + (1 if w < cfg.concurrency % workers else 0)):
                credits.put(w)

    def send_to(w: int, rec: dict) -> bool:
        try:
            with send_locks[w]:
                pipes[w][0].send_bytes(orjson.dumps(rec))
        except (OSError, ValueError):
            return False
        return True

    def pick(rec) -> int | None:
        if closed:
            while not feed_stop.is_set():
                try:
                    w = credits.get(timeout=0.2)
                except queue.Empty:
                    continue
                if w in alive_w:
                    return w
            return None
        w = (rec.get("index") or 0) % workers
        if w in alive_w:
            return w
        if reassign and alive_w:
            live = sorted(alive_w)
            return live[(rec.get("index") or 0) % len(live)]
        return -1

    def put(rec) -> bool:
        if feed_stop.is_set():
            return False
        w = pick(rec)
        if w is None:
            return False
        if w < 0:  # its worker was lost
            ledger.drop()
            return True
        ledger.add(rec, w)
        if not send_to(w, rec):
            return w not in alive_w  # a lost worker: go on with the others
        return True

    def end() -> None:
        input_done.set()

    def end_worker(w: int) -> None:
        # never wait for the lock here: its holder may be blocked on a full pipe that only drains while this
        # (the main) thread reads the workers' records; the loop tries again on its next turn
        if w in ended_w or not send_locks[w].acquire(blocking=False):
            return
        try:
            ended_w.add(w)
            pipes[w][0].send_bytes(b"")
        except (OSError, ValueError):
            pass
        finally:
            send_locks[w].release()

    def hand_over(moves: list) -> None:
        """From a thread of its own, for the reason above: send a lost worker's sessions to their new workers."""
        for target, e in moves:
            if not send_to(target, e.ss):
                ledger.remove(e)

    def lose(w: int, c) -> None:
        """Worker ``w`` ended without its goodbye: account for everything it had."""
        alive_w.discard(w)
        how = _how_it_ended(procs[w])
        t_rel = _mono() - clock.mono0
        n_lost = n_unstarted = n_moved = 0
        moves: list = []
        for e in ledger.at_worker(w):
            due = None
            if e.t_start is not None:
                thinks = [r.get("think_time") or 0.0 for r in e.ss["session"]["requests"] if not r.get("parents")]
                due = e.t_start + min(thinks or [0.0])
            if e.recorded or (due is not None and due <= t_rel):
                for rid in [r["id"] for r in e.ss["session"]["requests"]]:
                    if rid not in e.recorded:
                        rec = _lost_record(cfg, e, rid, w, how, t_rel)
                        collector.add(rec)
                        n_lost += 1
                continue
            start = e.ss.get("start")
            still_due = closed or start is None or start > t_rel
            target = None
            if reassign and still_due and not state["ended"]:
                live = sorted(x for x in alive_w if x not in ended_w)
                if live:
                    target = live[(e.ss.get("index") or 0) % len(live)]
            if target is not None:
                ledger.move(e, target)  # open at its new worker: that worker hears of no end before it is done
                e.moved = True
                moves.append((target, e))
                n_moved += 1
                continue
            ledger.remove(e)
            n_unstarted += 1
        if moves:
            threading.Thread(target=hand_over, args=(moves,), daemon=True, name="vk-send-hand-over").start()
        set_reason(state, f"worker {w} was lost ({how})", "worker_lost")
        state.setdefault("lost", []).append({"worker": w, "how": how, "requests_lost": n_lost,
                                             "sessions_not_started": n_unstarted, "sessions_reassigned": n_moved})
        if not quiet:
            print(f"vk-send: worker {w} was lost ({how}): {n_lost} requests recorded as lost, {n_unstarted} "
                  f"sessions not started" + (f", {n_moved} handed to the other workers" if reassign else
                                              " (--reassign-lost hands those still due to the other workers)"),
                  file=sys.stderr)

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

        for sig in STOP_SIGNALS:
            old[sig] = signal.signal(sig, on_signal)

    th = threading.Thread(target=feeder, args=(stream_in, put, end, input_error, lambda e: None, input_status),
                          daemon=True, name="vk-send-feeder")
    th.start()
    alive = {out_r: i for i, (_, out_r) in enumerate(pipes)}
    said_done: set[int] = set()
    stats = {"duration_reached": False, "kernel_timestamps": None}
    inflight = [0] * workers
    sessions = [0] * workers
    try:
        while alive:
            for c in wait(list(alive), timeout=0.1):
                w = alive[c]
                try:
                    msg = c.recv_bytes()
                except (EOFError, OSError):
                    alive.pop(c, None)
                    if w not in said_done:
                        lose(w, c)
                    continue
                if msg[:1] == b"{":
                    done = collector.add(orjson.loads(msg), msg)
                    if done is not None and closed and not done.moved:
                        credits.put(done.worker)  # a slot is free (a lost worker's session took none)
                elif msg.startswith(b"#s "):
                    idx, sid, t0 = orjson.loads(msg[3:])
                    ledger.mark_started(idx, sid, t0)
                elif msg.startswith(b"#inflight"):
                    _, a, b = msg.split()
                    inflight[w] = int(a)
                    sessions[w] = int(b)
                    collector.inflight = sum(inflight)
                    collector.sessions_done = sum(sessions)
                elif msg.startswith(b"#done"):
                    said_done.add(w)
                    st = orjson.loads(msg[6:])
                    stats["duration_reached"] |= bool(st.get("duration_reached"))
                    if st.get("kernel_timestamps") is not None:
                        stats["kernel_timestamps"] = st["kernel_timestamps"]
            if state["ended"] is not None and state["ended"] != "worker_lost":
                feed_stop.set()
            if input_done.is_set() or feed_stop.is_set():
                # a worker hears that no more sessions come once the input ended and it has none left (until
                # then a lost worker's sessions can still be handed to it)
                for w in list(alive.values()):
                    if w not in ended_w and (feed_stop.is_set() or not reassign or ledger.open_at(w) == 0
                                             or len(alive_w) == 1):
                        end_worker(w)
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
