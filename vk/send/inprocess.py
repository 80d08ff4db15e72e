"""One worker in the calling process (``--workers 1``): the engine on an event loop of its own."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading

from vk.send.collector import STOP_SIGNALS, set_reason
from vk.send.engine import Engine
from vk.send.feed import SWITCH_INTERVAL, QueueView, ThreadFeed, new_loop
from vk.send.inputs import feeder


class InProcess:
    """One worker in this process: the loop and engine are built before the start instant is fixed."""

    def __init__(self, cfg, clock, collector, state, input_error, handle_signals):
        self.loop = loop = new_loop()
        self.engine = engine = Engine(cfg, clock, loop, collector.add)
        self.feed = ThreadFeed(loop)
        self.collector = collector
        self.state = state
        self.input_error = input_error
        self.handle_signals = handle_signals
        collector.on_stop = lambda reason, ended: (set_reason(state, reason, ended), engine.request_stop(reason))

    def on_signal(self, signame: str) -> None:
        state = self.state
        state["signals"] += 1
        if state["signals"] >= 2:
            self.collector.exit_now()
            return
        print(f"\nvk-send: {signame}: stopping (cancelling requests in flight; again to exit at once)",
              file=sys.stderr)
        set_reason(state, f"interrupted by {signame}", "interrupted")
        self.engine.request_stop(f"interrupted by {signame}")

    def run(self, stream_in, input_status: dict) -> dict:
        loop, engine, feed, collector = self.loop, self.engine, self.feed, self.collector
        installed = []
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                try:
                    loop.add_signal_handler(sig, self.on_signal, sig.name)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass
        ledger = collector.ledger

        def put(rec) -> bool:
            ledger.add(rec)
            return feed.put(rec)

        th = threading.Thread(target=feeder, args=(stream_in, put, feed.end, self.input_error, lambda e: None,
                                                   input_status), daemon=True, name="vk-send-feeder")

        async def main() -> None:
            prog = loop.create_task(progress_task(engine, collector)) if collector.bar is not None else None
            th.start()
            try:
                await engine.run(QueueView(feed))
            finally:
                if prog is not None:
                    prog.cancel()

        gc.freeze()
        was_enabled = gc.isenabled()
        gc.disable()
        # the reader thread must not hold the GIL for the default 5 ms while a deadline passes
        switch = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
        try:
            loop.run_until_complete(main())
        finally:
            sys.setswitchinterval(switch)
            feed.stop.set()
            for sig in installed:
                loop.remove_signal_handler(sig)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            if was_enabled:
                gc.enable()
            gc.unfreeze()
        return {"duration_reached": engine.duration_reached,
                "kernel_timestamps": getattr(engine.client, "kts_ok", None)}




async def progress_task(engine, collector) -> None:
    while True:
        await asyncio.sleep(0.5)
        collector.inflight = engine.inflight
        collector.sessions_done = engine.sessions_done
        collector.refresh_bar()
