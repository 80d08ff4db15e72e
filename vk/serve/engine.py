"""The simulated serving engine: requests (``Seq``), the fixed-latency scheduler and the engine model.

Both schedulers have the same small interface, used by the request handling (``vk.serve.app``):

- ``add(seq)``: a validated request enters the scheduler (``seq.sink`` receives its tokens);
- ``abort(seq)``: the client went away; the request is dropped at the next opportunity;
- they call ``seq.sink.on_token(seq, now)`` each time ``seq.n_out`` grows by one and ``seq.sink.on_finish(seq, now)``
  once after the last token (``seq.finish_reason`` set).

Time is real time (``time.monotonic``): a token is emitted when the simulated step that produces it ends.
The engine model itself (continuous batching, chunked prefill, paged KV cache with prefix caching, step-time
function and profiles) lives in :mod:`vk.serve.model`; this module holds what both modes share.
"""

from __future__ import annotations

import bisect
import heapq
import time
from collections import deque

# seconds before a deadline that a timer fires (then it sleeps to the exact time): uvloop's timers have millisecond
# resolution and fire up to ~1.3 ms off
EARLY = 0.0015


class Seq:
    """One request inside the simulated engine."""

    __slots__ = (
        "rid", "prompt_ids", "prompt_len", "out_ids", "out_target", "n_out", "finish_reason", "cached_tokens",
        "t_arrival", "t_scheduled", "t_first", "t_last", "sink", "aborted", "done", "num_computed", "blocks",
        "n_hashed", "hashes", "handle", "preemptions",
    )

    def __init__(self, rid: str, prompt_ids: list[int] | None, out_ids: list[int], finish_reason: str, sink,
                 prompt_len: int | None = None):
        self.rid = rid
        self.prompt_ids = prompt_ids
        if prompt_len is None:  # -1: not counted yet (fixed-latency mode starts a big prompt while it is counted)
            prompt_len = len(prompt_ids) if prompt_ids is not None else -1
        self.prompt_len = prompt_len
        self.out_ids = out_ids  # the tokens this request will generate (decided at arrival)
        self.out_target = len(out_ids)
        self.n_out = 0
        self.finish_reason = finish_reason  # reported once n_out == out_target
        self.cached_tokens = 0
        self.t_arrival = 0.0
        self.t_scheduled = None
        self.t_first = None
        self.t_last = None
        self.sink = sink
        self.aborted = False
        self.done = False
        self.num_computed = 0  # tokens whose KV is in the cache (prompt, then generated)
        self.blocks = []
        self.n_hashed = 0
        self.hashes = None
        self.handle = None
        self.preemptions = 0

    def token_at(self, pos: int) -> int:
        """Token id at position ``pos`` of the sequence (prompt then output)."""
        pl = self.prompt_len
        return self.prompt_ids[pos] if pos < pl else self.out_ids[pos - pl]


class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count)."""

    __slots__ = ("buckets", "counts", "sum", "count")

    def __init__(self, buckets):
        self.buckets = list(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts, strict=False):
            acc += c
            out.append(f'{name}_bucket{{{labels},le="{b}"}} {acc}')
        acc += self.counts[-1]
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {acc}')
        out.append(f"{name}_sum{{{labels}}} {self.sum}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


_LAT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
        80.0, 160.0, 640.0, 2560.0)
_TPOT = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class Stats:
    """Counters and gauges exported at ``/metrics`` with vLLM's names."""

    def __init__(self):
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.preemptions = 0
        self.success = {"stop": 0, "length": 0, "abort": 0}
        self.responses = {}  # completion requests by the status code of their response (200: when it began)
        self.faults = dict.fromkeys(("429", "500", "503", "stall", "disconnect", "malformed"), 0)  # injected
        self.steps = 0
        self.step_lag_max = 0.0
        self.step_lag_sum = 0.0
        self.step_lag_n = 0
        self.step_lag = Histogram((0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1))
        self.ttft = Histogram(_LAT)
        self.e2e = Histogram(_LAT)
        self.queue = Histogram(_LAT)
        self.tpot = Histogram(_TPOT)
        self.prompt_hist = Histogram((1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                                      100000))
        self.gen_hist = Histogram((1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                                   100000))

    def count_response(self, code: int) -> None:
        self.responses[code] = self.responses.get(code, 0) + 1

    def observe_lag(self, lag: float) -> None:
        """One step's end (engine model) or one token (fixed latency), ``lag`` seconds after its planned time."""
        self.steps += 1
        self.step_lag_sum += lag
        self.step_lag_n += 1
        self.step_lag.observe(lag)
        if lag > self.step_lag_max:
            self.step_lag_max = lag

    def token(self, seq: Seq, now: float) -> bool:
        """``seq`` emits its next token at ``now``: count it; True when it was the last (``seq.done`` is set)."""
        seq.n_out += 1
        self.generation_tokens += 1
        if seq.n_out == 1:
            seq.t_first = now
            self.ttft.observe(now - seq.t_arrival)
        seq.t_last = now
        if seq.n_out >= seq.out_target:
            seq.done = True
            return True
        return False

    def finished(self, seq: Seq, now: float) -> None:
        reason = "abort" if seq.aborted else seq.finish_reason
        self.success[reason] = self.success.get(reason, 0) + 1
        if seq.aborted:
            return
        self.e2e.observe(now - seq.t_arrival)
        if seq.prompt_len >= 0:
            self.prompt_hist.observe(seq.prompt_len)
        self.gen_hist.observe(seq.n_out)
        if seq.n_out > 1 and seq.t_first is not None:
            self.tpot.observe((now - seq.t_first) / (seq.n_out - 1))


