"""vk-send's HTTP layer against hostile and odd servers, with every client.

Real HTTP stacks (uvicorn+FastAPI with GZipMiddleware on one route, aiohttp.web, nginx as a reverse proxy with and
without buffering, upstream HTTP/1.0 and 1.1, gzip on) and raw-socket servers for what no stack emits (1xx, bare
LF, stale close, BOM, bare CR). Each case runs with the raw client and aiohttp (and httpx where it applies), checks
each record against the policy of vk-send(1) and checks that the clients' records agree on status, tokens and
error kind.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path

import orjson
import pytest
from conftest import run_vk
from test_send import open_schedule, read_run, req, responses, session

from vk.jsonl import ListWriter
from vk.send import send

CLIENTS = ("raw", "aiohttp", "httpx")

# ------------------------------------------------------------------------------------------------------------
# answers


def sse_events(n=3, finish=True, usage=True, done=True, nl=b"\n") -> list[bytes]:
    evs = [b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"w%d "}}]}' % i for i in range(n)]
    if finish:
        evs.append(b'data: {"id":"x","choices":[{"index":0,"delta":{},"finish_reason":"length"}]}')
    if usage:
        evs.append(b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":%d}}' % n)
    if done:
        evs.append(b"data: [DONE]")
    return [e + nl + nl for e in evs]


JSON_ANSWER = orjson.dumps({"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": "w0 w1 w2"},
                                                    "finish_reason": "length"}],
                            "usage": {"prompt_tokens": 3, "completion_tokens": 3}})


def head(status="200 OK", ctype="text/event-stream", length=None, extra=(), eol=b"\r\n") -> bytes:
    lines = [b"HTTP/1.1 " + status.encode()]
    if ctype:
        lines.append(b"Content-Type: " + ctype.encode())
    lines.append(b"Content-Length: %d" % length if length is not None else b"Transfer-Encoding: chunked")
    lines += [x.encode() for x in extra]
    return eol.join(lines) + eol + eol


def chunk(b: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(b), b) if b else b""


def answer(sock, parts, status="200 OK", ctype="text/event-stream", extra=(), pause=0.002, eol=b"\r\n"):
    """A chunked answer, one chunk per part (with a pause, so that parts arrive in separate reads)."""
    sock.sendall(head(status, ctype, extra=extra, eol=eol))
    for p in parts:
        if p:
            sock.sendall(chunk(p))
            time.sleep(pause)
    sock.sendall(b"0\r\n\r\n")


def outcome(rec) -> tuple:
    """What every client must agree on: status, completion tokens, error kind."""
    err = rec.get("error") or ""
    kinds = ("redirect", "not text/event-stream", "without any token", "no choices", "not JSON", "Content-Encoding",
             "cannot decode", "truncated", "idle timeout", "before any response", "HTTP 4", "HTTP 5", "malformed")
    kind = next((k for k in kinds if k in err), err[:30])
    usage = rec.get("usage") or {}
    return rec["status"], usage.get("completion_tokens"), kind


def run_one(url, client, stream=True, n=1, think=0.0, **kw):
    """One session of ``n`` chained requests; returns (responses, all records)."""
    reqs = [req("r0", out=3)] + [req(f"r{i}", parents=[f"r{i - 1}"], think=think, out=3) for i in range(1, n)]
    w = ListWriter()
    send(open_schedule([session("s", reqs)], [0.0]), api=url, output=w, workers=1, model=kw.pop("model", "m"),
         client=client, stream=stream, handle_signals=False, quiet=True, **kw)
    return responses(w.records), w.records


def agree(url, clients=CLIENTS, **kw) -> list[dict]:
    """The first response of each client; asserts that they agree."""
    recs = [run_one(url, c, **kw)[0][0] for c in clients]
    outs = {c: outcome(r) for c, r in zip(clients, recs, strict=True)}
    assert len(set(outs.values())) == 1, (outs, [r["error"] for r in recs])
    return recs


# ------------------------------------------------------------------------------------------------------------
# a raw-socket server: what no HTTP stack emits


class RawServer:
    """Threaded TCP server on 127.0.0.1 (or ::1); ``script(srv, sock, n, head, body)`` answers the n-th request of
    a connection and returns whether to keep the connection. The case is the first path segment."""

    def __init__(self, scripts: dict, family=socket.AF_INET, host="127.0.0.1", tls: ssl.SSLContext | None = None):
        self.scripts = scripts
        self.requests: list[tuple[str, bytes, bytes]] = []
        self.connections = 0
        self.tls = tls
        self.lsock = socket.socket(family, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((host, 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        self.host = f"[{host}]" if ":" in host else host
        self.socks: list[socket.socket] = []
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, case: str, scheme="http") -> str:
        return f"{scheme}://{self.host}:{self.port}/{case}/v1"

    def _accept(self):
        while not self.stopped:
            try:
                s, _ = self.lsock.accept()
            except OSError:
                return
            self.connections += 1
            self.socks.append(s)
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    def _serve(self, s):
        try:
            if self.tls is not None:
                s = self.tls.wrap_socket(s, server_side=True)
            buf = b""
            n = 0
            while True:
                while b"\r\n\r\n" not in buf:
                    d = s.recv(65536)
                    if not d:
                        return
                    buf += d
                h, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for ln in h.split(b"\r\n")[1:]:
                    k, _, v = ln.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v)
                while len(buf) < length:
                    buf += s.recv(65536)
                body, buf = buf[:length], buf[length:]
                path = h.split(b" ")[1].decode()
                case = path.split("/")[1]
                self.requests.append((path, h, body))
                if not self.scripts[case](self, s, n, h, body):
                    s.close()
                    return
                n += 1
        except (OSError, ssl.SSLError):
            pass
        finally:
            try:
                s.close()
            except OSError:
                pass

    def headers_of(self, i: int) -> list[tuple[str, str]]:
        lines = self.requests[i][1].decode("latin-1").split("\r\n")[1:]
        return [(k.strip().lower(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines)]

    def stop(self):
        self.stopped = True
        self.lsock.close()
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass


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
    clients = CLIENTS if case != "barelf" else ("raw", "httpx")  # aiohttp's parser refuses bare-LF headers
    for r in agree(raw_server.url(case), clients=clients, timeout=5):
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
    assert err.count("WARNING") == 1 and "redirect to https://api.example.test/301/" in err
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
            c.addrs = [(socket.AF_INET, ("127.0.0.1", _closed_port())), (socket.AF_INET6, ("::1", srv.port, 0, 0))]
            conn = await c._connect(2.0)
            await c.close()
            return conn.sock.family

        assert asyncio.run(connect()) == socket.AF_INET6
    finally:
        srv.stop()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def test_written_request_is_never_resent(raw_server):
    # 13.1: the server reads the second request on the reused connection and closes without answering; the
    # request was written, so it may have been received: an error record, not a silent second POST
    for client in CLIENTS:
        n = len(raw_server.requests)
        rs, recs = run_one(raw_server.url("stale"), client, n=2, think=0.05)
        assert [r["status"] for r in rs] == ["ok", "error"], (client, [r["error"] for r in rs])
        assert "before any response" in rs[1]["error"] or "closed" in rs[1]["error"]
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


# ------------------------------------------------------------------------------------------------------------
# https: the raw client over TLS (self-signed certificate, --cacert), SNI, ALPN, kernel timestamps


def make_cert(d: Path, names=("localhost", "api.internal")) -> tuple[str, str]:
    if not shutil.which("openssl"):
        pytest.skip("no openssl command")
    cert, key = d / "cert.pem", d / "key.pem"
    san = ",".join([f"DNS:{n}" for n in names] + ["IP:127.0.0.1"])
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=localhost", "-addext", f"subjectAltName={san}"],
                   check=True, capture_output=True)
    return str(cert), str(key)


def test_https_raw_client_with_cacert_keeps_kernel_timestamps(serve, tmp_path):
    cert, key = make_cert(tmp_path)
    srv = serve("--ttft", "0.02", "--tpot", "0.004", "--server-timestamps", "--tls-cert", cert, "--tls-key", key)
    assert srv.url.startswith("https://")
    sessions = [session(f"s{i}", [req("a", out=20)]) for i in range(20)]
    w = ListWriter()
    end = send(open_schedule(sessions, [i * 0.01 for i in range(20)]), api=srv.url, output=w, workers=1,
               cacert=cert, handle_signals=False, quiet=True)
    run = w.records[0]
    assert run["client"] == "raw" and run["tls"] is True  # before: "raw" was recorded though aiohttp ran
    assert end["kernel_timestamps"] is True
    rs = responses(w.records)
    assert all(r["status"] == "ok" and r["protocol"] == "HTTP/1.1" for r in rs), [r["error"] for r in rs]
    # each event's time against the server's own send time: kernel receive timestamps through TLS
    errs = sorted(t - st for r in rs for t, st in zip(r["events"]["t"], r["events"]["server_t"], strict=True))
    assert len(errs) >= 400 and errs[0] > -0.0005 and errs[int(0.99 * (len(errs) - 1))] < 0.002, errs[-5:]


def test_https_certificate_failures_and_insecure(serve, tmp_path):
    cert, key = make_cert(tmp_path)
    srv = serve("--ttft", "0.001", "--tpot", "0.001", "--tls-cert", cert, "--tls-key", key)
    inp = orjson.dumps(session("s", [req("a")])) + b"\n"
    p = run_vk("vk-send", "--api", srv.url, input=inp)  # the model lookup meets the self-signed certificate
    err = p.stderr.decode()
    assert p.returncode == 2 and "certificate verification failed" in err and "--cacert" in err
    assert "Traceback" not in err and err.count("\n") == 1
    for client in CLIENTS:
        rs, _ = run_one(srv.url, client, model="vk-sim", insecure=True)
        assert rs[0]["status"] == "ok", (client, rs[0]["error"])
    rs, _ = run_one(srv.url.replace("127.0.0.1", "localhost"), "raw", model="vk-sim", cacert=cert)
    assert rs[0]["status"] == "ok"
    p = run_vk("vk-send", "--api", srv.url, "--cacert", str(tmp_path / "missing.pem"), input=inp)
    assert p.returncode == 2 and "missing.pem" in p.stderr.decode()


def test_sni_follows_a_user_host_header_and_alpn_is_http11(tmp_path):
    cert, key = make_cert(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    sni, alpn = [], []
    ctx.sni_callback = lambda sock, name, _ctx: sni.append(name) and None

    def script(srv, s, n, h, body):
        if h.startswith(b"POST"):
            alpn.append(s.selected_alpn_protocol())
        return _sse(srv, s, n, h, body)

    srv = RawServer({"sse": script}, tls=ctx)
    try:
        for client in ("raw", "aiohttp", "httpx"):
            sni.clear()
            alpn.clear()
            rs, recs = run_one(srv.url("sse", "https"), client, cacert=cert, headers=["Host: api.internal"])
            assert rs[0]["status"] == "ok", (client, rs[0]["error"])
            assert sni and set(sni) == {"api.internal"}, (client, sni)  # the probe's too
            if client != "httpx":  # httpx offers h2 too (it speaks it)
                assert alpn == ["http/1.1"], (client, alpn)
            assert rs[0]["protocol"] == "HTTP/1.1"
            assert recs[0]["client"] == client
    finally:
        srv.stop()


def test_http2_flag_on_plain_http_records_what_ran(raw_server):
    rs, recs = run_one(raw_server.url("sse"), "raw", http2=True)
    assert recs[0]["client"] == "httpx" and recs[0]["http2"] is True  # before: "httpx-http2"
    assert rs[0]["protocol"] == "HTTP/1.1"  # no h2 without TLS: what ran is on each record


# ------------------------------------------------------------------------------------------------------------
# real HTTP stacks: aiohttp.web, uvicorn+FastAPI, nginx in front of them


AIOHTTP_APP = '''
import asyncio, sys
from aiohttp import web

EVENTS = {events!r}

async def chat(request):
    body = await request.json()
    kind = request.match_info.get("kind", "sse")
    if kind == "redirect":
        raise web.HTTPPermanentRedirect("https://api.example.test/v1/chat/completions")
    if kind == "html":
        return web.Response(text="<html>hello</html>", content_type="text/html")
    if not body.get("stream"):
        return web.Response(body={json!r}, content_type="application/json")
    resp = web.StreamResponse(headers={{"Content-Type": "text/event-stream"}})
    if kind == "gzip":
        resp.enable_compression(force=web.ContentCoding.gzip)
    await resp.prepare(request)
    for e in EVENTS:
        await resp.write(e)
        await asyncio.sleep(0.003)
    await resp.write_eof()
    return resp

async def models(request):
    return web.json_response({{"data": [{{"id": "m"}}]}})

app = web.Application()
app.router.add_post("/v1/chat/completions", chat)
app.router.add_post("/{{kind}}/v1/chat/completions", chat)
app.router.add_get("/v1/models", models)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=lambda *a: print("ready", flush=True))
'''

FASTAPI_APP = '''
import asyncio, sys
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.middleware.gzip import GZipMiddleware

EVENTS = {events!r}

def make():
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        if not body.get("stream"):
            return Response({json!r}, media_type="application/json")

        async def gen():
            for e in EVENTS:
                yield e
                await asyncio.sleep(0.003)

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models():
        return {{"data": [{{"id": "m"}}]}}

    return app

app = make()
gz = make()  # the same routes, compressed (streams too) for clients that ask: GZipMiddleware on one mount
gz.add_middleware(GZipMiddleware, minimum_size=1, exclude_content_types=())
app.mount("/gz", gz)

@app.post("/redirect/v1/chat/completions")
async def redirect():
    return RedirectResponse("https://api.example.test/v1/chat/completions", status_code=307)

@app.post("/html/v1/chat/completions")
async def html():
    return HTMLResponse("<html>hello</html>")
'''


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def _wait_port(port: int, proc, timeout=30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


class Proc:
    def __init__(self, argv, port, cwd=None):
        self.port = port
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_port(port, self.proc)

    def url(self, prefix=""):
        return f"http://127.0.0.1:{self.port}{prefix}/v1"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _app_source(template: str) -> str:
    return textwrap.dedent(template.format(events=sse_events(), json=JSON_ANSWER))


@pytest.fixture(scope="module")
def aiohttp_web(tmp_path_factory):
    d = tmp_path_factory.mktemp("aioweb")
    (d / "app.py").write_text(_app_source(AIOHTTP_APP))
    port = _free_port()
    p = Proc([sys.executable, str(d / "app.py"), str(port)], port)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def fastapi_app(tmp_path_factory):
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    d = tmp_path_factory.mktemp("fastapi")
    (d / "fapp.py").write_text(_app_source(FASTAPI_APP))
    port = _free_port()
    p = Proc([sys.executable, "-m", "uvicorn", "fapp:app", "--host", "127.0.0.1", "--port", str(port),
              "--log-level", "warning", "--timeout-keep-alive", "1"], port, cwd=d)
    yield p
    p.stop()


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("accept", [None, "gzip"])
def test_aiohttp_web(aiohttp_web, stream, accept):
    hdr = [f"Accept-Encoding: {accept}"] if accept else []
    for prefix in ("", "/gzip"):
        for r in agree(aiohttp_web.url(prefix), stream=stream, headers=hdr):
            assert r["status"] == "ok" and r["usage"]["completion_tokens"] == 3, (prefix, r["error"])
    for r in agree(aiohttp_web.url("/redirect"), stream=stream):
        assert r["status"] == "error" and r["http_status"] == 308 and "https://api.example.test/" in r["error"]
    for r in agree(aiohttp_web.url("/html"), stream=stream):
        assert r["status"] == "error"


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("accept", [None, "gzip"])
def test_uvicorn_fastapi_with_gzip_middleware(fastapi_app, stream, accept):
    hdr = [f"Accept-Encoding: {accept}"] if accept else []
    for prefix in ("", "/gz"):
        for r in agree(fastapi_app.url(prefix), stream=stream, headers=hdr):
            assert r["status"] == "ok" and r["usage"]["completion_tokens"] == 3, (prefix, r["error"])
            if stream:
                assert r["events"]["kind"] == "ccceu"
    for r in agree(fastapi_app.url("/redirect"), stream=stream):
        assert r["status"] == "error" and r["http_status"] == 307 and "https://api.example.test/" in r["error"]
    for r in agree(fastapi_app.url("/html"), stream=stream):
        assert r["status"] == "error"


def test_fastapi_gzip_route_really_compresses(fastapi_app):
    import httpx

    r = httpx.post(fastapi_app.url("/gz") + "/chat/completions", json={"stream": False},
                   headers={"Accept-Encoding": "gzip"})
    assert r.headers.get("content-encoding") == "gzip"


def test_uvicorn_keep_alive_timeout_never_gives_negative_times(fastapi_app):
    # uvicorn closes idle connections after 1 s: think times around it meet closed keep-alive connections
    for client in ("raw", "aiohttp"):
        rs, recs = run_one(fastapi_app.url(), client, n=5, think=0.99)
        bad = [r for r in rs if r["status"] != "ok"]  # a request written as the server closed: said so
        assert all("before any response" in r["error"] for r in bad), (client, [r["error"] for r in bad])
        assert all(r["t_sent"] <= r["t_first_byte"] <= r["t_done"] for r in rs if r["status"] == "ok")
        assert recs[-1]["retried"] == sum(r["attempts"] > 1 for r in rs)


NGINX_CONF = '''
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    proxy_max_temp_file_size 0;
    keepalive_timeout 1s;
    gzip on;
    gzip_types text/event-stream application/json;
    gzip_proxied any;
    gzip_min_length 1;
    upstream aio {{ server 127.0.0.1:{aio}; keepalive 8; }}
    upstream fast {{ server 127.0.0.1:{fast}; keepalive 8; }}
    server {{
        listen 127.0.0.1:{port} default_server;
        server_name _;
        location / {{ return 421 "no such virtual host\\n"; }}
    }}
    server {{
        listen 127.0.0.1:{port};
        server_name api.internal;
        # default buffering, HTTP/1.0 to the upstream (nginx's defaults)
        location /buf/aio/ {{ proxy_pass http://127.0.0.1:{aio}/; }}
        location /buf/fast/ {{ proxy_pass http://127.0.0.1:{fast}/; }}
        # streaming set-up: no buffering, HTTP/1.1 and keep-alive to the upstream
        location /unbuf/aio/ {{ proxy_pass http://aio/; proxy_buffering off; proxy_http_version 1.1;
                               proxy_set_header Connection ""; }}
        location /unbuf/fast/ {{ proxy_pass http://fast/; proxy_buffering off; proxy_http_version 1.1;
                                proxy_set_header Connection ""; }}
    }}
}}
'''


def _nginx_binary():
    for p in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if p and os.access(p, os.X_OK):
            return p
    return None


@pytest.fixture(scope="module")
def nginx(tmp_path_factory, aiohttp_web, fastapi_app):
    exe = _nginx_binary()
    if exe is None:
        pytest.skip("nginx is not installed (.ci/run installs nginx-light)")
    d = tmp_path_factory.mktemp("nginx")
    port = _free_port()
    (d / "nginx.conf").write_text(NGINX_CONF.format(d=d, port=port, aio=aiohttp_web.port, fast=fastapi_app.port))
    conf = str(d / "nginx.conf")
    extra = ["-g", "user root root;"] if os.geteuid() == 0 else []
    p = Proc([exe, "-p", str(d), "-c", conf, *extra], port)
    yield p
    p.stop()


@pytest.mark.parametrize("route", ["buf/aio", "unbuf/aio", "buf/fast", "unbuf/fast", "unbuf/fast/gz"])
@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("accept", [None, "gzip"])
def test_nginx_reverse_proxy(nginx, route, stream, accept):
    hdr = ["Host: api.internal"] + ([f"Accept-Encoding: {accept}"] if accept else [])
    # before: the Host header was sent twice (400 from nginx); gzip on broke every aiohttp/httpx request
    for r in agree(nginx.url("/" + route), stream=stream, headers=hdr):
        assert r["status"] == "ok" and r["usage"]["completion_tokens"] == 3, r["error"]
        if stream:
            assert r["events"]["kind"] == "ccceu"


def test_nginx_virtual_host_needs_the_host_header(nginx):
    for r in agree(nginx.url("/unbuf/aio")):
        assert r["status"] == "error" and r["http_status"] == 421


def test_nginx_unbuffered_stream_keeps_event_times(nginx):
    rs, _ = run_one(nginx.url("/unbuf/aio"), "raw", headers=["Host: api.internal"])
    t = rs[0]["events"]["t"]
    assert t[2] - t[0] > 0.004  # events arrive as the upstream sends them (3 ms apart), not all at the end
