"""The parent's ledger of sessions: which were taken from the input, which started, which have a record for
every request. The footer's session counts come from here, so that they add up whatever stopped the run
(sessions started + not started = scheduled; responses = the requests of the started sessions), and a lost
worker's sessions can be told apart: started ones get a record for each request that has none, the others are
counted as not started (or handed to another worker)."""

from __future__ import annotations

import threading


class Entry:
    __slots__ = ("ss", "n", "recorded", "worker", "t_start")

    def __init__(self, ss: dict, worker: int):
        self.ss = ss
        self.n = len(ss["session"]["requests"])
        self.recorded: set[str] = set()
        self.worker = worker
        self.t_start: float | None = None  # the worker started the session (seconds from the run start)


def session_key(index, session_id) -> tuple:
    return (index, session_id)


class Ledger:
    """Thread-safe: the input thread adds sessions, the record path marks their requests."""

    def __init__(self):
        self.lock = threading.Lock()
        self.open: dict[tuple, Entry] = {}
        self.open_per_worker: dict[int, int] = {}
        self.read = 0  # sessions taken from the input
        self.started = 0  # sessions with at least one response record
        self.done = 0  # sessions with a response record for every request
        self.dropped = 0  # sessions taken from the input but never handed to a worker (run stopping, worker lost)

    def add(self, ss: dict, worker: int = 0) -> None:
        key = session_key(ss.get("index"), ss["session"].get("id"))
        with self.lock:
            self.read += 1
            e = self.open.get(key)
            if e is not None:  # the same index and id twice: one entry, both sessions' requests
                e.n += len(ss["session"]["requests"])
                return
            self.open[key] = Entry(ss, worker)
            self.open_per_worker[worker] = self.open_per_worker.get(worker, 0) + 1

    def drop(self) -> None:
        """A session read from the input that will not be handed to any worker."""
        with self.lock:
            self.read += 1
            self.dropped += 1

    def record(self, rec: dict) -> Entry | None:
        """Count a response record; returns the session's entry when this record completed it."""
        key = session_key(rec.get("session_index"), rec.get("session_id"))
        with self.lock:
            e = self.open.get(key)
            if e is None:
                return None
            if not e.recorded:
                self.started += 1
            e.recorded.add(rec.get("request_id"))
            if len(e.recorded) < e.n:
                return None
            del self.open[key]
            self.open_per_worker[e.worker] -= 1
            self.done += 1
            return e

    def mark_started(self, index, session_id, t_start: float) -> None:
        with self.lock:
            e = self.open.get(session_key(index, session_id))
            if e is not None:
                e.t_start = t_start

    def open_at(self, worker: int) -> int:
        with self.lock:
            return self.open_per_worker.get(worker, 0)

    def at_worker(self, worker: int) -> list[Entry]:
        """The open sessions of a worker."""
        with self.lock:
            return [e for e in self.open.values() if e.worker == worker]

    def remove(self, e: Entry) -> None:
        """A lost worker's session that never started and will not run: it counts as not started."""
        with self.lock:
            if self.open.pop(session_key(e.ss.get("index"), e.ss["session"].get("id")), None) is not None:
                self.open_per_worker[e.worker] -= 1

    def move(self, e: Entry, worker: int) -> None:
        """A lost worker's session handed to another worker."""
        with self.lock:
            self.open_per_worker[e.worker] -= 1
            e.worker = worker
            self.open_per_worker[worker] = self.open_per_worker.get(worker, 0) + 1

    def totals(self, unread: int | None) -> dict:
        """The footer's session counts. ``unread``: sessions left in the input when it was not read to its end
        (known for files); None when not known."""
        with self.lock:
            not_started = self.read - self.started + (unread or 0)
            return {"sessions_started": self.started, "sessions_done": self.done,
                    "sessions_not_started": not_started, "sessions_scheduled": self.started + not_started}
