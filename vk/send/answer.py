"""What an HTTP answer means for the record: one policy for every client (raw, aiohttp, httpx).

The clients only move bytes: status, headers and the body pieces as received, each with its arrival time. This
module decides, once for all of them:

- ``Content-Encoding``: gzip and deflate are decoded here, piece by piece in arrival order (a decompressor fed
  incrementally), so each decoded piece keeps the time of the read that carried it. vk-send asks for no
  compression (``Accept-Encoding: identity``, since a compressing proxy buffers a stream and the timing would
  measure its compressor) but decodes what a server compresses anyway or what ``-H 'Accept-Encoding: gzip'``
  asked for. Any other coding, or a body that does not decode, is an error record, never ``ok``.
- status: 2xx is an answer; 3xx is an error naming ``Location`` (vk-send never follows redirects: a redirect
  would add a hop to every measured request); 4xx/5xx are errors with the server's message; anything else
  (an unexpected 101) is an error.
- a streamed request must be answered with ``text/event-stream``; a stream that ends without any token, finish
  reason or usage, and a JSON body without choices, are errors that say so.
- malformed SSE events (a ``data:`` line that is not a JSON object): skipped and named in the record's
  ``warning`` when the stream still finished (a finish reason, then usage or ``[DONE]``), since the counts come
  from the usage and only that event's time is lost; an error when the stream did not finish.
"""

from __future__ import annotations

import zlib

from vk.records import STATUS_CANCELLED, STATUS_ERROR, STATUS_OK, STATUS_TIMEOUT
from vk.send.sse import error_body_text, parse_json_body, parse_stream

_KIND = {"timeout": STATUS_TIMEOUT, "cancelled": STATUS_CANCELLED}
_CODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decode_body(chunks: list, encoding: str | None) -> tuple[list, str | None]:
    """``[(t, bytes)]`` decoded per ``Content-Encoding``; returns (pieces, error or None)."""
    codings = [c.strip().lower() for c in (encoding or "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return chunks, None
    if len(codings) > 1 or codings[0] not in _CODINGS:
        return [], f"unsupported Content-Encoding {encoding!r} (vk-send decodes gzip and deflate)"
    coding = codings[0]
    wbits = _CODINGS[coding]
    while True:
        d = zlib.decompressobj(wbits)
        out = []
        try:
            for t, piece in chunks:
                x = d.decompress(piece)
                if x:
                    out.append((t, x))
        except zlib.error as e:
            if coding == "deflate" and wbits > 0 and not out:  # "deflate" sent raw, without the zlib wrapper
                wbits = -zlib.MAX_WBITS
                continue
            return out, f"cannot decode the {coding} response body ({e})"
        if chunks and not d.eof:
            return out, f"the {coding} response body ends before its compressed stream does (truncated)"
        return out, None


def _join(chunks) -> bytes:
    return b"".join(c for _, c in chunks)


def _media_type(ctype: str) -> str:
    return ctype.split(";", 1)[0].strip().lower()


def interpret(ex, stream: bool, completions: bool, clock, adapter=None) -> dict:
    """The record's verdict on a finished exchange: status, error, warning, and the parsed stream/body."""
    status = STATUS_OK
    error = None
    if ex.error_kind is not None:
        status = _KIND.get(ex.error_kind, STATUS_ERROR)
        error = ex.error
    out = {"status": status, "error": error, "warning": None, "parsed": None}
    code = ex.status
    if code is None:
        return out

    def fail(msg: str) -> dict:
        out["status"] = STATUS_ERROR if out["status"] == STATUS_OK else out["status"]
        out["error"] = msg + (f" ({error})" if error else "")
        return out

    h = ex.headers
    chunks, derr = decode_body(ex.chunks, h.get("content-encoding"))
    if code >= 400:
        return fail(f"HTTP {code}: {error_body_text(_join(chunks))}")
    if 300 <= code < 400:
        loc = h.get("location")
        where = f" to {loc}" if loc else " (no Location header)"
        return fail(f"HTTP {code} redirect{where}: vk-send does not follow redirects; point --api at the final URL")
    if not 200 <= code < 300:
        return fail(f"HTTP {code}: unexpected status for a completion request")
    if derr:
        return fail(derr)
    ctype = _media_type(h.get("content-type", ""))
    media = adapter.media_type if adapter is not None else "text/event-stream"
    framing = adapter.framing_for(ctype) if adapter is not None else ("sse" if ctype == media else None)
    if stream:
        if framing is None:
            body = _join(chunks)
            msg = f"streamed request answered with Content-Type {ctype or 'none'!r}, not {media}"
            if ctype.endswith("json") or body[:1] == b"{":
                msg += f" ({error_body_text(body)[:200]}; the server may ignore stream: true: try --no-stream)"
            elif body:
                msg += f": {body[:80].decode('utf-8', 'replace')!r}"
            return fail(msg)
        parsed = parse_stream(chunks, clock, completions, adapter, framing)
    else:
        body = _join(chunks)
        if not body and out["status"] != STATUS_OK:
            return out
        pj = adapter.parse_body(body) if adapter is not None else parse_json_body(body, completions)
        t_last = chunks[-1][0] if chunks else ex.t_done
        tok = pj["kind"] in ("c", "r", "t")
        parsed = {
            "events": {"t": [round(t_last - clock.mono0, 7)], "kind": pj["kind"]},
            "usage": pj["usage"], "finish_reason": pj["finish_reason"], "text": pj["text"],
            "reasoning_text": pj.get("reasoning_text", ""),
            "server_id": pj["server_id"], "error": pj["error"], "malformed": None, "done": True,
            "t_first_token": t_last if tok else None,
            "t_first_content": t_last if pj["kind"] == "c" else None,
            "t_last_token": t_last if tok else None,
        }
    out["parsed"] = parsed
    perr = parsed["error"]
    if stream and perr is None and out["status"] == STATUS_OK:
        finished = parsed["finish_reason"] is not None and (parsed["done"] or parsed["usage"] is not None)
        if parsed["malformed"]:
            if finished:
                out["warning"] = parsed["malformed"]
            else:
                perr = f"{parsed['malformed']}, and the stream did not finish"
        elif parsed["t_first_token"] is None and parsed["finish_reason"] is None and parsed["usage"] is None:
            perr = ("stream ended without any token, finish reason or usage"
                    + (" (only [DONE])" if parsed["done"] else ""))
    elif stream and parsed["malformed"]:
        perr = f"{perr}; {parsed['malformed']}" if perr else parsed["malformed"]
    if perr:
        if out["status"] == STATUS_OK:
            out["status"] = STATUS_ERROR
            out["error"] = perr
        else:
            out["error"] = f"{out['error']}; {perr}"
    return out
