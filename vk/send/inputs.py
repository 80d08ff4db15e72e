"""vk-send's input: scheduled sessions from records (plain sessions wrapped), and the reader thread that feeds
them to the workers."""

from __future__ import annotations

from collections.abc import Iterator

from vk import records as vkrecords
from vk.errors import RecordError, VkError

# A start offset, think time or start_at this far ahead is a mistake (a timestamp where an offset belongs, a
# unit slip), not a benchmark: refused before the run. Documented in vk-send(1).
MAX_WAIT = 7 * 86400.0


def _check_times(rec: dict, source: str, line: int) -> None:
    start = rec.get("start")
    if isinstance(start, (int, float)) and start > MAX_WAIT:
        raise RecordError(source, line, "start", f"{start:g} s after the run start is more than {MAX_WAIT / 86400:g} "
                          "days ahead (a timestamp where an offset belongs?)")
    for i, r in enumerate(rec["session"].get("requests") or ()):
        tt = r.get("think_time") if isinstance(r, dict) else None
        if isinstance(tt, (int, float)) and tt > MAX_WAIT:
            raise RecordError(source, line, f"session.requests[{i}].think_time",
                              f"{tt:g} s is more than {MAX_WAIT / 86400:g} days")


def prepare_input(it: Iterator[dict], validate: bool, source: str, line0: int, mode_ref: dict) -> Iterator[dict]:
    """Yield scheduled_session records (plain sessions wrapped, index = their position)."""
    n = 0
    line = line0
    for rec in it:
        line += 1
        kind = rec.get("kind") if isinstance(rec, dict) else None
        if kind == "schedule":
            raise RecordError(source, line, "kind", "a schedule header may only be the first record")
        if validate:
            vkrecords.validate(rec, source, line, ("scheduled_session", "session"))
        elif kind not in ("scheduled_session", "session"):
            raise RecordError(source, line, "kind", f"expected 'scheduled_session' or 'session', got {kind!r}")
        if kind == "session":
            rec = {"kind": "scheduled_session", "v": 1, "index": n, "start": None, "session": rec}
        _check_times(rec, source, line)
        if mode_ref.get("mode") == "open" and rec.get("start") is None:
            raise RecordError(source, line, "start",
                              f"session {rec['session'].get('id')!r} has no start offset, but the schedule is "
                              "open loop (a closed-loop or plain-session input needs no start)")
        n += 1
        yield rec


def read_input(records, validate: bool, source: str, concurrency: int | None):
    """The schedule header (or None), the mode (open or closed), the closed loop's concurrency, and the stream of
    scheduled sessions; the first session has been read (so that a pipe's upstream start-up is over)."""
    it = iter(records)
    header = None
    first = None
    line0 = 0
    for rec in it:
        if isinstance(rec, dict) and rec.get("kind") == "schedule":
            if validate:
                vkrecords.validate_schedule(rec, source, 1)
            header = rec
            line0 = 1
        else:
            first = rec
        break
    rest: Iterator[dict] = it if first is None else chain1(first, it)
    mode_ref: dict = {}
    if header is not None:
        mode = header["mode"]
        conc = int(header.get("concurrency") or 1)
        mode_ref["mode"] = mode
    else:
        mode = None
        conc = int(concurrency or 1)
    if concurrency is not None and header is not None and mode == "closed":
        conc = int(concurrency)
    stream_in = prepare_input(rest, validate, source, line0, mode_ref)
    if mode is None:
        # no header: scheduled sessions with start offsets run open loop; plain sessions a closed loop
        peek = next(stream_in, None)
        if peek is None:
            stream_in = iter(())
            mode = "closed"
        else:
            mode = "open" if (first.get("kind") == "scheduled_session" and peek.get("start") is not None) \
                else "closed"
            stream_in = chain1(peek, stream_in)
    mode_ref["mode"] = mode
    # The run's clock starts only once the first session is here: in a pipe, the upstream stages' own start-up
    # (vk-gen loading a tokenizer) is not the client lagging behind its schedule.
    first_session = next(stream_in, None)
    if first_session is not None:
        stream_in = chain1(first_session, stream_in)
    return header, mode, conc, stream_in, first_session


def first_due(ss: dict | None) -> float | None:
    """Seconds from the run start until the session's first request is due (open loop)."""
    if ss is None or ss.get("start") is None:
        return None
    thinks = [r.get("think_time") or 0.0 for r in ss["session"]["requests"] if not r.get("parents")]
    return float(ss["start"]) + min(thinks or [0.0])


def peak_starts(starts: list[float], window: float = 10.0) -> int:
    """The most session starts within any ``window`` seconds: about how many requests an open-loop schedule keeps
    in flight at its busiest (each needs a socket)."""
    starts.sort()
    best = j = 0
    for i, t in enumerate(starts):
        while starts[j] < t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def chain1(first, it):
    yield first
    yield from it



def feeder(stream_in, put, end, input_error: list, on_bad, status: dict | None = None) -> None:
    """The input thread: hand each session to ``put`` until it refuses one; ``status["exhausted"]`` is set when
    the input was read to its end."""
    try:
        for rec in stream_in:
            if not put(rec):
                return
        if status is not None:
            status["exhausted"] = True
    except VkError as e:
        input_error.append(e)
        on_bad(e)
    except Exception as e:  # noqa: BLE001 - report as one line
        input_error.append(VkError(f"cannot read the input: {e}"))
        on_bad(e)
    finally:
        end()
