"""vk's AWS event-stream decoder (vk.send.apis.eventstream) against botocore's own: the same frames decoded to
the same headers and payloads, whatever the read boundaries; corrupt frames refused by both; each frame timed
by the read that completed it."""

from __future__ import annotations

import bisect
import itertools
import random
import struct
import uuid
import zlib

import pytest

botocore_eventstream = pytest.importorskip("botocore.eventstream")

from vk.send.apis.eventstream import FrameError, frames  # noqa: E402
from vk.serve.apis.bedrock import encode_frame, event_frame  # noqa: E402


def _header(name: str, typ: int, value: bytes) -> bytes:
    n = name.encode()
    return struct.pack(">B", len(n)) + n + bytes([typ]) + value


def frame_with_every_header_type(payload: bytes) -> bytes:
    """A frame with one header of each value type (vk-serve writes strings only; AWS may send any)."""
    u = uuid.UUID("12345678-1234-5678-1234-567812345678").bytes
    hb = b"".join([
        _header("t", 0, b""), _header("f", 1, b""), _header("b", 2, struct.pack(">b", -3)),
        _header("s", 3, struct.pack(">h", -300)), _header("i", 4, struct.pack(">i", 70000)),
        _header("l", 5, struct.pack(">q", 1 << 40)), _header("by", 6, struct.pack(">H", 3) + b"\x00\x01\x02"),
        _header(":event-type", 7, struct.pack(">H", 8) + b"metadata"),
        _header("ts", 8, struct.pack(">q", 1700000000000)), _header("u", 9, u),
    ])
    total = 16 + len(hb) + len(payload)
    prelude = struct.pack(">II", total, len(hb))
    head = prelude + struct.pack(">I", zlib.crc32(prelude)) + hb + payload
    return head + struct.pack(">I", zlib.crc32(head))


def botocore_decode(data: bytes) -> list[tuple[dict, bytes]]:
    buf = botocore_eventstream.EventStreamBuffer()
    buf.add_data(data)
    return [(m.headers, m.payload) for m in buf]


def stream_frames() -> list[bytes]:
    out = [event_frame("messageStart", {"role": "assistant"})]
    out += [event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": f" w{i}" * (i % 7)}})
            for i in range(40)]
    out.append(event_frame("metadata", {"usage": {"inputTokens": 9, "outputTokens": 40, "totalTokens": 49}}))
    out.append(frame_with_every_header_type(b'{"x": 1}'))
    out.append(encode_frame({":message-type": "exception", ":exception-type": "throttlingException"},
                            b'{"message": "slow down"}'))
    return out


def stream_bytes() -> bytes:
    return b"".join(stream_frames())


def split(data: bytes, rng: random.Random) -> list[tuple[float, bytes]]:
    cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 60)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return [(float(i), p) for i, p in enumerate(pieces)]


def test_frames_decode_as_botocore_decodes_them_at_any_read_boundaries():
    data = stream_bytes()
    want = botocore_decode(data)
    assert len(want) == 44
    rng = random.Random(7)
    for _ in range(50):
        pieces = split(data, rng)
        got = list(frames(pieces))
        assert [(h, p) for _, (h, p) in got] == want
        # each frame's time is that of the read holding its last byte
        read_ends = list(itertools.accumulate(len(p) for _, p in pieces))
        frame_ends = list(itertools.accumulate(len(f) for f in stream_frames()))
        for (t, _), end in zip(got, frame_ends, strict=True):
            assert t == pieces[bisect.bisect_left(read_ends, end)][0]


def test_single_byte_reads():
    data = stream_bytes()
    got = list(frames([(float(i), data[i:i + 1]) for i in range(len(data))]))
    assert [(h, p) for _, (h, p) in got] == botocore_decode(data)


@pytest.mark.parametrize("where", ["prelude", "message"])
def test_a_corrupt_frame_is_refused_by_both(where):
    good = event_frame("contentBlockDelta", {"delta": {"text": "a"}})
    bad = bytearray(event_frame("contentBlockDelta", {"delta": {"text": "b"}}))
    bad[9 if where == "prelude" else len(bad) - 6] ^= 0x40
    data = good + bytes(bad) + good
    with pytest.raises(botocore_eventstream.ChecksumMismatch):
        botocore_decode(data)
    got = list(frames([(0.0, data)]))
    assert len(got) == 2 and isinstance(got[1][1], FrameError)
    assert "checksum" in str(got[1][1])


def test_an_unfinished_frame_yields_nothing():
    f = event_frame("messageStop", {"stopReason": "end_turn"})
    assert list(frames([(0.0, f[:-1])])) == []
