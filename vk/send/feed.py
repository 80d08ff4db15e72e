"""Feeding sessions to an event loop from a thread (reading input must never block the loop)."""

from __future__ import annotations

import asyncio
import threading

SWITCH_INTERVAL = 0.0002  # seconds: GIL hand-over between the event loop and the input reader thread
QUEUE_AHEAD = 512  # sessions read ahead of the engine per worker (memory stays flat)



class ThreadFeed:
    """A bounded hand-over from a reader thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ahead: int = QUEUE_AHEAD):
        self.loop = loop
        self.q: asyncio.Queue = asyncio.Queue()
        self.slots = threading.Semaphore(ahead)
        self.stop = threading.Event()

    def put(self, item) -> bool:
        """From the thread; False when the run stopped."""
        while not self.slots.acquire(timeout=0.2):
            if self.stop.is_set():
                return False
        if self.stop.is_set():
            return False
        try:
            self.loop.call_soon_threadsafe(self.q.put_nowait, item)
        except RuntimeError:  # loop closed
            return False
        return True

    def end(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.q.put_nowait, None)
        except RuntimeError:
            pass

    async def get(self):
        item = await self.q.get()
        self.slots.release()
        return item

    def get_nowait_put_back(self, item) -> None:
        self.q.put_nowait(item)


class QueueView:
    """What the engine sees: ``get()`` and ``put_nowait`` (to repeat the end marker)."""

    def __init__(self, feed: ThreadFeed):
        self.feed = feed

    async def get(self):
        return await self.feed.get()

    def put_nowait(self, item) -> None:
        self.feed.slots.acquire(blocking=False)
        self.feed.q.put_nowait(item)

    def empty(self) -> bool:
        return self.feed.q.empty()


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
