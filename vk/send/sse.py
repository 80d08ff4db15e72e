"""Turn a finished (or failed) exchange into response-record fields: SSE events, usage, text, errors.

This runs once per request, after it ended, so nothing here is on the hot path of reading the socket. Each body
piece carries the arrival time of the read that delivered it; an SSE event's time is that of the piece holding
its terminating blank line.
"""

from __future__ import annotations

import numpy as np
import orjson

from vk.records import EVENT_CONTENT, EVENT_EMPTY, EVENT_REASONING, EVENT_TOOL

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


def _usage(u: dict) -> dict:
    out = {"prompt_tokens": u.get("prompt_tokens"), "completion_tokens": u.get("completion_tokens")}
    ptd = u.get("prompt_tokens_details") or {}
    ctd = u.get("completion_tokens_details") or {}
    out["cached_tokens"] = ptd.get("cached_tokens") if isinstance(ptd, dict) else None
    out["reasoning_tokens"] = ctd.get("reasoning_tokens") if isinstance(ctd, dict) else None
    for k, v in list(out.items()):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            out[k] = None
    return out


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


def parse_stream(chunks, clock, completions: bool) -> dict:
    """Parse an SSE body. Returns a dict with events, usage, finish_reason, text, server id, times (raw
    monotonic), ``error`` when the stream itself reported one, and ``malformed`` naming the first of its malformed
    events (skipped; ``vk.send.answer`` decides what that means for the record)."""
    loads = orjson.loads
    JSONDecodeError = orjson.JSONDecodeError
    ts: list[float] = []
    kinds: list[str] = []
    tokens: list = []
    server_t: list = []
    has_tokens = False
    has_server_t = False
    text_parts: list[str] = []
    reasoning_parts: list[str] = []  # kept for --save-text
    usage = None
    finish = None
    server_id = None
    error = None
    bad = None
    done = False
    malformed = 0
    prev_ct = 0
    t_first_token = t_first_content = t_last_token = None
    wall_off = clock.wall_off + clock.mono0
    for t, data in _split(chunks):
        if data == b"[DONE]":
            done = True
            continue
        try:
            obj = loads(data)
        except JSONDecodeError:
            malformed += 1
            if bad is None:
                bad = f"malformed SSE event #{len(ts) + malformed}: {data[:80].decode('utf-8', 'replace')!r}"
            continue
        if type(obj) is not dict:
            malformed += 1
            if bad is None:
                bad = f"malformed SSE event #{len(ts) + malformed}: not a JSON object"
            continue
        choices = obj.get("choices")
        if choices is None and "error" in obj:
            err = obj["error"]
            msg = err.get("message") if isinstance(err, dict) else err
            error = f"server error in stream: {str(msg)[:300]}"
            continue
        if server_id is None:
            server_id = obj.get("id")
        kind = "e"
        if choices:
            ch = choices[0] if type(choices) is list else None
            if type(ch) is dict:
                if completions:
                    txt = ch.get("text")
                    if txt:
                        kind = "c"
                        text_parts.append(str(txt))
                else:
                    delta = ch.get("delta") or ch.get("message")
                    if type(delta) is dict:
                        txt = delta.get("content")
                        if txt:
                            kind = "c"
                            text_parts.append(txt if type(txt) is str else str(txt))
                        elif rsn := delta.get("reasoning_content") or delta.get("reasoning"):
                            kind = "r"
                            reasoning_parts.append(rsn if type(rsn) is str else str(rsn))
                        elif delta.get("tool_calls"):
                            kind = "t"
                fr = ch.get("finish_reason")
                if fr:
                    finish = fr
        else:
            kind = "u"
        u = obj.get("usage")
        ntok = None
        if type(u) is dict:
            usage = u
            ct = u.get("completion_tokens")
            if type(ct) is int:
                ntok = ct - prev_ct
                prev_ct = ct
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
        "usage": _usage(usage) if isinstance(usage, dict) else None,
        "finish_reason": finish,
        "text": "".join(text_parts),
        "reasoning_text": "".join(reasoning_parts),
        "server_id": server_id,
        "error": error,
        "malformed": None if bad is None else (bad if malformed == 1 else f"{bad} (and {malformed - 1} more)"),
        "done": done,
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
                elif out["reasoning_text"]:
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
