"""``vk-send --scrape``: read the server's Prometheus metrics during the run, as ``server_metric`` records.

The scraper is a process of its own (``python -m vk.send.scrape``), not a thread of vk-send: fetching and
parsing an exposition of a few hundred samples every second would otherwise take the interpreter lock from the
send loop at moments the schedule does not know about, and the point of vk-send is that requests leave when the
schedule says. The child writes finished JSON lines to a pipe; a thread of the parent hands each line to the
run's writer as it is (no parsing on the parent's side).

Protocol: the child starts before the run's start instant (its interpreter start-up is not the run's business),
says ``#ready`` once it has imported what it needs, and waits for one line on stdin, ``MONO0 RUN_ID``: the run's time 0 on CLOCK_MONOTONIC, which is system-wide, so
the child's times are on the run's clock. It scrapes once at once (a baseline before the first request), then
every interval on the run's clock (ticks it missed are skipped, not caught up), and once more when its stdin
closes (the run has ended), then exits. It ignores SIGINT: a Ctrl-C reaches the whole foreground group, and the
final scrape after the parent's own shutdown is what makes the counters' last deltas complete.
"""

from __future__ import annotations

import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import orjson

from vk import records as vkrecords
from vk.errors import VkError

DEFAULT_SCRAPE_INTERVAL = 1.0
# The child loads this file by path: ``-m vk.send.scrape`` would import the vk.send package (the whole client)
_CHILD = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('vk_send_scrape', sys.argv[1]); "
          "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); m._child_main(sys.argv[2:])")
_AUTH_ENV = "VK_SCRAPE_AUTHORIZATION"  # the API key travels in the environment, never on a command line


def metrics_url(api: str) -> str:
    """The default scrape URL: the API's origin + /metrics (``http://h:p/v1`` -> ``http://h:p/metrics``)."""
    import urllib.parse

    u = urllib.parse.urlsplit(api)
    return f"{u.scheme}://{u.netloc}/metrics"


def exposition_records(text: str, t: float, run_id: str, *, buckets: bool = False) -> list[dict]:
    """The samples of a Prometheus text exposition as ``server_metric`` records (raw values).

    Parsed with prometheus_client's parser. Histogram buckets are left out unless ``buckets`` (their _sum and
    _count stay); ``_created`` samples (when a counter was created) are always left out.
    """
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for fam in text_string_to_metric_families(text):
        typ = fam.type if fam.type in vkrecords.METRIC_TYPES else "unknown"
        for s in fam.samples:
            if s.name.endswith("_created") or (not buckets and s.name.endswith("_bucket")
                                               and typ in ("histogram", "gaugehistogram")):
                continue
            v = float(s.value)
            out.append(vkrecords.new_server_metric(run_id, t, s.name, v if math.isfinite(v) else None,
                                                   labels=dict(s.labels) or None, type=typ))
    return out


def scrape_once(url: str, t: float, run_id: str, *, timeout: float, buckets: bool = False,
                authorization: str | None = None) -> list[dict]:
    """Fetch and parse one exposition; a failure is one record with ``error``."""
    headers = {"User-Agent": "vk-send", "Accept": "text/plain;version=0.0.4"}
    if authorization:
        headers["Authorization"] = authorization
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
            text = r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return [vkrecords.new_server_metric(run_id, t, None, None, error=f"HTTP {e.code} from {url}")]
    except (OSError, ValueError) as e:
        why = getattr(e, "reason", None) or e
        return [vkrecords.new_server_metric(run_id, t, None, None, error=f"no answer from {url} ({why})")]
    try:
        return exposition_records(text, t, run_id, buckets=buckets)
    except Exception as e:  # noqa: BLE001 (the parser raises ValueError, TypeError, IndexError, ...)
        return [vkrecords.new_server_metric(run_id, t, None, None,
                                            error=f"{url}: not a Prometheus text exposition ({e})")]


def _child_main(argv: list[str]) -> None:
    url, interval, timeout, buckets = argv[0], float(argv[1]), float(argv[2]), argv[3] == "1"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    auth = os.environ.pop(_AUTH_ENV, None)
    import prometheus_client.parser  # noqa: F401 (imported now, not during the run)

    fd = sys.stdin.fileno()  # raw reads: select() must see what a buffered reader would have swallowed
    out = sys.stdout.buffer
    out.write(b"#ready\n")
    out.flush()
    got = b""
    while not got.endswith(b"\n"):
        chunk = os.read(fd, 4096)
        if not chunk:
            return  # the parent went away before the run started
        got += chunk
    first = got.split()
    mono0, run_id = float(first[0]), first[1].decode()

    def scrape() -> None:
        t0 = time.monotonic()
        recs = scrape_once(url, round(t0 - mono0, 6), run_id, timeout=timeout, buckets=buckets,
                           authorization=auth)
        out.write(b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in recs))
        out.flush()

    scrape()  # the baseline, before the first request
    k = 1
    while True:
        now = time.monotonic()
        k = max(k, math.floor((now - mono0) / interval) + 1)  # skip ticks a slow scrape made us miss
        wait = mono0 + k * interval - now
        ready, _, _ = select.select([fd], [], [], max(0.0, wait))
        if ready:
            if not os.read(fd, 4096):  # EOF: the run has ended
                scrape()
                return
            continue
        scrape()
        k += 1


class Scraper:
    """The parent's handle on the scraping process: ``start()`` early, ``begin()`` at time 0, ``stop()`` at the end."""

    def __init__(self, url: str, *, interval: float = DEFAULT_SCRAPE_INTERVAL, timeout: float | None = None,
                 buckets: bool = False, api_key: str | None = None):
        self.url = url
        self.interval = interval
        self.timeout = timeout if timeout is not None else max(1.0, min(5.0, 2 * interval))
        self.buckets = buckets
        self.api_key = api_key
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        self.lines = 0

    def start(self) -> Scraper:
        env = dict(os.environ)
        if self.api_key:
            env[_AUTH_ENV] = f"Bearer {self.api_key}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, __file__, self.url, repr(self.interval), repr(self.timeout),
             "1" if self.buckets else "0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0,
        )
        if self.proc.stdout.readline() != b"#ready\n":
            self.stop()
            raise VkError("--scrape: the scraping process failed to start")
        return self

    def begin(self, mono0: float, run_id: str, emit: Callable[[bytes], None]) -> None:
        """Time 0 of the run is ``mono0`` (CLOCK_MONOTONIC); every JSON line the child writes goes to ``emit``."""
        assert self.proc is not None
        self.thread = threading.Thread(target=self._forward, args=(emit,), daemon=True, name="vk-send-scrape")
        self.thread.start()
        try:
            self.proc.stdin.write(f"{mono0!r} {run_id}\n".encode())
        except BrokenPipeError:
            pass

    def _forward(self, emit: Callable[[bytes], None]) -> None:
        for line in self.proc.stdout:
            if line.endswith(b"\n"):
                emit(line)
                self.lines += 1

    def stop(self) -> None:
        """Close the child's stdin (it scrapes once more and exits); wait for its last lines."""
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(self.timeout + 5.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.thread is not None:
            self.thread.join(5.0)
        self.proc.stdout.close()
        self.proc = None