class FixedLatency:
    """Fixed latencies, with an optional concurrency cap: the mode for tests of clients and of load searches.

    A request *starts* when it arrives, or, when ``max_num_seqs`` requests are already running, when the oldest
    waiting request reaches the front of a FIFO queue and a running one finishes. Token ``k`` (0-based) of a
    request that started at ``t0`` is emitted at ``t0 + ttft + k * tpot``; the request holds its slot until its
    last token, so its service time is ``ttft + (n - 1) * tpot``. A queued request starts at the *planned* time of
    the last token that freed its slot, not when that token was actually written, so timer jitter never adds up:
    with Poisson arrivals and a fixed output length the server is an exact M/D/c queue.

    Deadlines are absolute and kept in one heap; one event-loop timer wakes :data:`EARLY` before the earliest
    and sleeps to the exact time (event-loop timers have millisecond resolution), then emits every token due.
    """

    def __init__(self, loop, ttft: float, tpot: float, stats: Stats, max_num_seqs: int | None = None,
                 clock=time.monotonic):
        self.loop = loop
        self.ttft = ttft
        self.tpot = tpot
        self.stats = stats
        self.clock = clock
        self.cap = max_num_seqs or float("inf")
        self.running = 0
        self.waiting_q: deque[Seq] = deque()
        self.heap: list = []  # (deadline, tie-break counter, seq): each running request's next token
        self._count = 0
        self._timer = None
        self._timer_at = float("inf")
        self.on_step = None  # called after each batch of tokens (the HTTP layer resumes its intake)

    @property
    def stepping(self) -> bool:
        return bool(self.heap)

    def deadline(self) -> float:
        """Until when other work may run without delaying the next token."""
        return self.heap[0][0] - EARLY - 0.0005 if self.heap else float("inf")

    # the interface -------------------------------------------------------------------------------------------
    def add(self, seq: Seq) -> None:
        seq.t_arrival = seq.t_arrival or self.clock()
        if seq.prompt_len > 0:
            self.stats.prompt_tokens += seq.prompt_len
        if self.running < self.cap:
            self._start(seq, seq.t_arrival)
        else:
            self.waiting_q.append(seq)

    def abort(self, seq: Seq) -> None:
        if seq.done:
            return
        seq.aborted = True
        seq.done = True
        now = self.clock()
        if seq.t_scheduled is None:  # still queued
            try:
                self.waiting_q.remove(seq)
            except ValueError:
                pass
        else:  # its heap entry is skipped when it comes up
            self._free_slot(now)
        self.stats.finished(seq, now)

    @property
    def waiting(self) -> int:
        return len(self.waiting_q)

    def kv_usage(self) -> float:
        return 0.0

    # internals ----------------------------------------------------------------------------------------------
    def _start(self, seq: Seq, t0: float) -> None:
        seq.t_scheduled = t0
        self.running += 1
        self.stats.queue.observe(t0 - seq.t_arrival)
        self._push(t0 + self.ttft, seq)

    def _free_slot(self, t: float) -> None:
        """A running request ended at (planned) time ``t``: the next queued one starts then (or at its arrival)."""
        self.running -= 1
        q = self.waiting_q
        while q and self.running < self.cap:
            nxt = q.popleft()
            self._start(nxt, max(nxt.t_arrival, t))

    def _push(self, t: float, seq: Seq) -> None:
        heapq.heappush(self.heap, (t, self._count, seq))
        self._count += 1
        if t < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = t
            self._timer = self.loop.call_at(t - EARLY, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        heap = self.heap
        clock = self.clock
        now = clock()
        if heap and now < heap[0][0]:
            wait = heap[0][0] - now
            if wait <= 2 * EARLY:  # woken early on purpose: never emit before the planned time
                time.sleep(wait)
            now = clock()
        st = self.stats
        # Only the tokens due by now: under a load the server cannot carry, tokens would always be due, and one
        # callback that never returns would starve reading requests (and /metrics).
        while heap and heap[0][0] <= now:
            t, _, seq = heapq.heappop(heap)
            if seq.aborted:
                continue
            st.observe_lag(now - t)  # how late the token is versus its planned time
            if st.token(seq, now):
                seq.sink.on_token(seq, now)
                st.finished(seq, now)
                seq.sink.on_finish(seq, now)
                self._free_slot(t)
            else:
                seq.sink.on_token(seq, now)
                if not seq.aborted:
                    heapq.heappush(heap, (seq.t_scheduled + self.ttft + seq.n_out * self.tpot, self._count, seq))
                    self._count += 1
        if heap and heap[0][0] < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = heap[0][0]
            self._timer = self.loop.call_at(self._timer_at - EARLY, self._fire)
        if self.on_step is not None:
            self.on_step()
