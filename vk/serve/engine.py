"""The simulated serving engine: requests (``Seq``), the fixed-latency scheduler and the engine model.

Both schedulers have the same small interface, used by the HTTP layer (``vk.serve.server``):

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
import time


class Seq:
    """One request inside the simulated engine."""

    __slots__ = (
        "rid", "prompt_ids", "prompt_len", "out_ids", "out_target", "n_out", "finish_reason", "cached_tokens",
        "t_arrival", "t_scheduled", "t_first", "t_last", "sink", "aborted", "done", "num_computed", "blocks",
        "n_hashed", "hashes", "handle", "preemptions",
    )

    def __init__(self, rid: str, prompt_ids: list[int], out_ids: list[int], finish_reason: str, sink):
        self.rid = rid
        self.prompt_ids = prompt_ids
        self.prompt_len = len(prompt_ids)
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
        self.errors = {}
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

    def finished(self, seq: Seq, now: float) -> None:
        reason = "abort" if seq.aborted else seq.finish_reason
        self.success[reason] = self.success.get(reason, 0) + 1
        if seq.aborted:
            return
        self.e2e.observe(now - seq.t_arrival)
        self.prompt_hist.observe(seq.prompt_len)
        self.gen_hist.observe(seq.n_out)
        if seq.n_out > 1 and seq.t_first is not None:
            self.tpot.observe((now - seq.t_first) / (seq.n_out - 1))


class FixedLatency:
    """Every request gets its first token ``ttft`` seconds after arrival and one more every ``tpot`` seconds.

    No queueing, no batching effects: the mode for tests of clients. Token ``k`` (0-based) of a request that
    arrived at ``t0`` is emitted at ``t0 + ttft + k * tpot`` (absolute times, so timer jitter does not add up).
    """

    def __init__(self, loop, ttft: float, tpot: float, stats: Stats, clock=time.monotonic):
        self.loop = loop
        self.ttft = ttft
        self.tpot = tpot
        self.stats = stats
        self.clock = clock
        self.running = 0
        self.on_step = None
        self.stepping = False

    def deadline(self) -> float:
        return float("inf")

    # the interface -------------------------------------------------------------------------------------------
    def add(self, seq: Seq) -> None:
        seq.t_arrival = seq.t_arrival or self.clock()
        seq.t_scheduled = seq.t_arrival
        self.running += 1
        self.stats.prompt_tokens += seq.prompt_len
        self.stats.queue.observe(0.0)
        seq.handle = self.loop.call_at(seq.t_arrival + self.ttft, self._tick, seq)

    def abort(self, seq: Seq) -> None:
        if seq.done:
            return
        seq.aborted = True
        seq.done = True
        if seq.handle is not None:
            seq.handle.cancel()
        self.running -= 1
        self.stats.finished(seq, self.clock())

    @property
    def waiting(self) -> int:
        return 0

    def kv_usage(self) -> float:
        return 0.0

    # internals ----------------------------------------------------------------------------------------------
    def _tick(self, seq: Seq) -> None:
        if seq.aborted:
            return
        now = self.clock()
        seq.n_out += 1
        self.stats.generation_tokens += 1
        if seq.n_out == 1:
            seq.t_first = now
            self.stats.ttft.observe(now - seq.t_arrival)
        seq.t_last = now
        last = seq.n_out >= seq.out_target
        if last:
            seq.done = True
            self.running -= 1
        seq.sink.on_token(seq, now)
        if last:
            self.stats.finished(seq, now)
            seq.sink.on_finish(seq, now)
        elif not seq.aborted:
            seq.handle = self.loop.call_at(seq.t_arrival + self.ttft + seq.n_out * self.tpot, self._tick, seq)
