"""Helpers of vk-send's HTTP tests: scripted answers, a raw-socket server, certificates, and running one
request with each client to check that their records agree."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import orjson
import pytest
from test_send import open_schedule, req, responses, session

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
             "cannot decode", "truncated", "idle timeout", "before any response", "HTTP 4", "HTTP 5", "malformed",
             "TLS handshake failed", "TLS certificate verification failed")
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



def make_cert(d: Path, names=("localhost", "api.internal")) -> tuple[str, str]:
    if not shutil.which("openssl"):
        pytest.skip("no openssl command")
    cert, key = d / "cert.pem", d / "key.pem"
    san = ",".join([f"DNS:{n}" for n in names] + ["IP:127.0.0.1"])
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=localhost", "-addext", f"subjectAltName={san}"],
                   check=True, capture_output=True)
    return str(cert), str(key)

