"""The saturation stop: watch a probe's run file as vk-send writes it, and end a probe the server cannot carry.

The test (open-loop probes; a closed loop cannot outrun its server). At each check, ``t`` seconds into the run,
over the second half of what has run so far, ``(t/2, t]``:

- ``A``: sessions due to start (from the probe's schedule), ``C``: sessions answered (their first response record
  came). ``A - C`` is how much the sessions waiting for their first answer grew over the window. A session's first
  answer, not its end, is what is compared: a multi-turn session with think times may last longer than the probe
  on an idle server, while its first answer comes one request's service time after it is due.
- saturated when ``A >= 20``, ``C < 0.5 A`` (arrivals outpace completions two to one) and ``A - C > 4 sqrt(A)``
  (in flight grew by far more than the noise of the counts), once ``t`` is at least ``--saturation-min`` and four
  times the unloaded service time (the median time to the first answer of the first ten sessions), so that a server
  still filling up to its steady state is not mistaken for one that is falling behind.
- if no session has been answered at all, ``t`` at least half the probe's duration and ``A >= 20`` also count.

Under a stable load ``C`` follows ``A`` with a delay of one session time; at ten times the capacity ``C`` is about
a tenth of ``A``. The evidence (the counts, in flight at ``t/2`` and at ``t``, the TTFT of the first and last
quarter of the finished requests, and where the server's /metrics answers, its running + waiting requests at
``t/2`` and ``t``) goes into the probe's ``saturation`` field.
"""

from __future__ import annotations

import bisect
import math
import statistics
import threading
import time

import orjson

MIN_ARRIVALS = 20
RATIO = 0.5
NOISE = 4.0
INTERVAL = 0.25  # seconds between checks


class Monitor(threading.Thread):
    """Reads ``run_path`` as it grows; sets ``stop`` and fills ``evidence`` when the test says saturated."""

    def __init__(self, run_path: str, starts: list[float], requests: dict[str, int], stop: threading.Event, *,
                 min_time: float = 2.0, duration: float | None = None, gauges=None):
        super().__init__(daemon=True, name="vk-sweep-saturation")
        self.run_path = run_path
        self.starts = sorted(starts)
        self.requests = requests  # session id -> number of requests
        self.stop = stop
        self.min_time = min_time
        self.duration = duration
        self.done = threading.Event()
        self.gauges = gauges  # () -> the server's running + waiting requests, or None (no /metrics)
        self.queue: list[tuple[float, float]] = []  # (run time, running + waiting), about once a second
        self.evidence: dict | None = None
        self.start_epoch: float | None = None
        self.seen: dict[str, int] = {}
        self.answered: list[float] = []  # per session, when its first response came (run clock), in file order
        self.first_answer: set[str] = set()  # sessions with a response that has a t_done
        self.first_durations: list[float] = []  # time to the first answer (from its t_intended), first ten
        self.ttft: list[tuple[float, float]] = []  # (t_done, ttft)
        self._pos = 0
        self._carry = b""

    def run(self) -> None:
        while not self.done.wait(INTERVAL):
            self._read()
            if self.start_epoch is None:
                continue
            t = time.time() - self.start_epoch
            if self.gauges is not None and (not self.queue or t - self.queue[-1][0] >= 1.0):
                n = self.gauges()
                if n is None:
                    self.gauges = None
                else:
                    self.queue.append((t, n))
            ev = self.check(t)
            if ev is not None:
                self.evidence = ev
                self.stop.set()
                return

    def finish(self) -> None:
        self.done.set()
        self.join()

    def _read(self) -> None:
        try:
            with open(self.run_path, "rb") as fh:
                fh.seek(self._pos)
                data = fh.read()
        except OSError:
            return
        if not data:
            return
        self._pos += len(data)
        data = self._carry + data
        lines = data.split(b"\n")
        self._carry = lines.pop()
        for line in lines:
            if line.strip():
                self._add(orjson.loads(line))

    def _add(self, rec: dict) -> None:
        kind = rec.get("kind")
        if kind == "run":
            self.start_epoch = float(rec["start_epoch"])
        elif kind == "response":
            sid = str(rec.get("session_id"))
            n = self.seen.get(sid, 0) + 1
            self.seen[sid] = n
            t_done = rec.get("t_done")
            if t_done is None:
                return
            ts, tf = rec.get("t_sent"), rec.get("t_first_token")
            if ts is not None and tf is not None:
                self.ttft.append((t_done, tf - ts))
            if sid not in self.first_answer:
                self.first_answer.add(sid)
                self.answered.append(t_done)
                if len(self.first_durations) < 10 and rec.get("t_intended") is not None:
                    self.first_durations.append(t_done - rec["t_intended"])

    def check(self, t: float) -> dict | None:
        """The test at run time ``t`` (public for the tests): the evidence when saturated, else None."""
        if t < self.min_time:
            return None
        half = t / 2
        arrived = bisect.bisect_right(self.starts, t) - bisect.bisect_right(self.starts, half)
        if arrived < MIN_ARRIVALS:
            return None
        fin = sorted(self.answered)
        completed = bisect.bisect_right(fin, t) - bisect.bisect_right(fin, half)
        if self.first_durations:
            service = statistics.median(self.first_durations)
            if t < 4 * service:
                return None
            rule = "arrivals outpace completions"
            if not (completed < RATIO * arrived and arrived - completed > NOISE * math.sqrt(arrived)):
                return None
        else:
            service = None
            if self.duration is None or t < self.duration / 2:
                return None
            rule = "no session answered in half the probe"
        in_flight = [bisect.bisect_right(self.starts, x) - bisect.bisect_right(fin, x) for x in (half, t)]
        tt = sorted(self.ttft)
        q = max(1, len(tt) // 4)
        early = statistics.median(x for _, x in tt[:q]) if tt else None
        late = statistics.median(x for _, x in tt[-q:]) if tt else None
        server_queue = None
        if self.queue:
            at_half = min(self.queue, key=lambda x: abs(x[0] - half))[1]
            server_queue = [at_half, self.queue[-1][1]]
        return {"rule": rule, "t": round(t, 3), "window": [round(half, 3), round(t, 3)],
                "arrived": arrived, "completed": completed, "in_flight": in_flight,
                "service_time": None if service is None else round(service, 6),
                "ttft_first_quarter": None if early is None else round(early, 6),
                "ttft_last_quarter": None if late is None else round(late, 6), "server_queue": server_queue}


def schedule_arrivals(schedule_path: str) -> tuple[str, list[float], dict[str, int]]:
    """From a schedule file: its mode, the sessions' start offsets and each session's number of requests."""
    starts: list[float] = []
    requests: dict[str, int] = {}
    mode = "open"
    with open(schedule_path, "rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            rec = orjson.loads(line)
            if rec.get("kind") == "schedule":
                mode = rec.get("mode", "open")
            elif rec.get("kind") == "scheduled_session":
                if rec.get("start") is not None:
                    starts.append(float(rec["start"]))
                s = rec["session"]
                requests[str(s["id"])] = len(s["requests"])
    return mode, starts, requests
