"""vk-send's HTTP layer against raw-socket servers: what no HTTP stack emits (1xx, bare LF, stale close, BOM, bare
CR) and the answers every policy of vk-send(1) is about (redirects, non-SSE and empty answers, compression,
malformed lines, idle stalls, Host, query strings, IPv6, retries). Each case runs with every client (raw,
aiohttp, httpx) and checks that their records agree on status, tokens and error kind (``http_helpers.agree``).
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import time
import zlib

import orjson
import pytest
from conftest import run_vk
from http_helpers import (
    CLIENTS,
    JSON_ANSWER,
    RawServer,
    agree,
    answer,
    chunk,
    head,
    run_one,
    sse_events,
)
from test_send import _free_port, open_schedule, read_run, req, responses, session

from vk.jsonl import ListWriter
from vk.send import send


def _sse(srv, s, n, h, body, **kw):
    answer(s, sse_events(), **kw)
    return True


def _gz_stream(srv, s, n, h, body):
    z = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    parts = [z.compress(e) + z.flush(zlib.Z_SYNC_FLUSH) for e in sse_events()] + [z.flush()]
    answer(s, parts, extra=("Content-Encoding: gzip",))
    return True


def _json_encoded(coding):
    def script(srv, s, n, h, body):
        if coding == "gzip":
            data = gzip.compress(JSON_ANSWER)
        elif coding == "deflate":
            data = zlib.compress(JSON_ANSWER)
        elif coding == "rawdeflate":
            z = zlib.compressobj(wbits=-zlib.MAX_WBITS)
            data = z.compress(JSON_ANSWER) + z.flush()
        elif coding == "badgzip":
            data = b"\x1f\x8b\x08\x00garbage-not-gzip"
        elif coding == "cutgzip":
            data = gzip.compress(JSON_ANSWER)[:-12]
        else:
            data = JSON_ANSWER
        name = {"rawdeflate": "deflate", "badgzip": "gzip", "cutgzip": "gzip"}.get(coding, coding)
        s.sendall(head(ctype="application/json", length=len(data), extra=(f"Content-Encoding: {name}",)) + data)
        return True

    return script


def _redirect(code):
    def script(srv, s, n, h, body):
        s.sendall(head(f"{code} Moved", ctype="text/html", length=0,
                       extra=(f"Location: https://api.example.test/{code}/v1/chat/completions",)))
        return True

    return script


def _interim(srv, s, n, h, body):
    s.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    time.sleep(0.01)
    s.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
    time.sleep(0.01)
    answer(s, sse_events())
    return True


def _stale(srv, s, n, h, body):
    """Answers the first request of a connection; reads the second and closes without answering."""
    if n == 0:
        answer(s, sse_events())
        return True
    return False


def _stall(srv, s, n, h, body):
    s.sendall(head() + chunk(sse_events()[0]))
    time.sleep(3)
    return False


SCRIPTS = {
    "sse": _sse,
    "interim": _interim,
    "barelf": lambda srv, s, n, h, b: _sse(srv, s, n, h, b, eol=b"\n"),
    "bom": lambda srv, s, n, h, b: answer(s, [b"\xef\xbb\xbf" + sse_events()[0], *sse_events()[1:]]) or True,
    "barecr": lambda srv, s, n, h, b: answer(s, sse_events(nl=b"\r")) or True,
    "crlfsplit": lambda srv, s, n, h, b: answer(s, [p for e in sse_events(nl=b"\r\n") for p in (e[:-1], e[-1:])])
    or True,
    "html": lambda srv, s, n, h, b: answer(s, [b"<html><body>Welcome to nginx!</body></html>"], ctype="text/html")
    or True,
    "empty": lambda srv, s, n, h, b: s.sendall(head(length=0)) or True,
    "onlydone": lambda srv, s, n, h, b: answer(s, [b"data: [DONE]\n\n"]) or True,
    "jsonstream": lambda srv, s, n, h, b: s.sendall(head(ctype="application/json", length=len(JSON_ANSWER))
                                                    + JSON_ANSWER) or True,
    "nochoices": lambda srv, s, n, h, b: s.sendall(head(ctype="application/json", length=2) + b"{}") or True,
    "malformed_finished": lambda srv, s, n, h, b: answer(s, [sse_events()[0], b"data: {broken\n\n",
                                                             *sse_events()[1:]]) or True,
    "malformed_unfinished": lambda srv, s, n, h, b: answer(s, [sse_events()[0], b"data: {broken\n\n",
                                                               sse_events()[1]]) or True,
    "gzstream": _gz_stream,
    "gzjson": _json_encoded("gzip"),
    "deflatejson": _json_encoded("deflate"),
    "rawdeflatejson": _json_encoded("rawdeflate"),
    "brjson": _json_encoded("br"),
    "badgzip": _json_encoded("badgzip"),
    "cutgzip": _json_encoded("cutgzip"),
    "plainjson": _json_encoded("identity"),
    "r301": _redirect(301), "r302": _redirect(302), "r307": _redirect(307), "r308": _redirect(308),
    "stale": _stale,
    "truncated": lambda srv, s, n, h, b: s.sendall(head() + b"".join(chunk(e) for e in sse_events()[:2])) and False,
    "stall": _stall,
}


@pytest.fixture(scope="module")
def raw_server():
    srv = RawServer(SCRIPTS)
    yield srv
    srv.stop()


# ------------------------------------------------------------------------------------------------------------
# raw-socket cases


def test_interim_1xx_responses_are_skipped(raw_server):
    # before: the raw client took "100 Continue" as the answer: a timeout after --timeout with http_status 100
    for r in agree(raw_server.url("interim"), timeout=5):
        assert r["status"] == "ok" and r["http_status"] == 200 and r["events"]["kind"].count("c") == 3


@pytest.mark.parametrize("case", ["barelf", "bom", "barecr", "crlfsplit"])
def test_leniency(raw_server, case):
    # bare LF header endings (raw client timed out), a UTF-8 BOM (the first event was lost), bare CR line ends
    for r in agree(raw_server.url(case), timeout=5):
        assert r["status"] == "ok" and r["events"]["kind"] == "ccceu", r
        assert r["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("code", [301, 302, 307, 308])
@pytest.mark.parametrize("stream", [True, False])
def test_redirects_are_errors_naming_the_location(raw_server, code, stream):
    # before: ok with zero tokens (raw client), followed (aiohttp)
    for r in agree(raw_server.url(f"r{code}"), stream=stream):
        assert r["status"] == "error" and r["http_status"] == code
        assert f"https://api.example.test/{code}/v1/chat/completions" in r["error"]


def test_redirect_met_by_the_model_lookup_or_probe_is_one_line(raw_server):
    # the model lookup meets the redirect (GET .../models): one line, exit 2
    p = run_vk("vk-send", "--api", raw_server.url("r308"), input=orjson.dumps(session("s", [req("a")])) + b"\n")
    err = p.stderr.decode()
    assert p.returncode == 2 and err.count("\n") == 1 and "redirect to https://api.example.test/308/" in err
    # with --model: the probe says it once before the run; every request is then an error record naming it
    p = run_vk("vk-send", "--api", raw_server.url("r301"), "--model", "m",
               input=orjson.dumps(session("s", [req("a"), req("b")])) + b"\n")
    err = p.stderr.decode()
    lines = [ln for ln in err.splitlines() if "redirect" in ln]
    assert len(lines) == 1 and "WARNING" in lines[0] and "redirect to https://api.example.test/301/" in lines[0]
    assert all("redirect" in r["error"] for r in responses(read_run(p.stdout)))


@pytest.mark.parametrize("case,why", [
    ("html", "not text/event-stream"), ("empty", "without any token"), ("onlydone", "without any token"),
    ("jsonstream", "not text/event-stream"),
])
def test_streamed_answers_that_are_not_streams_are_errors(raw_server, case, why):
    # before: status ok, 0 tokens, no error
    for r in agree(raw_server.url(case)):
        assert r["status"] == "error" and why in r["error"], r["error"]


@pytest.mark.parametrize("case,why", [("html", "not JSON"), ("empty", "not JSON"), ("nochoices", "no choices")])
def test_non_streamed_answers_without_choices_are_errors(raw_server, case, why):
    for r in agree(raw_server.url(case), stream=False):
        assert r["status"] == "error" and why in r["error"], r["error"]


@pytest.mark.parametrize("case,stream", [("gzstream", True), ("gzjson", False), ("deflatejson", False),
                                         ("rawdeflatejson", False), ("plainjson", False)])
def test_compressed_answers_are_decoded(raw_server, case, stream):
    # before: aiohttp/httpx read "\x1f\x8b..." as the body: not JSON, or a stream of 0 events recorded ok
    for r in agree(raw_server.url(case), stream=stream):
        assert r["status"] == "ok" and r["usage"]["completion_tokens"] == 3, r["error"]
        assert r["events"]["kind"] == ("ccceu" if stream else "c")
    # vk-send asks for no compression: the request said identity (the server above compressed anyway)
    assert ("accept-encoding", "identity") in raw_server.headers_of(-1)


def test_gzip_stream_events_keep_their_own_times(raw_server):
    r = run_one(raw_server.url("gzstream"), "raw")[0][0]
    t = r["events"]["t"]
    assert r["events"]["kind"] == "ccceu"
    assert all(b - a > 0.001 for a, b in zip(t, t[1:], strict=False)), t  # decoded per piece, not at the end


@pytest.mark.parametrize("case,why", [("brjson", "unsupported Content-Encoding 'br'"),
                                      ("badgzip", "cannot decode the gzip"), ("cutgzip", "truncated")])
def test_undecodable_bodies_are_errors(raw_server, case, why):
    for r in agree(raw_server.url(case), stream=False):
        assert r["status"] == "error" and why in r["error"], r["error"]


def test_truncated_stream_is_an_error(raw_server):
    recs = agree(raw_server.url("truncated"))
    for r in recs:
        assert r["status"] == "error" and "truncated" in r["error"]
    assert recs[0]["events"]["kind"] == "cc"  # the raw client keeps what arrived (aiohttp drops its buffer)


def test_malformed_line_policy(raw_server):
    # a malformed data: line in a stream that finished: ok, counted from the usage, named in "warning"
    for r in agree(raw_server.url("malformed_finished")):
        assert r["status"] == "ok" and r["usage"]["completion_tokens"] == 3
        assert "malformed SSE event #2" in r["warning"] and r["error"] is None
    # ... in a stream that did not finish: an error
    for r in agree(raw_server.url("malformed_unfinished")):
        assert r["status"] == "error" and "malformed" in r["error"] and "did not finish" in r["error"]


def test_idle_timeout(raw_server):
    # before: the request was held for the whole --timeout
    for r in agree(raw_server.url("stall"), idle_timeout=0.3, timeout=30):
        assert r["status"] == "timeout" and "idle timeout" in r["error"]
        assert 0.25 < r["t_done"] - r["t_first_byte"] < 1.5


def test_user_host_header_replaces_the_default(raw_server):
    for client in CLIENTS:
        n = len(raw_server.requests)
        rs, _ = run_one(raw_server.url("sse"), client, headers=["host: api.internal", "User-Agent: me"])
        assert rs[0]["status"] == "ok"
        hs = raw_server.headers_of(n)
        assert [v for k, v in hs if k == "host"] == ["api.internal"], (client, hs)
        assert [v for k, v in hs if k == "user-agent"] == ["me"], (client, hs)


def test_query_string_of_the_api_is_kept(raw_server):
    for client in CLIENTS:
        rs, _ = run_one(raw_server.url("sse") + "?api-version=2024-10-21", client)
        assert rs[0]["status"] == "ok"
        assert raw_server.requests[-1][0] == "/sse/v1/chat/completions?api-version=2024-10-21"


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback")
def test_ipv6_literals_and_names(tmp_path):
    srv = RawServer(SCRIPTS, socket.AF_INET6, "::1")
    try:
        for r in agree(srv.url("sse")):  # http://[::1]:PORT/...: before, aiohttp/httpx dropped the brackets
            assert r["status"] == "ok"
        # a host name that resolves to both families: the raw client tries each address (it was IPv4 only)
        from vk.send.clock import RunClock
        from vk.send.rawhttp import RawClient

        async def connect():
            c = RawClient(asyncio.get_running_loop(), RunClock(), "localhost", srv.port)
            c.addrs = [(socket.AF_INET, ("127.0.0.1", _free_port())), (socket.AF_INET6, ("::1", srv.port, 0, 0))]
            conn = await c._connect(2.0)
            await c.close()
            return conn.sock.family

        assert asyncio.run(connect()) == socket.AF_INET6
    finally:
        srv.stop()


def test_written_request_is_never_resent(raw_server):
    # 13.1: the server reads the second request on the reused connection and closes without answering; the
    # request was written, so it may have been received: an error record, not a silent second POST
    for client in CLIENTS:
        n = len(raw_server.requests)
        rs, recs = run_one(raw_server.url("stale"), client, n=2, think=0.05)
        assert [r["status"] for r in rs] == ["ok", "error"], (client, [r["error"] for r in rs])
        assert "before any response" in rs[1]["error"], (client, rs[1]["error"])
        assert sum(h.startswith(b"POST") for _, h, _ in raw_server.requests[n:]) == 2  # one POST per request
        assert rs[1]["attempts"] == 1 and rs[1]["t_done"] >= rs[1]["t_sent"]
        assert recs[-1]["retried"] == 0


def test_fault_disconnect_no_stream_is_recorded_not_resent(serve):
    # 13.1 with vk-serve: before, 0 of 42 disconnects were recorded and the server saw extra POSTs
    srv = serve("--ttft", "0.002", "--tpot", "0.0005", "--fault-disconnect", "0.1", "--fault-seed", "5",
                "--log-requests")
    reqs = [req("r0", out=4)] + [req(f"r{i}", out=4) for i in range(1, 80)]
    w = ListWriter()
    send(open_schedule([session(f"s{i}", [r]) for i, r in enumerate(reqs)], [i * 0.003 for i in range(80)]),
         api=srv.url, output=w, workers=1, model="vk-sim", stream=False, handle_signals=False, quiet=True)
    log = srv.stop()
    posts = sum("POST" in ln for ln in log.splitlines())
    rs = responses(w.records)
    assert posts == len(rs) == 80, (posts, len(rs))
    errs = [r for r in rs if r["status"] != "ok"]
    assert errs and all(r["attempts"] == 1 for r in rs)
    assert all(r["t_done"] >= r["t_sent"] for r in rs)


def test_stale_keepalive_connection_retry_resets_the_attempt():
    # 11.1: the server closed the idle keep-alive connection; the client had not noticed yet (its loop was busy).
    # The request goes on a fresh connection (nothing was written to the dead one), attempts = 2, and every time
    # of the record is the second attempt's (before: t_done of the failed attempt, t_done < t_sent)
    def script(srv, s, n, h, body):
        answer(s, sse_events())
        time.sleep(0.05)
        return False  # close soon after the answer (no Connection: close said)

    srv = RawServer({"close": script})
    try:
        from vk.send.clock import RunClock
        from vk.send.rawhttp import Exchange, RawClient

        async def go():
            loop = asyncio.get_running_loop()
            c = RawClient(loop, RunClock(), "127.0.0.1", srv.port)
            pool = c.new_pool()
            hd = b"POST /close/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n"
            ex1 = Exchange()
            await c.request(pool, ex1, hd, b"{}", 5, 10)
            assert len(pool.idle) == 1  # kept alive: the answer did not say Connection: close ...
            time.sleep(0.2)  # ... and the server closes it while the loop is busy (the reader has not run)
            ex2 = Exchange()
            await c.request(pool, ex2, hd, b"{}", 5, 10)
            await c.close()
            return ex1, ex2

        ex1, ex2 = asyncio.run(go())
        assert ex1.attempts == 1 and ex1.status == 200
        assert ex2.attempts == 2 and ex2.status == 200 and ex2.error is None
        assert ex2.t_sent <= ex2.t_first_byte <= ex2.t_done
        assert len(srv.requests) == 2 and srv.connections == 2  # the dead connection never got the request
    finally:
        srv.stop()


def test_http2_flag_on_plain_http_records_what_ran(raw_server):
    rs, recs = run_one(raw_server.url("sse"), "raw", http2=True)
    assert recs[0]["client"] == "httpx" and recs[0]["http2"] is True  # before: "httpx-http2"
    assert rs[0]["protocol"] == "HTTP/1.1"  # no h2 without TLS: what ran is on each record


def test_new_response_fields_are_validated():
    from vk import records
    from vk.errors import RecordError

    rec = records.new_response("r", "s", "a", "ok", attempts=2, protocol="HTTP/1.1", warning="malformed SSE event #2")
    records.validate(rec)
    for field, bad in (("attempts", 0), ("attempts", "2"), ("protocol", 1.1), ("warning", ["x"])):
        with pytest.raises(RecordError, match=field):
            records.validate({**rec, field: bad})
