"""``vk-eval live RUN.jsonl``: follow a file vk-send is still writing and show the run as it goes.

The view is refreshed every second (``--interval``): progress against the schedule, achieved against intended
rate, requests in flight, output tokens/s, TTFT/TPOT/ITL percentiles over the last window and over the whole run,
errors by kind with the latest messages, the lag verdict and, with ``--slo``/``--goodput``, the objectives so
far. On a terminal it is a ``rich`` live display; otherwise one plain line per refresh. It ends by itself when
the run's footer (``run_end``) arrives, with vk-eval's headline of the whole run.

Every figure is vk-eval's: ``vk.eval.evaluate`` over the records read so far (spooled, complete lines only, into
a private temporary file) and over the responses that finished within the last window; at the end over every
record, so the final figures are those ``vk-eval RUN.jsonl`` prints for the finished file. The window is
evaluated at each refresh; the whole run in a background thread over a snapshot of the spool (a long run's
evaluation takes seconds: the view says "as of" which moment its whole-run figures are), at most half of the
time. Following only reads the file (never locks or writes it) and runs at a lower priority (nice 10).
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from vk.errors import VkError

SHOWN_PERCENTILES = ("p50", "p90", "p99")
LATEST_ERRORS = 5
KINDS = ("run", "response", "server_metric", "run_end")


class Follower:
    """The complete lines appended to a file (``tail -f``), or read from a stream (``-``: stdin, e.g. ``ssh host
    tail -f run.jsonl``). A line without its newline yet waits for the rest."""

    def __init__(self, path: str):
        self.path = path
        self.name = "<stdin>" if path == "-" else path
        self.buf = b""
        self.f: Any = None
        self.pos = 0
        self.ended = False  # the stream closed (stdin); a file never ends by itself
        self.q: queue.Queue[bytes | None] | None = None
        if path == "-":
            self.q = queue.Queue()
            threading.Thread(target=self._read_stream, args=(sys.stdin.buffer.fileno(),), daemon=True).start()

    def _read_stream(self, fd: int) -> None:
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:
                chunk = b""
            self.q.put(chunk or None)
            if not chunk:
                return

    def poll(self) -> list[bytes]:
        data = b""
        if self.q is not None:
            while True:
                try:
                    chunk = self.q.get_nowait()
                except queue.Empty:
                    break
                if chunk is None:
                    self.ended = True
                    break
                data += chunk
        else:
            if self.f is None:
                try:
                    self.f = open(self.path, "rb")
                except FileNotFoundError:
                    return []  # not there yet: vk-send has not started writing
                except OSError as e:
                    raise VkError(f"{self.path}: cannot read ({e.strerror})") from None
            size = os.fstat(self.f.fileno()).st_size
            if size < self.pos:
                raise VkError(f"{self.path}: the file shrank while it was followed (truncated or rewritten)")
            data = self.f.read()
            self.pos += len(data)
        if not data:
            if self.ended and self.buf:  # the stream's last line had no newline
                line, self.buf = self.buf, b""
                return [line]
            return []
        data = self.buf + data
        cut = data.rfind(b"\n") + 1
        self.buf = data[cut:]
        return data[:cut].splitlines()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


@dataclass
class State:
    """What the follower has read: the records (spooled for vk-eval), and what vk-eval does not summarise."""

    name: str
    spool_dir: str
    window: float
    lines: int = 0
    header: bytes | None = None
    run: dict | None = None
    footer: dict | None = None
    responses: int = 0
    last_t: float = 0.0  # the latest t_done seen (run clock)
    by_kind: collections.Counter = field(default_factory=collections.Counter)
    latest_errors: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LATEST_ERRORS))
    recent: collections.deque = field(default_factory=collections.deque)  # (t_done, line) of the last window
    requests_of: dict = field(default_factory=dict)  # session id -> response records
    spool_fh: Any = None

    def __post_init__(self) -> None:
        self.spool = os.path.join(self.spool_dir, "run.jsonl")
        self.window_file = os.path.join(self.spool_dir, "window.jsonl")
        self.spool_fh = open(self.spool, "wb")

    def add(self, line: bytes) -> None:
        from vk import records

        self.lines += 1
        if not line.strip():
            return
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            raise VkError(f"{self.name}:{self.lines}: not valid JSON ({e})") from None
        records.validate(rec, self.name, self.lines, KINDS)
        self.spool_fh.write(line + b"\n")
        kind = rec["kind"]
        if kind == "run":
            if self.header is not None:
                raise VkError(f"{self.name}:{self.lines}: a second run header; vk-eval live follows one run "
                              "(evaluate concatenated runs with vk-eval)")
            self.header, self.run = line, rec
        elif kind == "run_end":
            self.footer = rec
        elif kind == "response":
            self.responses += 1
            sid = rec.get("session_id")
            self.requests_of[sid] = self.requests_of.get(sid, 0) + 1
            t = rec.get("t_done")
            if t is not None:
                self.last_t = max(self.last_t, t)
                self.recent.append((t, line))
            st = rec.get("status")
            if st != "ok":
                key = st + (f" HTTP {rec['http_status']}" if rec.get("http_status") else "")
                self.by_kind[key] += 1
                self.latest_errors.append((t, f"{sid}/{rec.get('request_id')}", key, str(rec.get("error") or "")[:200]))

    def flush(self) -> None:
        self.spool_fh.flush()
        while self.recent and self.recent[0][0] < self.last_t - self.window:
            self.recent.popleft()

    def write_window(self) -> str | None:
        if self.header is None or not self.recent:
            return None
        with open(self.window_file, "wb") as f:
            f.write(self.header + b"\n")
            for _, line in self.recent:
                f.write(line + b"\n")
        return self.window_file

    def close(self) -> None:
        self.spool_fh.close()


class Schedule:
    """``--schedule SCHED.jsonl``: the sessions vk-send was given, for progress (due, time left)."""

    def __init__(self, path: str):
        from vk.jsonl import read_records

        self.starts: list[float | None] = []
        self.requests: dict[str, int] = {}
        self.header: dict = {}
        for _, _, rec in read_records(path, ("schedule", "scheduled_session")):
            if rec["kind"] == "schedule":
                self.header = rec
            else:
                self.starts.append(rec.get("start"))
                self.requests[str(rec["session"]["id"])] = len(rec["session"]["requests"])
        self.starts.sort(key=lambda x: (x is None, x))


def _evaluate(path: str, opts: dict) -> dict | None:
    """vk-eval's result for ``path`` (None before the first response). follow() keeps vk-eval's warnings off the
    terminal: they are in the result."""
    from vk.eval import evaluate

    try:
        return evaluate(path, **opts).to_dict()
    except VkError as e:
        if "no response records" in str(e):
            return None
        raise


class WholeRun:
    """The whole run's evaluation in a thread, over a snapshot of the spool, so that the view keeps its cadence
    (the window's figures, the counts) while a long run's evaluation takes longer than a refresh. A new one starts
    when the last has finished and as long after it as it took (the follower evaluates at most half the time)."""

    def __init__(self, state: State, opts: dict):
        self.state = state
        self.opts = opts
        self.snapshot = os.path.join(state.spool_dir, "snapshot.jsonl")
        self.result: dict | None = None
        self.as_of = 0.0  # the run time of the latest response in the evaluated snapshot
        self.took = 0.0
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.next_start = 0.0
        self.size = 0

    def maybe_start(self) -> None:
        if self.error is not None:
            raise self.error
        if (self.thread is not None and self.thread.is_alive()) or time.monotonic() < self.next_start:
            return
        size = self.state.spool_fh.tell()  # complete lines only, flushed
        if size == self.size:
            return
        with open(self.state.spool, "rb") as src, open(self.snapshot, "wb") as dst:
            shutil.copyfileobj(io.BufferedReader(_Limited(src, size)), dst)
        self.size = size
        self.thread = threading.Thread(target=self._run, args=(self.state.last_t,), daemon=True)
        self.thread.start()

    def _run(self, as_of: float) -> None:
        t0 = time.monotonic()
        try:
            res = _evaluate(self.snapshot, self.opts)
        except BaseException as e:  # raised in the main thread by the next maybe_start
            self.error = e
            return
        self.took = time.monotonic() - t0
        self.next_start = time.monotonic() + self.took
        self.result, self.as_of = res, as_of

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()


class _Limited(io.RawIOBase):
    """The first ``n`` bytes of a file."""

    def __init__(self, f, n: int):
        self.f, self.left = f, n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.left <= 0:
            return 0
        data = self.f.read(min(len(b), self.left))
        b[: len(data)] = data
        self.left -= len(data)
        return len(data)


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v * 1000:.2f}"


def _num(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    return f"{v:,.{nd}f}"


def _itl_name(s: dict) -> str:
    return "itl_token" if (s["latency"].get("itl_token") or {}).get("n") else "itl_chunk"


def figures(state: State, whole: dict | None, win: dict | None, sched: Schedule | None, now_wall: float,
            window: float) -> dict:
    """Everything the view shows, as plain values and strings (both renderers read this)."""
    f: dict[str, Any] = {"name": state.name, "lines": state.lines, "responses": state.responses}
    run = state.run or {}
    f["run_id"] = run.get("run_id")
    f["model"] = run.get("model")
    f["api"] = run.get("api")
    start = run.get("start_epoch")
    if state.footer and state.footer.get("duration") is not None:
        f["t"] = state.footer["duration"]
    else:
        f["t"] = max(state.last_t, now_wall - start) if start and not state.footer else state.last_t
    f["idle"] = (now_wall - start - state.last_t) if start and not state.footer else None
    started = len(state.requests_of)
    f["sessions_started"] = started
    f["sessions_due"] = f["sessions_total"] = f["sessions_done"] = f["time_left"] = None
    if sched is not None:
        f["sessions_total"] = len(sched.starts)
        f["sessions_due"] = sum(1 for s in sched.starts if s is not None and s <= f["t"])
        f["sessions_done"] = sum(1 for sid, n in state.requests_of.items() if sched.requests.get(str(sid)) == n)
        last = max((s for s in sched.starts if s is not None), default=None)
        if last is not None:
            f["time_left"] = max(0.0, last - f["t"])
    sh = run.get("schedule") or {}
    if f["time_left"] is None and sh.get("duration"):
        f["time_left"] = max(0.0, float(sh["duration"]) - f["t"])
    if state.footer:
        ft = state.footer
        f["sessions_total"] = ft.get("sessions_scheduled", f["sessions_total"])
        f["sessions_done"] = ft.get("sessions_done", f["sessions_done"])
        f["time_left"] = 0.0
    f["errors_by_kind"] = dict(state.by_kind.most_common())
    f["latest_errors"] = list(state.latest_errors)
    f["footer"] = state.footer
    f["whole"] = whole
    f["window"] = win
    f["window_s"] = window
    if whole is not None:
        s = whole["overall"]
        rate = s["accuracy"].get("rate") or {}
        f["intended_per_s"] = rate.get("intended_per_s")
        f["achieved_per_s"] = rate.get("achieved_per_s")
        f["completed_per_s"] = s["throughput"]["whole"]["requests_per_s"]
        f["output_tokens_per_s"] = s["throughput"]["whole"]["output_tokens_per_s"]
        f["counts"] = s["counts"]
        lag = s["accuracy"].get("lag") or []
        f["lagged"] = any(v.get("lagged") for v in lag) or bool((state.footer or {}).get("lagged"))
        f["lag_findings"] = [x for v in lag for x in v.get("findings") or []]
        f["slo"] = whole.get("slo") or []
        f["goodput"] = s.get("goodput")
    if win is not None:
        w = win["overall"]
        f["window_output_tokens_per_s"] = w["throughput"]["whole"]["output_tokens_per_s"]
        e2e = (w["latency"].get("e2e") or {}).get("mean")
        rps = w["throughput"]["whole"]["requests_per_s"]
        # Little's law over the window: requests in flight = completion rate x time in the system
        f["in_flight"] = rps * e2e if rps is not None and e2e is not None else None
    return f


def latency_rows(f: dict) -> list[tuple[str, list[str], list[str]]]:
    """(metric label, window p50/p90/p99 ms, whole-run p50/p90/p99 ms)."""
    rows = []
    whole = f["whole"]["overall"] if f.get("whole") else None
    win = f["window"]["overall"] if f.get("window") else None
    for label, name in (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", None)):
        def stats(s, name=name):
            if s is None:
                return ["-"] * len(SHOWN_PERCENTILES), ""
            n = name or _itl_name(s)
            st = s["latency"].get(n) or {}
            return [_ms(st.get(p)) for p in SHOWN_PERCENTILES], n
        wv, _ = stats(win)
        av, n = stats(whole)
        rows.append((label if name else f"ITL ({n})" if n else "ITL", wv, av))
    return rows


def plain_line(f: dict) -> str:
    parts = [f"t={_num(f['t'])}s"]
    sess = f"sessions {f['sessions_started']} started"
    if f.get("sessions_due") is not None:
        sess += f", {f['sessions_due']} due"
    if f.get("sessions_done") is not None:
        sess += f", {f['sessions_done']} done"
    if f.get("sessions_total") is not None:
        sess += f" of {f['sessions_total']}"
    if f.get("time_left") is not None:
        sess += f", {_num(f['time_left'])} s left"
    parts.append(sess)
    if f.get("whole") is None:
        parts.append(f"{f['responses']} responses; waiting for the first")
        return " | ".join(parts)
    parts.append(f"rate {_num(f.get('achieved_per_s'), 2)} req/s sent (intended {_num(f.get('intended_per_s'), 2)}), "
                 f"{_num(f.get('completed_per_s'), 2)} completed")
    parts.append(f"in flight ~{_num(f.get('in_flight'))}")
    parts.append(f"output {_num(f.get('output_tokens_per_s'))} tok/s (last {f['window_s']:g}s "
                 f"{_num(f.get('window_output_tokens_per_s'))})")
    if f.get("as_of") is not None and f["t"] - f["as_of"] > 5 and not f.get("footer"):
        parts.append(f"whole run as of t={_num(f['as_of'])}s")
    for label, wv, av in latency_rows(f):
        parts.append(f"{label} p50/p90/p99 {'/'.join(av)} ms (last {f['window_s']:g}s {'/'.join(wv)})")
    c = f["counts"]
    kinds = ", ".join(f"{k} {v}" for k, v in f["errors_by_kind"].items())
    parts.append(f"errors {c['failed']} of {c['counted']}" + (f" ({kinds})" if kinds else ""))
    parts.append("lag: LAGGED" if f.get("lagged") else "lag: not lagged")
    if f.get("slo"):
        ok = sum(1 for x in f["slo"] if x["ok"])
        parts.append(f"SLO {ok} of {len(f['slo'])} met" + "".join(
            f"; MISSED {x['slo']} ({x['group']})" for x in f["slo"] if not x["ok"]))
    if f.get("goodput"):
        parts.append(f"goodput attainment {_num(f['goodput']['attainment'] * 100)}%")
    return " | ".join(parts)


def rich_view(f: dict, interval: float, took: float):
    from rich.console import Group
    from rich.panel import Panel
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    from vk.eval.result import _slo_value

    head = Text()
    head.append("vk-eval live ", style="bold")
    head.append(f"{f['name']}  run {f.get('run_id') or '?'}  model {f.get('model') or '?'}")
    when = Text(f"t = {_num(f['t'])} s")
    if f.get("idle") is not None and f["idle"] > 5:
        when.append(f"  (no record for {_num(f['idle'])} s)", style="yellow")
    if f.get("footer"):
        when.append(f"  ended: {f['footer'].get('ended')} ({f['footer'].get('reason')})", style="bold green")
    items: list[Any] = [head, when]
    prog = Table.grid(padding=(0, 2))
    total = f.get("sessions_total")
    bar = ProgressBar(total=total or 1, completed=(f.get("sessions_done") or f["sessions_started"]) if total else 0,
                      width=40)
    desc = f"sessions: {f['sessions_started']} started"
    for k, w in (("sessions_due", "due"), ("sessions_done", "done")):
        if f.get(k) is not None:
            desc += f", {f[k]} {w}"
    desc += f" of {total}" if total else " (total unknown: --schedule)"
    if f.get("time_left") is not None:
        desc += f"; {_num(f['time_left'])} s left"
    prog.add_row(bar, desc)
    items.append(prog)
    if f.get("whole") is None:
        items.append(Text(f"{f['responses']} responses so far; waiting for the first response record"))
        return Panel(Group(*items), title="vk-eval live", border_style="blue")
    rates = Table(title="Load", show_header=True, header_style="bold", expand=False)
    for c in ("sent req/s", "intended req/s", "completed req/s", "in flight (est.)", "output tok/s",
              f"output tok/s (last {f['window_s']:g}s)"):
        rates.add_column(c, justify="right")
    rates.add_row(_num(f.get("achieved_per_s"), 2), _num(f.get("intended_per_s"), 2), _num(f.get("completed_per_s"), 2),
                  _num(f.get("in_flight")), _num(f.get("output_tokens_per_s")),
                  _num(f.get("window_output_tokens_per_s")))
    lat = Table(title="Latency (ms)", header_style="bold")
    lat.add_column("metric")
    for p in SHOWN_PERCENTILES:
        lat.add_column(f"last {f['window_s']:g}s {p}", justify="right")
    for p in SHOWN_PERCENTILES:
        lat.add_column(f"whole run {p}", justify="right")
    for label, wv, av in latency_rows(f):
        lat.add_row(label, *wv, *av)
    items += [rates, lat]
    c = f["counts"]
    err = Table(title=f"Errors: {c['failed']} of {c['counted']} counted (the run's stop left out)", header_style="bold")
    err.add_column("kind")
    err.add_column("requests", justify="right")
    for k, v in f["errors_by_kind"].items():
        err.add_row(k, str(v))
    items.append(err)
    for t, rid, k, msg in reversed(f["latest_errors"]):
        items.append(Text(f"  t={_num(t, 2)}s {rid}: {k}: {msg}", style="red"))
    lag = Text("lag verdict: ")
    if f.get("lagged"):
        lag.append("LAGGED", style="bold red")
        if f.get("lag_findings"):
            lag.append(" (" + "; ".join(f["lag_findings"][:2]) + ")")
    else:
        lag.append("not lagged", style="green")
    items.append(lag)
    if f.get("slo"):
        slo = Table(title="SLOs so far", header_style="bold")
        for col in ("slo", "group", "measured", "objective", "verdict"):
            slo.add_column(col)
        for x in f["slo"]:
            slo.add_row(x["slo"], x["group"], _slo_value(x["value"], x.get("unit", "")),
                        f"{x['op']} {_slo_value(x['threshold'], x.get('unit', ''))}",
                        Text("ok", style="green") if x["ok"] else Text("MISSED", style="bold red"))
        items.append(slo)
    if f.get("goodput"):
        g = f["goodput"]
        items.append(Text(f"goodput ({g['spec']}): {_num(g['attainment'] * 100)}% of measured requests met every "
                          f"objective, {_num(g['requests_per_s'], 2)} req/s"))
    if f.get("as_of") is not None and not f.get("footer"):
        items.append(Text(f"whole-run figures as of t = {_num(f['as_of'])} s (evaluated in the background)",
                          style="dim"))
    items.append(Text(f"refresh every {interval:.1f} s; the last evaluation took {took:.2f} s; {f['lines']} lines read",
                      style="dim"))
    return Panel(Group(*items), title="vk-eval live", border_style="blue")


def follow(path: str, *, slo=None, goodput=None, warmup=None, cooldown=None, window: float = 10.0,
           interval: float | None = None, schedule: str | None = None, plain: bool | None = None,
           final_json: str | None = None, out=None, nice: int = 10) -> int:
    """Follow ``path`` until its footer arrives (or the stream ends); returns the exit status."""
    out = out or sys.stdout
    if plain is None:
        plain = not out.isatty()
    if interval is None:
        interval = 5.0 if plain else 1.0
    if interval <= 0 or window <= 0:
        raise VkError("--interval and --window must be positive")
    with contextlib.suppress(OSError, AttributeError):
        os.nice(nice)  # the follower yields the CPU to vk-send
    sched = Schedule(schedule) if schedule else None
    opts = {"slo": slo, "goodput": goodput, "warmup": warmup, "cooldown": cooldown}
    from vk.eval.options import Options

    Options(**opts)  # a bad --slo or --goodput fails now, not after the first refresh
    tmp = tempfile.mkdtemp(prefix="vk-live-")
    follower = Follower(path)
    state = State(name=follower.name, spool_dir=tmp, window=window)
    live = None
    whole = win = None
    took = 0.0
    f: dict = {}
    background = WholeRun(state, opts)
    real_stderr = sys.stderr
    try:
        # vk-eval's warnings (a run without its footer yet, ...) are in its result; the terminal is the view's
        with contextlib.redirect_stderr(io.StringIO()):
            if not plain:
                from rich.console import Console
                from rich.live import Live

                live = Live(console=Console(file=out), auto_refresh=False, transient=False, redirect_stdout=False,
                            redirect_stderr=False)
                live.start()
            step = interval
            while True:
                t0 = time.monotonic()
                for line in follower.poll():
                    state.add(line)
                    if state.footer is not None:
                        break
                state.flush()
                done = state.footer is not None or follower.ended
                if done:  # the final figures: vk-eval over every record, once the last evaluation has ended
                    background.wait()
                    whole = _evaluate(state.spool, opts) if state.responses else None
                    as_of = state.last_t
                elif state.responses:
                    background.maybe_start()
                    whole, as_of = background.result, background.as_of
                if state.responses:
                    e0 = time.monotonic()
                    wpath = state.write_window()
                    win = _evaluate(wpath, opts) if wpath else None
                    took = time.monotonic() - e0
                    step = max(interval, 2 * took)
                f = figures(state, whole, win, sched, time.time(), window)
                f["as_of"] = as_of if whole is not None else None
                if live is not None:
                    live.update(rich_view(f, step, max(took, background.took)), refresh=True)
                elif not done:
                    print(plain_line(f), file=out, flush=True)
                if done:
                    break
                time.sleep(max(0.05, step - (time.monotonic() - t0)))
    except KeyboardInterrupt:
        if live is not None:
            live.stop()
            live = None
        print("vk-eval live: interrupted", file=real_stderr)
        return 130
    finally:
        if live is not None:
            live.stop()
        follower.close()
        state.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if whole is not None:
        from vk.eval.result import headline

        if plain:
            print(plain_line(f), file=out)
        print("final (vk-eval over the whole " + ("run" if state.footer else "input") + "):", file=out)
        for ln in headline(whole):
            print("  " + ln, file=out)
        out.flush()
        if final_json:
            from vk.eval.outputs import writing

            with writing(final_json), open(final_json, "wb") as fh:
                fh.write(orjson.dumps(whole, option=orjson.OPT_INDENT_2) + b"\n")
    if state.footer is None:
        print(f"vk-eval live: {follower.name} ended before the run's footer (vk-send stopped or was killed?)",
              file=sys.stderr)
        return 1
    return 0
