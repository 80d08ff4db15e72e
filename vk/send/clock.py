"""Clocks for vk-send: the run's time base and a precise deadline scheduler.

Times in records are seconds relative to the run start, on ``time.monotonic`` (CLOCK_MONOTONIC, shared by all
worker processes, so every worker uses the same start instant). The only wall-clock figure is the run's
``start_epoch``; kernel receive timestamps (CLOCK_REALTIME) and vk-serve's ``vk_server_time`` are converted with
the current offset between the two clocks, re-measured every second.

Event loops wake timers with millisecond granularity (epoll's timeout is in ms; libuv keeps time in ms), which
alone puts up to 1 ms of lateness (or earliness) on every dispatch. ``Deadlines`` arms one Linux ``timerfd`` with
nanosecond resolution for the earliest pending deadline and wakes the loop through ``add_reader``, so dispatches
land within tens of microseconds of their deadline when the loop is free. Where timerfd is unavailable it falls
back to ``loop.call_at``.
"""

from __future__ import annotations

import asyncio
import ctypes
import heapq
import os
import time

_mono = time.monotonic


class RunClock:
    """The run's start instant on both clocks and the current wall-minus-monotonic offset."""

    __slots__ = ("mono0", "epoch0", "wall_off")

    def __init__(self, mono0: float | None = None, epoch0: float | None = None):
        if mono0 is None:
            mono0 = _mono()
            epoch0 = time.time()
        elif epoch0 is None:
            epoch0 = time.time() - (_mono() - mono0)
        self.mono0 = mono0
        self.epoch0 = epoch0
        self.wall_off = wall_offset()

    def set_start(self, mono0: float) -> None:
        """Fix the run's start instant (objects holding this clock see the change)."""
        self.wall_off = wall_offset()
        self.mono0 = mono0
        self.epoch0 = mono0 + self.wall_off

    def set_start_epoch(self, epoch0: float) -> None:
        """Fix the run's start instant at a wall-clock time (a schedule's ``start_at``), with one reading of the
        offset between the clocks: reading them once for the wait and again for the start put a preemption between
        the two readings into the start instant (milliseconds on a busy machine)."""
        self.wall_off = wall_offset()
        self.mono0 = epoch0 - self.wall_off
        self.epoch0 = epoch0

    def refresh(self) -> None:
        self.wall_off = wall_offset()

    def rel(self, mono: float) -> float:
        return mono - self.mono0

    def now(self) -> float:
        return _mono() - self.mono0

    def wall_to_mono(self, epoch: float) -> float:
        return epoch - self.wall_off

    def wall_to_rel(self, epoch: float) -> float:
        """An epoch time (server ground truth, kernel timestamp) as seconds from the run start."""
        return epoch - self.wall_off - self.mono0


def wall_offset() -> float:
    """``time.time() - time.monotonic()``, from the tightest of three bracketed readings: a preemption between the
    two clock reads would otherwise shift the offset by its length."""
    best = None
    for _ in range(3):
        a = _mono()
        w = time.time()
        b = _mono()
        if best is None or b - a < best[0]:
            best = (b - a, w - (a + b) / 2)
    return best[1]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = 0o4000
_TFD_CLOEXEC = 0o2000000
_TFD_TIMER_ABSTIME = 1


def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.timerfd_create  # noqa: B018 - probe
        libc.timerfd_settime  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


class Deadlines:
    """Run callbacks at absolute monotonic deadlines with sub-millisecond precision.

    ``at(deadline, fn, *args)`` schedules; ``sleep_until(deadline)`` is the awaitable form. Callbacks run in
    deadline order on the event loop thread.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, use_timerfd: bool = True):
        self.loop = loop
        self.heap: list = []
        self.seq = 0
        self.armed = None  # deadline the timer is armed for
        self.handle = None
        self.fd = -1
        self.libc = _libc() if use_timerfd else None
        if self.libc is not None:
            fd = self.libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
            if fd >= 0:
                self.fd = fd
                self.spec = _Itimerspec()
                self.spec_ref = ctypes.byref(self.spec)
                loop.add_reader(fd, self._on_timerfd)
        self.precise = self.fd >= 0

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self.loop.remove_reader(self.fd)
            except Exception:  # noqa: BLE001 - loop may be closed
                pass
            os.close(self.fd)
            self.fd = -1
        if self.handle is not None:
            self.handle.cancel()

    def at(self, deadline: float, fn, *args) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (deadline, self.seq, fn, args))
        if self.armed is None or deadline < self.armed:
            self._arm(deadline)

    def sleep_until(self, deadline: float) -> asyncio.Future:
        fut = self.loop.create_future()
        self.at(deadline, _wake, fut)
        return fut

    def _arm(self, deadline: float) -> None:
        self.armed = deadline
        if self.fd >= 0:
            sec = int(deadline)
            ns = int((deadline - sec) * 1e9)
            if ns <= 0 and sec <= 0:
                ns = 1
            v = self.spec.it_value
            v.tv_sec = sec
            v.tv_nsec = ns
            self.libc.timerfd_settime(self.fd, _TFD_TIMER_ABSTIME, self.spec_ref, None)
        else:
            if self.handle is not None:
                self.handle.cancel()
            # loop.time() is time.monotonic() for both asyncio and uvloop
            self.handle = self.loop.call_at(deadline, self._fire)

    def _on_timerfd(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass
        self._fire()

    def _fire(self) -> None:
        self.armed = None
        self.handle = None
        heap = self.heap
        now = _mono()
        while heap and heap[0][0] <= now:
            _, _, fn, args = heapq.heappop(heap)
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - a callback's failure must not stop the scheduler
                import traceback

                traceback.print_exc()
            now = _mono()
        if heap:
            self._arm(heap[0][0])


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
