"""Turn a finished (or failed) exchange into response-record fields: SSE events, usage, text, errors.

This runs once per request, after it ended, so nothing here is on the hot path of reading the socket. Each body
piece carries the arrival time of the read that delivered it; an SSE event's time is that of the piece holding
its terminating blank line.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import orjson

from vk.records import EVENT_CONTENT, EVENT_EMPTY, EVENT_REASONING, EVENT_TOOL
from vk.send.apis.base import Acc
from vk.send.apis.openai import Adapter as OpenAIAdapter
from vk.send.apis.openai import openai_usage

BOM = b"\xef\xbb\xbf"


def iter_events(chunks):
    """Yield ``(t, data_bytes)`` for each complete SSE event with a ``data:`` field, then ``(t, None)`` if the
    stream ended inside an event (incomplete trailing bytes). Lines may end in CRLF, LF or a bare CR (the SSE
    specification allows all three); a CRLF split across two pieces counts once."""
    buf = b""
    t = None
    skip_lf = False  # the previous piece ended in CR: a LF starting this one belongs to it
    for t, piece in chunks:
        if skip_lf and piece[:1] == b"\n":
            piece = piece[1:]
        skip_lf = False
        if b"\r" in piece:
            skip_lf = piece[-1:] == b"\r"
            piece = piece.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = buf + piece if buf else piece
        pos = 0
        while True:
            i = buf.find(b"\n\n", pos)
            if i < 0:
                break
            block = buf[pos:i]
            pos = i + 2
            data = _data_of(block)
            if data is not None:
                yield t, data
        buf = buf[pos:] if pos else buf
    if buf.strip():
        data = _data_of(buf.strip())
        if data is not None:
            yield t, data


def _data_of(block: bytes):
    if block.startswith(b"data:") and b"\n" not in block:  # the common case: one data line
        d = block[5:]
        return d[1:] if d.startswith(b" ") else d
    out = []
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            d = line[5:]
            out.append(d[1:] if d.startswith(b" ") else d)
    if not out:
        return None
    return b"\n".join(out)


_usage = openai_usage


def _plain_openai(completions: bool):
    """The OpenAI adapter with default settings (for parsing only)."""
    cfg = SimpleNamespace(endpoint="completions" if completions else "chat", model=None, stream=True,
                          continuous_usage=False)
    return OpenAIAdapter(cfg)


def _split(chunks):
    """``[(t, data)]`` for every SSE event; the common case (one whole single-line event per body piece) is
    handled without the general parser."""
    out = []
    append = out.append
    if chunks and chunks[0][1][:3] == BOM:  # a UTF-8 byte-order mark before the first event
        chunks = [(chunks[0][0], chunks[0][1][3:]), *chunks[1:]]
    for i, (t, piece) in enumerate(chunks):
        if piece[:6] == b"data: " and piece[-2:] == b"\n\n":
            body = piece[6:-2]
            if b"\n" not in body and b"\r" not in body:
                append((t, body))
                continue
        # the general parser from here on (coalesced reads, events split across reads, CRLF, multi-line)
        out.extend(iter_events(chunks[i:]))
        break
    return out


def frames_of(chunks, framing: str):
    """``[(t, payload)]`` of a body in ``framing`` (``sse``; ``eventstream``: AWS's binary frames; ``jsonarray``:
    Gemini's streamed JSON array), each with the receive time of the read that completed it: the one framing
    layer every API style shares."""
    if framing == "eventstream":
        from vk.send.apis.eventstream import frames

        return frames(chunks)
    if framing == "jsonarray":
        from vk.send.apis.jsonarray import frames

        return frames(chunks)
    return _split(chunks)


def parse_stream(chunks, clock, completions: bool, adapter=None, framing: str | None = None) -> dict:
    """Parse a streamed body. Returns a dict with events, usage, finish_reason, text, server id, times (raw
    monotonic), ``error`` when the stream itself reported one, and ``malformed`` naming the first of its malformed
    events (skipped; ``vk.send.answer`` decides what that means for the record). ``adapter`` (vk.send.apis, the
    OpenAI one by default) maps each decoded event to vk's event kinds."""
    if adapter is None:
        adapter = _plain_openai(completions)
    decode = adapter.decode
    on_event = adapter.event
    is_done = adapter.done_marker
    acc = Acc()
    ts: list[float] = []
    kinds: list[str] = []
    tokens: list = []
    server_t: list = []
    has_tokens = False
    has_server_t = False
    bad = None
    malformed = 0
    t_first_token = t_first_content = t_last_token = None
    wall_off = clock.wall_off + clock.mono0
    framing = framing or adapter.framing
    what = "SSE event" if framing == "sse" else {"eventstream": "event-stream frame"}.get(framing, "JSON array object")
    for t, data in frames_of(chunks, framing):
        if isinstance(data, Exception):  # the framing itself broke (a checksum): nothing after it can be read
            acc.error = str(data)
            break
        if is_done(data):
            acc.done = True
            continue
        try:
            obj = decode(data)
        except ValueError:
            malformed += 1
            if bad is None:
                shown = data[:80] if isinstance(data, bytes) else repr(data)[:80].encode()
                bad = f"malformed {what} #{len(ts) + malformed}: {shown.decode('utf-8', 'replace')!r}"
            continue
        if type(obj) is not dict:
            malformed += 1
            if bad is None:
                bad = f"malformed {what} #{len(ts) + malformed}: not a JSON object"
            continue
        kind = on_event(obj, acc)
        if kind is None:
            acc.ntok = None
            continue
        ntok = acc.ntok
        if ntok is not None:
            acc.ntok = None
            if kind != "u":
                has_tokens = True
        st = obj.get("vk_server_time")
        if type(st) is float or type(st) is int:
            has_server_t = True
            st = st - wall_off
        else:
            st = None
        ts.append(t)
        kinds.append(kind)
        tokens.append(ntok)
        server_t.append(st)
        if kind != "e" and kind != "u":
            if t_first_token is None:
                t_first_token = t
            if kind == "c" and t_first_content is None:
                t_first_content = t
            t_last_token = t
    events = {"t": round_times(ts, clock.mono0), "kind": "".join(kinds)}
    if has_tokens:
        events["tokens"] = tokens
    if has_server_t:
        events["server_t"] = [None if x is None else round(x, 7) for x in server_t] if None in server_t \
            else round_times(server_t, 0.0)
    return {
        "events": events,
        "usage": adapter.usage(acc),
        "finish_reason": acc.finish,
        "text": "".join(acc.text),
        "reasoning_text": "".join(acc.reasoning),
        "server_id": acc.server_id,
        "error": acc.error,
        "malformed": None if bad is None else (bad if malformed == 1 else f"{bad} (and {malformed - 1} more)"),
        "done": acc.done,
        "t_first_token": t_first_token,
        "t_first_content": t_first_content,
        "t_last_token": t_last_token,
    }


def round_times(values: list, origin: float) -> list:
    """``round(v - origin, 7)`` for a list of floats (vectorised: 0.1 us resolution keeps the records small)."""
    if len(values) < 8:
        return [round(v - origin, 7) for v in values]
    return np.round(np.asarray(values, dtype=np.float64) - origin, 7).tolist()


def parse_json_body(body: bytes, completions: bool) -> dict:
    """A non-streaming response body."""
    out = {"usage": None, "finish_reason": None, "text": "", "server_id": None, "error": None,
           "kind": EVENT_EMPTY}
    if body[:3] == BOM:
        body = body[3:]
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        out["error"] = f"response body is not JSON: {body[:120].decode('utf-8', 'replace')!r}"
        return out
    if not isinstance(obj, dict):
        out["error"] = "response body is not a JSON object"
        return out
    out["server_id"] = obj.get("id")
    if isinstance(obj.get("usage"), dict):
        out["usage"] = _usage(obj["usage"])
    choices = obj.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        ch = choices[0]
        out["finish_reason"] = ch.get("finish_reason")
        if completions:
            out["text"] = ch.get("text") or ""
        else:
            msg = ch.get("message") or {}
            if isinstance(msg, dict):
                out["text"] = msg.get("content") or ""
                out["reasoning_text"] = str(msg.get("reasoning_content") or msg.get("reasoning") or "")
                if out["text"]:
                    out["kind"] = EVENT_CONTENT
                elif msg.get("reasoning_content") or msg.get("reasoning"):
                    out["kind"] = EVENT_REASONING
                elif msg.get("tool_calls"):
                    out["kind"] = EVENT_TOOL
        if completions and out["text"]:
            out["kind"] = EVENT_CONTENT
    elif "error" in obj:
        err = obj["error"]
        out["error"] = f"server error: {str(err.get('message') if isinstance(err, dict) else err)[:300]}"
    else:
        out["error"] = "response body has no choices"
    return out


def error_body_text(body: bytes) -> str:
    """The message of an HTTP error body (OpenAI-style JSON or plain text), shortened."""
    try:
        obj = orjson.loads(body)
        if isinstance(obj, dict):
            err = obj.get("error", obj)
            if isinstance(err, dict):
                msg = err.get("message") or err.get("detail") or orjson.dumps(err).decode()
            else:
                msg = str(err)
            return str(msg)[:300]
    except orjson.JSONDecodeError:
        pass
    return body[:300].decode("utf-8", "replace").strip()
