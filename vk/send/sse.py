"""Turn a finished (or failed) exchange into response-record fields: SSE events, usage, text, errors.

This runs once per request, after it ended, so nothing here is on the hot path of reading the socket. Each body
piece carries the arrival time of the read that delivered it; an SSE event's time is that of the piece holding
its terminating blank line.
"""

from __future__ import annotations

import orjson

from vk.records import EVENT_CONTENT, EVENT_EMPTY, EVENT_REASONING, EVENT_TOOL, EVENT_USAGE


def iter_events(chunks):
    """Yield ``(t, data_bytes)`` for each complete SSE event with a ``data:`` field, then ``(t, None)`` if the
    stream ended inside an event (incomplete trailing bytes)."""
    buf = b""
    t = None
    for t, piece in chunks:
        buf = buf + piece if buf else piece
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")  # a CRLF split across pieces is joined on the next round
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


def parse_stream(chunks, clock, completions: bool) -> dict:
    """Parse an SSE body. Returns a dict with events, usage, finish_reason, text, server id, times (raw
    monotonic), and ``error`` when the stream itself reported one or had malformed events."""
    ts: list[float] = []
    kinds: list[str] = []
    tokens: list = []
    server_t: list = []
    has_tokens = False
    has_server_t = False
    text_parts: list[str] = []
    usage = None
    finish = None
    server_id = None
    error = None
    done = False
    malformed = 0
    prev_ct = 0
    t_first_token = t_first_content = t_last_token = None
    for t, data in iter_events(chunks):
        if data == b"[DONE]":
            done = True
            continue
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            malformed += 1
            if error is None:
                error = f"malformed SSE event #{len(ts) + malformed}: {data[:80].decode('utf-8', 'replace')!r}"
            continue
        if not isinstance(obj, dict):
            malformed += 1
            if error is None:
                error = f"malformed SSE event #{len(ts) + malformed}: not a JSON object"
            continue
        if "error" in obj and not obj.get("choices"):
            err = obj["error"]
            msg = err.get("message") if isinstance(err, dict) else err
            error = f"server error in stream: {str(msg)[:300]}"
            continue
        if server_id is None:
            server_id = obj.get("id")
        choices = obj.get("choices")
        kind = EVENT_EMPTY
        if choices:
            ch = choices[0] if isinstance(choices, list) else None
            if isinstance(ch, dict):
                if completions:
                    txt = ch.get("text")
                    if txt:
                        kind = EVENT_CONTENT
                        text_parts.append(txt)
                else:
                    delta = ch.get("delta") or ch.get("message") or {}
                    if isinstance(delta, dict):
                        txt = delta.get("content")
                        if txt:
                            kind = EVENT_CONTENT
                            text_parts.append(txt)
                        elif delta.get("reasoning_content") or delta.get("reasoning"):
                            kind = EVENT_REASONING
                        elif delta.get("tool_calls"):
                            kind = EVENT_TOOL
                fr = ch.get("finish_reason")
                if fr:
                    finish = fr
        else:
            kind = EVENT_USAGE
        u = obj.get("usage")
        ntok = None
        if isinstance(u, dict):
            usage = u
            ct = u.get("completion_tokens")
            if isinstance(ct, int):
                ntok = ct - prev_ct
                prev_ct = ct
                if kind != EVENT_USAGE:
                    has_tokens = True
        st = obj.get("vk_server_time")
        if isinstance(st, (int, float)):
            has_server_t = True
            st = clock.wall_to_rel(st)
        else:
            st = None
        ts.append(t)
        kinds.append(kind)
        tokens.append(ntok)
        server_t.append(st)
        if kind == EVENT_CONTENT or kind == EVENT_REASONING or kind == EVENT_TOOL:
            if t_first_token is None:
                t_first_token = t
            if kind == EVENT_CONTENT and t_first_content is None:
                t_first_content = t
            t_last_token = t
    mono0 = clock.mono0
    events = {"t": [round(x - mono0, 7) for x in ts], "kind": "".join(kinds)}
    if has_tokens:
        events["tokens"] = tokens
    if has_server_t:
        events["server_t"] = [None if x is None else round(x, 7) for x in server_t]
    return {
        "events": events,
        "usage": _usage(usage) if usage is not None else None,
        "finish_reason": finish,
        "text": "".join(text_parts),
        "server_id": server_id,
        "error": error,
        "done": done,
        "t_first_token": t_first_token,
        "t_first_content": t_first_content,
        "t_last_token": t_last_token,
    }


def parse_json_body(body: bytes, completions: bool) -> dict:
    """A non-streaming response body."""
    out = {"usage": None, "finish_reason": None, "text": "", "server_id": None, "error": None,
           "kind": EVENT_EMPTY}
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
