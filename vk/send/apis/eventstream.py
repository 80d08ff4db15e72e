"""The AWS event-stream binary framing (``application/vnd.amazon.eventstream``: Bedrock's ConverseStream and
InvokeModelWithResponseStream), decoded incrementally from the body pieces as received.

A frame is: total length and headers length (two big-endian uint32), the CRC32 of those 8 bytes, the headers,
the payload, and the CRC32 of everything before it. A frame's time is the receive time of the read that
delivered its last byte, as an SSE event's is. A checksum that does not match ends the stream with an error:
after a corrupt length nothing that follows can be framed.
"""

from __future__ import annotations

import struct
import zlib

_PRELUDE = struct.Struct(">III")
_U16 = struct.Struct(">H")
_FIXED = {0: 0, 1: 0, 2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16}  # value type -> size (0/1: true/false, no bytes)
_INTS = {2: ">b", 3: ">h", 4: ">i", 5: ">q", 8: ">q"}
MAX_FRAME = 16 * 1024 * 1024  # AWS's limit; a bigger length is a corrupt prelude


class FrameError(ValueError):
    """The stream cannot be framed any further (a checksum or length that does not hold)."""


def parse_headers(data: bytes) -> dict:
    """The headers block of a frame as ``{name: value}``."""
    out = {}
    i, n = 0, len(data)
    while i < n:
        ln = data[i]
        name = data[i + 1:i + 1 + ln].decode("utf-8", "replace")
        i += 1 + ln
        typ = data[i]
        i += 1
        if typ in (6, 7):  # bytes, string: uint16 length
            (vl,) = _U16.unpack_from(data, i)
            raw = data[i + 2:i + 2 + vl]
            i += 2 + vl
            out[name] = raw.decode("utf-8", "replace") if typ == 7 else bytes(raw)
        elif typ in _FIXED:
            size = _FIXED[typ]
            if typ == 0 or typ == 1:
                out[name] = typ == 0
            elif typ == 9:
                out[name] = bytes(data[i:i + 16])
            else:
                (out[name],) = struct.unpack_from(_INTS[typ], data, i)
            i += size
        else:
            raise FrameError(f"event-stream header {name!r} has an unknown value type {typ}")
    return out


def frames(chunks):
    """Yield ``(t, (headers, payload))`` for each complete frame; ``(t, FrameError)`` when the framing breaks
    (and nothing after it); ``(t, None)``-free: trailing bytes of an unfinished frame are left (the stream was
    cut short, which the record's other checks report)."""
    buf = bytearray()
    for t, piece in chunks:
        buf += piece
        pos = 0
        while len(buf) - pos >= 12:
            total, hlen, pcrc = _PRELUDE.unpack_from(buf, pos)
            if zlib.crc32(buf[pos:pos + 8]) != pcrc:
                yield t, FrameError("event-stream frame prelude checksum mismatch (corrupt stream)")
                return
            if total > MAX_FRAME or total < 16 + hlen:
                yield t, FrameError(f"event-stream frame length {total} is impossible (corrupt stream)")
                return
            if len(buf) - pos < total:
                break
            end = pos + total
            (mcrc,) = struct.unpack_from(">I", buf, end - 4)
            if zlib.crc32(buf[pos:end - 4]) != mcrc:
                yield t, FrameError("event-stream frame checksum mismatch (corrupt stream)")
                return
            try:
                headers = parse_headers(bytes(buf[pos + 12:pos + 12 + hlen]))
            except (IndexError, struct.error) as e:
                yield t, FrameError(f"event-stream frame headers do not parse ({e})")
                return
            except FrameError as e:
                yield t, e
                return
            yield t, (headers, bytes(buf[pos + 12 + hlen:end - 4]))
            pos = end
        if pos:
            del buf[:pos]
