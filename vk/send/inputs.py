"""vk-send's input: scheduled sessions from records (plain sessions wrapped), and the reader thread that feeds
them to the workers."""

from __future__ import annotations

from collections.abc import Iterator

from vk import records as vkrecords
from vk.errors import RecordError, VkError


def prepare_input(it: Iterator[dict], validate: bool, source: str, line0: int) -> Iterator[dict]:
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
        n += 1
        yield rec


def check_start(it: Iterator[dict], mode: str) -> Iterator[dict]:
    for rec in it:
        if mode == "open" and rec.get("start") is None:
            raise RecordError("<input>", None, "start",
                              f"session {rec['session'].get('id')!r} has no start offset, but the schedule is "
                              "open loop (a closed-loop or plain-session input needs no start)")
        yield rec



def chain1(first, it):
    yield first
    yield from it



def feeder(stream_in, put, end, input_error: list, on_bad) -> None:
    try:
        for rec in stream_in:
            if not put(rec):
                return
    except VkError as e:
        input_error.append(e)
        on_bad(e)
    except Exception as e:  # noqa: BLE001 - report as one line
        input_error.append(VkError(f"cannot read the input: {e}"))
        on_bad(e)
    finally:
        end()
