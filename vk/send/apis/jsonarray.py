"""A streamed JSON array (Gemini's ``streamGenerateContent`` without ``alt=sse``: ``[{...},\\r\\n{...}]``),
framed incrementally: each top-level object is one event, timed by the read that delivered its closing brace.

Only the structural bytes are visited (a regular expression skips the text between them), so the cost is per
brace and quote, not per byte."""

from __future__ import annotations

import re

_STRUCT = re.compile(rb'[{}"\\]')
_OPEN, _CLOSE, _QUOTE, _BACKSLASH = 0x7B, 0x7D, 0x22, 0x5C


def frames(chunks):
    """Yield ``(t, object_bytes)`` for each complete top-level object of the array."""
    buf = bytearray()
    depth = 0
    in_str = False
    start = 0
    pos = 0  # where the scan resumes (may point past the buffer after a trailing backslash)
    for t, piece in chunks:
        buf += piece
        while True:
            m = _STRUCT.search(buf, pos)
            if m is None:
                pos = max(pos, len(buf))
                break
            c = buf[m.start()]
            pos = m.end()
            if in_str:
                if c == _BACKSLASH:
                    pos += 1  # the escaped byte, whatever it is
                elif c == _QUOTE:
                    in_str = False
                continue
            if c == _QUOTE:
                in_str = True
            elif c == _OPEN:
                if depth == 0:
                    start = m.start()
                depth += 1
            elif c == _CLOSE and depth > 0:
                depth -= 1
                if depth == 0:
                    yield t, bytes(buf[start:pos])
        keep = start if depth else min(pos, len(buf))  # drop what is framed; keep the object in progress
        if keep:
            del buf[:keep]
            pos -= keep
            start -= keep if depth else 0
