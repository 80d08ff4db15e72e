"""The collector: writes the response records (from a thread, in order), counts statuses, tracks dispatch lag,
applies --max-errors and drives the progress bar; and the in-place rewrite of the run header's lag verdict."""

from __future__ import annotations

import collections
import fcntl
import io
import os
import queue
import signal
import stat
import sys
import threading
import time
from array import array

from vk.jsonl import NoSpaceError, Writer, dumps
from vk.send.ledger import Ledger

_mono = time.monotonic

# signals that stop a run cleanly (footer written, exit 130); SIGHUP: the terminal went away
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))



class Collector:
    """Writes records, counts statuses, tracks dispatch lag, applies --max-errors, drives the progress bar."""

    def __init__(self, writer: Writer, max_errors: float | None, progress: bool, on_stop):
        self.writer = writer
        self.max_errors = max_errors
        self.on_stop = on_stop
        self.counts: collections.Counter = collections.Counter()
        self.lags = array("d")
        self.lags_warm = array("d")
        self.n = 0
        self.errors = 0
        self.retried = 0  # responses whose request was retried on a fresh connection (attempts > 1)
        self.t_last_done = 0.0
        self.broken = False
        self.write_error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.lock: threading.Lock | None = None
        self.q = None
        self.on_broken = None
        self.inflight = 0
        self.sessions_done = 0
        self.ledger = Ledger()
        self.answered = 0  # records of requests that got any byte of an answer
        self.first_error: str | None = None
        self.bar = None
        self.t_bar = 0.0
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(unit="req", file=sys.stderr, dynamic_ncols=True, mininterval=0.5, smoothing=0.1)

    # -- output: a writer thread, so that a slow disk never stalls the event loop -------------------------------
    def start_writer(self, on_broken) -> None:
        """From here on records are written by a thread (one write and flush per record, in order)."""
        self.on_broken = on_broken
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._write_loop, daemon=True, name="vk-send-writer")
        self.thread.start()

    def _write_loop(self) -> None:
        q = self.q
        while True:
            line = q.get()
            if line is None:
                return
            if self.broken:
                continue
            with self.lock:
                try:
                    self.writer.write_raw(line)
                except BrokenPipeError:
                    # the reader went away (vk-send ... | head): stop sending, nothing more can be recorded
                    self.broken = True
                    self.on_broken()
                except (OSError, ValueError, NoSpaceError) as e:
                    self.broken = True
                    self.write_error = e
                    self.on_broken()

    def stop_writer(self) -> None:
        """Wait until every record handed over is written."""
        if self.thread is not None:
            self.q.put(None)
            self.thread.join()
            self.thread = None

    def exit_now(self) -> None:
        """A second signal: leave at once, but never in the middle of a line."""
        if self.lock is not None:
            self.lock.acquire(timeout=2.0)
        try:
            self.writer.flush()
        finally:
            os._exit(130)

    def add(self, rec: dict, line: bytes | None = None):
        """Hand a response record to the writer and count it; returns the session's ledger entry when this
        record was the last one the session was waiting for."""
        self.q.put(line if line is not None else dumps(rec))
        self.n += 1
        st = rec.get("status")
        self.counts[st] += 1
        if rec.get("attempts", 1) > 1:
            self.retried += 1
        if rec.get("http_status") is not None or rec.get("t_first_byte") is not None:
            self.answered += 1
        elif self.first_error is None and st in ("error", "timeout"):
            self.first_error = rec.get("error")
        td = rec.get("t_dispatched")
        ti = rec.get("t_intended")
        if td is not None and ti is not None:
            (self.lags_warm if rec.get("warmup") else self.lags).append(td - ti)
        t_done = rec.get("t_done")
        if t_done is not None and t_done > self.t_last_done:
            self.t_last_done = t_done
        if st in ("error", "timeout"):
            self.errors += 1
            me = self.max_errors
            if me is not None:
                if me >= 1 and self.errors >= me:
                    self.on_stop(f"max-errors: {self.errors} requests failed (--max-errors {me:g})", "max_errors")
                else:
                    tried = self.n - self.counts["skipped"] - self.counts["cancelled"]
                    if me < 1 and tried >= 20 and self.errors / tried > me:
                        self.on_stop(f"max-errors: {self.errors} of {tried} requests failed, more than {me:g}",
                                     "max_errors")
        if self.bar is not None:
            now = _mono()
            if now - self.t_bar > 0.25:
                self.refresh_bar()
        return self.ledger.record(rec)

    def unreachable(self) -> str | None:
        """Why no request reached the server (none got a byte of an answer, none succeeded), else None."""
        failed = self.counts["error"] + self.counts["timeout"]
        if failed == 0 or self.answered or self.counts["ok"]:
            return None
        return f"no request reached the server: {failed} of {failed} failed without an answer ({self.first_error})"

    def refresh_bar(self) -> None:
        if self.bar is None:
            return
        self.t_bar = _mono()
        self.bar.n = self.n
        p99 = self.lag_stats()["p99"]
        self.bar.set_postfix_str(f"sessions={self.sessions_done} errors={self.errors} in_flight={self.inflight} "
                                 f"lag_p99={'-' if p99 is None else f'{p99 * 1e3:.2f}ms'}", refresh=False)
        self.bar.refresh()

    def lag_stats(self) -> dict:
        lags = self.lags if len(self.lags) else self.lags_warm
        if not len(lags):
            return {"p50": None, "p99": None, "max": None, "n": 0}
        s = sorted(lags)
        return {"p50": linear_percentile(s, 0.5), "p99": linear_percentile(s, 0.99), "max": s[-1], "n": len(s)}

    def close_bar(self) -> None:
        if self.bar is not None:
            self.refresh_bar()
            self.bar.close()



def linear_percentile(s, q: float) -> float:
    """The q-quantile of sorted values by linear interpolation between closest ranks: numpy's default method
    ("linear"), which vk-eval uses too, so that the footer's p99 is the p99 vk-eval reports."""
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def round_lag(x):
    return None if x is None else round(x, 7)


def tell(writer: Writer) -> int | None:
    """Where the next write lands, when the output is a regular file (a path, or stdout redirected to one)."""
    try:
        fd = writer.fh.fileno()
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        writer.fh.flush()
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
            return os.fstat(fd).st_size  # appending: the next write lands at the end
        return os.lseek(fd, 0, os.SEEK_CUR)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return None


def rewrite_lagged(writer: Writer, header_line: bytes, pos: int | None) -> bool:
    """Rewrite the header's ``"lagged":false`` to ``"lagged":true `` in place (same length)."""
    if pos is None:
        return False
    old = b'"lagged":false'
    i = header_line.rfind(old)
    if i < 0:
        return False
    try:
        writer.fh.flush()
        # a fresh read-write descriptor: stdout may be write-only, and pwrite on O_APPEND appends on Linux
        fd = os.open(f"/proc/self/fd/{writer.fh.fileno()}", os.O_RDWR)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False
    try:
        if os.pread(fd, len(header_line), pos) != header_line:
            return False
        os.pwrite(fd, b'"lagged":true ', pos + i)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)



def set_reason(state, reason, ended) -> None:
    if state["reason"] is None:
        state["reason"] = reason
        state["ended"] = ended
