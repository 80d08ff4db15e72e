"""A minimal HTTP/1.1 streaming client on raw non-blocking sockets, with kernel receive timestamps.

Why not aiohttp: the issue's accuracy target (p99 event-timestamp error < 2 ms with 1,000 streams bursting at
once) cannot be met by taking the time in Python after a read, because the reader is behind by the time it takes
to process everything that arrived before. With ``SO_TIMESTAMPNS`` the kernel stamps each received segment, and
``recvmsg`` hands the stamp over with the bytes, so an event's arrival time is the moment the kernel received it,
however late Python reads it. aiohttp and uvloop transports do not expose ``recvmsg``, so this module reads the
socket itself (``loop.add_reader`` + ``sock.recvmsg``).

The hot path per read is: one ``recvmsg``, the timestamp, and HTTP framing (status line and headers once,
chunked-transfer decoding); the body pieces are kept as ``(time, bytes)`` and parsed as SSE when the request ends
(``vk.send.sse``). The time of an event is the time of the read that delivered its last byte.

Connections are kept alive and reused. A request is retried (on a fresh connection) only when nothing of it can have
reached the server: the reused keep-alive connection it was about to be written to proved closed by the server
(end of stream, reset or unexpected bytes pending before the write, or the write itself failed with nothing
written). A request once written is never sent again: if the connection then closes before any answer, that is an
error record, because the server may have received (and acted on) it. ``Exchange.attempts`` counts the
connections a request was tried on, and every retry resets the whole attempt (times, status, headers, body).

https runs over the same socket through ``vk.send.tls`` (``ssl.SSLObject`` on memory BIOs), so decrypted bytes
keep the kernel receive timestamp of the segment that completed their TLS record.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import struct
import sys
import time

from vk.send.clock import RunClock
from vk.send.tls import Tls, connect_tls, describe

_mono = time.monotonic
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux value (asm-generic)
_SOL_SOCKET = socket.SOL_SOCKET
_ANC = socket.CMSG_SPACE(16)
_TS = struct.Struct("@qq")
_RECV = 65536  # below glibc's mmap threshold: a bigger buffer costs an mmap and page faults per read
_PEEK = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)

# parser states
_IDLE, _HEAD, _CHUNKED, _LENGTH, _UNTIL_CLOSE, _TRAILER = range(6)


class Exchange:
    """One HTTP request and what came back. Times are raw ``time.monotonic`` values (None = not reached)."""

    __slots__ = (
        "status", "headers", "chunks", "t_sent", "t_first_byte", "t_done", "error", "error_kind", "fut",
        "keep_alive", "got_bytes", "attempts", "protocol",
    )

    def __init__(self):
        self.attempts = 0  # connections this request was tried on (see the module's docstring)
        self.fut = None
        self.reset()

    def reset(self) -> None:
        """Forget everything of an attempt (a retry starts from scratch)."""
        self.status = None
        self.headers: dict[str, str] = {}
        self.chunks: list = []  # [(t_monotonic, bytes)] of the body as received (still content-encoded)
        self.t_sent = None
        self.t_first_byte = None
        self.t_done = None
        self.error = None
        self.error_kind = None  # "error" | "timeout" | "cancelled"
        self.keep_alive = True
        self.got_bytes = False
        self.protocol = None  # "HTTP/1.1", "HTTP/1.0", "HTTP/2": what the server answered with

    def fail(self, kind: str, message: str) -> None:
        if self.error is None:
            self.error = message
            self.error_kind = kind


class Conn:
    """One keep-alive HTTP/1.1 connection read through ``add_reader``/``recvmsg`` (optionally TLS)."""

    __slots__ = (
        "loop", "sock", "fd", "clock", "state", "buf", "remaining", "ex", "closed", "reused", "kts", "tls",
        "t_read",
    )

    def __init__(self, loop, sock: socket.socket, clock: RunClock, kts: bool, tls: Tls | None = None):
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.clock = clock
        self.state = _IDLE
        self.buf = b""
        self.remaining = 0
        self.ex: Exchange | None = None
        self.closed = False
        self.reused = False
        self.kts = kts
        self.tls = tls
        self.t_read = 0.0  # monotonic time of the last read (for the idle timeout)
        loop.add_reader(self.fd, self._on_readable)

    # ---------------------------------------------------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.loop.remove_reader(self.fd)
        except Exception:  # noqa: BLE001 - loop closing
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    def usable(self) -> bool:
        """Whether an idle keep-alive connection may take a request: nothing may be pending on it (the reader
        callback may not have run since the server closed it). Nothing is written before this says yes."""
        if self.closed:
            return False
        try:
            if self.tls is None:
                self.sock.recv(1, _PEEK)
                return False  # end of stream (b"") or unexpected bytes: the server is done with it
            data = self.sock.recv(_RECV, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not data:
            return False
        try:  # TLS: session tickets may arrive on an idle connection; application data or close_notify may not
            return self.tls.decrypt(data) == b""
        except ssl.SSLError:
            return False

    def start(self, ex: Exchange) -> None:
        self.ex = ex
        self.state = _HEAD
        self.buf = b""

    def _finish(self) -> None:
        ex = self.ex
        self.ex = None
        self.state = _IDLE
        self.buf = b""
        if ex is None:
            return
        if ex.t_done is None:
            ex.t_done = _mono()
        if not ex.keep_alive:
            self.close()
        fut = ex.fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _abort(self, kind: str, message: str) -> None:
        ex = self.ex
        self.close()
        self.ex = None
        if ex is None:
            return
        ex.t_done = _mono()
        ex.fail(kind, message)
        ex.keep_alive = False
        fut = ex.fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    # ---------------------------------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            data, anc, _flags, _addr = self.sock.recvmsg(_RECV, _ANC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._abort("error", _conn_error_text(e, "reading the response", self))
            return
        t = self.t_read = _mono()
        if anc:
            for lvl, typ, d in anc:
                if typ == SO_TIMESTAMPNS and lvl == _SOL_SOCKET and len(d) >= 16:
                    s, ns = _TS.unpack_from(d)
                    tk = s + ns * 1e-9 - self.clock.wall_off
                    if t - 5.0 < tk <= t:  # sane: not after the read, not from a clock step
                        t = tk
                    break
        if not data:
            self._on_eof()
            return
        if self.tls is not None:
            try:
                data = self.tls.decrypt(data)
            except ssl.SSLError as e:
                self._abort("error", f"TLS error while reading the response: {e.reason or e}")
                return
            if data is None:  # close_notify
                self._on_eof()
                return
            if not data:  # a partial TLS record, or a session ticket
                return
        ex = self.ex
        if ex is None:  # unexpected bytes on an idle connection: drop it
            self.close()
            return
        if not ex.got_bytes:
            ex.got_bytes = True
            ex.t_first_byte = t
        state = self.state
        if state == _CHUNKED:
            self._chunked(t, data)
        elif state == _LENGTH:
            self._length(t, data)
        elif state == _UNTIL_CLOSE:
            ex.chunks.append((t, data))
        elif state == _HEAD:
            self._head(t, data)
        elif state == _TRAILER:
            self._trailer(data)

    def _on_eof(self) -> None:
        ex = self.ex
        if ex is None:
            self.close()
            return
        if self.state == _UNTIL_CLOSE:
            ex.keep_alive = False
            self.close()
            self._finish()
            return
        if self.state == _HEAD and not ex.got_bytes:
            self._abort("error", _closed_before_response(self))
        elif self.state == _HEAD:
            self._abort("error", "connection closed in the middle of the response headers")
        else:
            self._abort("error", "connection closed mid-stream (truncated response)")

    def _head(self, t: float, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        i = buf.find(b"\r\n\r\n")
        sep = 4
        j = buf.find(b"\n\n")  # servers that end header lines with a bare LF (RFC 9112 section 2.2 allows it)
        if j >= 0 and (i < 0 or j < i):
            i, sep = j, 2
        if i < 0:
            if len(buf) > 65536:
                self._abort("error", "response headers larger than 64 KiB")
                return
            self.buf = buf
            return
        ex = self.ex
        lines = buf[:i].decode("latin-1").split("\n")
        parts = lines[0].rstrip("\r").split(" ", 2)
        try:
            ex.status = int(parts[1])
            if not parts[0].startswith("HTTP/"):
                raise ValueError
        except (IndexError, ValueError):
            self._abort("error", f"not an HTTP response: {lines[0][:80]!r}")
            return
        rest = buf[i + sep:]
        if 100 <= ex.status < 200 and ex.status != 101:
            # an interim response (100 Continue, 103 Early Hints): skipped, the final one follows (RFC 9110 15.2)
            ex.status = None
            ex.t_first_byte = None
            self.buf = b""
            if rest:
                ex.t_first_byte = t
                self._head(t, rest)
            return
        if ex.t_first_byte is None:
            ex.t_first_byte = t
        ex.protocol = parts[0]
        h = ex.headers
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            h[k.strip().lower()] = v.strip()
        if parts[0] == "HTTP/1.0" or h.get("connection", "").lower() == "close":
            ex.keep_alive = False
        self.buf = b""
        if "chunked" in h.get("transfer-encoding", "").lower():
            self.state = _CHUNKED
            self.remaining = 0
            if rest:
                self._chunked(t, rest)
        elif "content-length" in h:
            try:
                self.remaining = int(h["content-length"])
                if self.remaining < 0:
                    raise ValueError
            except ValueError:
                self._abort("error", f"bad Content-Length {h['content-length']!r}")
                return
            self.state = _LENGTH
            if self.remaining == 0:
                self._finish()
            elif rest:
                self._length(t, rest)
        elif ex.status == 204 or ex.status == 304:
            self._finish()  # no body by definition
        else:
            self.state = _UNTIL_CLOSE
            ex.keep_alive = False
            if rest:
                ex.chunks.append((t, rest))

    def _length(self, t: float, data: bytes) -> None:
        n = len(data)
        if n >= self.remaining:
            data = data[: self.remaining]
            self.remaining = 0
            self.ex.chunks.append((t, data))
            self._finish()
        else:
            self.remaining -= n
            self.ex.chunks.append((t, data))

    def _chunked(self, t: float, data: bytes) -> None:
        if not self.buf and self.remaining == 0:
            # fast path: the read holds exactly one whole chunk (one SSE event), the common case when streaming
            i = data.find(b"\r\n", 0, 12)
            if i > 0:
                try:
                    size = int(data[:i], 16)
                except ValueError:
                    size = -1
                end = i + 2 + size
                if size > 0 and len(data) == end + 2 and data.endswith(b"\r\n"):
                    self.ex.chunks.append((t, data[i + 2:end]))
                    return
        buf = self.buf + data if self.buf else data
        pos = 0
        n = len(buf)
        out = []
        rem = self.remaining
        while True:
            if rem > 0:
                take = n - pos
                if take >= rem:
                    out.append(buf[pos:pos + rem])
                    pos += rem
                    rem = -2
                else:
                    if take:
                        out.append(buf[pos:])
                    rem -= take
                    pos = n
                    break
            if rem == -2:  # CRLF after a chunk's data
                if n - pos < 2:
                    break
                pos += 2
                rem = 0
            i = buf.find(b"\r\n", pos)
            if i < 0:
                if n - pos > 1024:
                    self._abort("error", "malformed chunked encoding (chunk-size line too long)")
                    return
                break
            try:
                size = int(buf[pos:i].split(b";", 1)[0], 16)
            except ValueError:
                self._abort("error", f"malformed chunked encoding ({bytes(buf[pos:i][:40])!r})")
                return
            pos = i + 2
            if size == 0:
                self.remaining = 0
                if out:
                    self.ex.chunks.append((t, b"".join(out)))
                self.state = _TRAILER
                self.buf = b""
                self._trailer(buf[pos:])
                return
            rem = size
        self.remaining = rem
        self.buf = buf[pos:] if pos < n else b""
        if out:
            self.ex.chunks.append((t, out[0] if len(out) == 1 else b"".join(out)))

    def _trailer(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if buf.startswith(b"\r\n") or b"\r\n\r\n" in buf:
            self._finish()
        else:
            self.buf = buf


def _closed_before_response(c: Conn) -> str:
    if c.reused:
        return ("connection closed by the server before any response (the request was written to a reused "
                "keep-alive connection; not retried, since the server may have received it)")
    return "connection closed by the server before any response"


def _conn_error_text(e: OSError, doing: str, c: Conn | None = None) -> str:
    if e.errno == errno.ECONNREFUSED:
        return "connection refused"
    if e.errno == errno.ECONNRESET:
        if c is not None and c.ex is not None and not c.ex.got_bytes:
            return _closed_before_response(c).replace("closed", "reset", 1)
        return f"connection reset by the server while {doing}"
    if e.errno == errno.EMFILE or e.errno == errno.ENFILE:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return f"too many open files (limit {soft}): raise it with 'ulimit -n'"
    if e.errno == errno.EPIPE:
        return f"connection closed by the server while {doing}"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve the host name ({e.strerror or e})"
    return f"{e.strerror or type(e).__name__} while {doing}"


class Pool:
    """Idle keep-alive connections of one session (so a session stays on its connection)."""

    __slots__ = ("idle",)

    def __init__(self):
        self.idle: list[Conn] = []


class _Unsent(Exception):
    """The write failed before any byte of the request was accepted: safe to retry on a fresh connection."""


class RawClient:
    """HTTP/1.1 over TCP (or TLS), one request per connection at a time, kernel receive timestamps."""

    name = "raw"

    def __init__(self, loop, clock: RunClock, host: str, port: int, kernel_timestamps: bool = True,
                 shared_idle: int = 256, ssl_context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, idle_timeout: float | None = None):
        self.loop = loop
        self.clock = clock
        self.host = host
        self.port = port
        self.kts = kernel_timestamps and sys.platform.startswith("linux")  # SO_TIMESTAMPNS = 35 is Linux's
        self.shared: list[Conn] = []
        self.shared_max = shared_idle
        self.all: set[Conn] = set()
        self.kts_ok = None  # whether the kernel gave us timestamps (set after first connect)
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname or host
        self.idle_timeout = idle_timeout or None
        self.addrs: list | None = None  # getaddrinfo's answer, resolved once per run

    def new_pool(self) -> Pool:
        return Pool()

    def release_pool(self, pool: Pool) -> None:
        """A session ended: hand its idle connections to the worker's shared list (or close them)."""
        for c in pool.idle:
            if not c.closed and len(self.shared) < self.shared_max:
                self.shared.append(c)
            else:
                self._drop(c)
        pool.idle = []

    def _drop(self, c: Conn) -> None:
        c.close()
        self.all.discard(c)

    async def _resolve(self) -> list:
        if self.addrs is None:
            infos = await self.loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            if not infos:
                raise socket.gaierror(socket.EAI_NONAME, f"no address for {self.host}")
            self.addrs = [(fam, addr) for fam, _t, _p, _c, addr in infos]
        return self.addrs

    async def _connect(self, timeout: float | None) -> Conn:
        last: OSError | None = None
        for fam, addr in await self._resolve():  # every address in turn (IPv6 and IPv4)
            sock = socket.socket(fam, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.kts:
                    try:
                        sock.setsockopt(_SOL_SOCKET, SO_TIMESTAMPNS, 1)
                        self.kts_ok = True
                    except OSError:
                        self.kts_ok = False
                if timeout:
                    await asyncio.wait_for(self.loop.sock_connect(sock, addr), timeout)
                else:
                    await self.loop.sock_connect(sock, addr)
            except OSError as e:
                sock.close()
                last = e
                continue
            except BaseException:
                sock.close()
                raise
            tls = None
            if self.ssl_context is not None:
                try:
                    tls = await connect_tls(self.loop, sock, self.ssl_context, self.server_hostname, timeout)
                except BaseException:
                    sock.close()
                    raise
            c = Conn(self.loop, sock, self.clock, self.kts, tls)
            self.all.add(c)
            return c
        raise last if last is not None else OSError(errno.EHOSTUNREACH, "no address to connect to")

    def _take(self, pool: Pool) -> tuple[Conn | None, int]:
        """An idle connection that may take a request, and how many dead ones were found on the way."""
        dead = 0
        for lst in (pool.idle, self.shared):
            while lst:
                c = lst.pop()
                if c.closed:
                    self.all.discard(c)
                    continue
                if c.usable():
                    return c, dead
                dead += 1
                self._drop(c)
        return None, dead

    def _send(self, c: Conn, data: bytes):
        """Write what the socket takes now; returns the rest (or raises ``_Unsent`` when nothing was written)."""
        if c.tls is not None:
            data = c.tls.encrypt(data)
        try:
            n = c.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            if e.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                raise _Unsent(e) from None
            raise
        return data[n:] if n < len(data) else None

    async def request(self, pool: Pool, ex: Exchange, head: bytes, body: bytes,
                      first_byte_timeout: float | None, total_timeout: float | None) -> None:
        """Send one request and wait for the whole response; fills ``ex`` (never raises but CancelledError)."""
        loop = self.loop
        t0 = _mono()
        reuse = True
        while True:
            c = None
            if reuse:
                c, dead = self._take(pool)
                if dead:  # a keep-alive connection found closed: a try on which nothing was written
                    ex.attempts += 1
            if c is None:
                try:
                    c = await self._connect(first_byte_timeout)
                except asyncio.TimeoutError:
                    ex.fail("timeout", f"connect timed out after {first_byte_timeout:g} s")
                except (ssl.SSLError, ssl.CertificateError) as e:
                    ex.fail("error", describe(e))
                except OSError as e:
                    ex.fail("error", _conn_error_text(e, "connecting"))
                if c is None:
                    ex.attempts += 1
                    ex.t_done = _mono()
                    return
            else:
                c.reused = True
            ex.attempts += 1
            fut = loop.create_future()
            ex.fut = fut
            c.start(ex)
            data = head + body
            try:
                t_before = _mono()  # the kernel has the bytes from here on (loopback may answer within send())
                rest = self._send(c, data)
                if rest is not None:
                    await loop.sock_sendall(c.sock, rest)
                    t_before = _mono()
            except _Unsent as e:
                c.ex = None
                self._drop(c)
                if c.reused:  # nothing of the request reached the server: try it on a fresh connection
                    ex.reset()
                    reuse = False
                    continue
                ex.fail("error", _conn_error_text(e.args[0], "sending the request"))
                ex.t_done = _mono()
                return
            except OSError as e:
                c.ex = None
                self._drop(c)
                ex.fail("error", _conn_error_text(e, "sending the request"))
                ex.t_done = _mono()
                return
            except asyncio.CancelledError:
                c.ex = None
                self._drop(c)
                raise
            ex.t_sent = t_before
            timers = []
            if first_byte_timeout:
                timers.append(loop.call_at(ex.t_sent + first_byte_timeout, _first_byte_timeout, c, ex,
                                           first_byte_timeout))
            if total_timeout:
                timers.append(loop.call_at(t0 + total_timeout, _total_timeout, c, ex, total_timeout))
            if self.idle_timeout:
                timers.append(_IdleWatch(loop, c, ex, self.idle_timeout))
            try:
                await fut
            except asyncio.CancelledError:
                c.ex = None
                self._drop(c)
                ex.fail("cancelled", "cancelled: run stopped while the request was in flight")
                ex.t_done = _mono()
                raise
            finally:
                for h in timers:
                    h.cancel()
            if c.closed:
                self.all.discard(c)
            else:
                pool.idle.append(c)
            return

    async def close(self) -> None:
        for c in list(self.all):
            c.close()
        self.all.clear()
        self.shared.clear()


class _IdleWatch:
    """The idle timeout: fails the request when no byte arrived for ``s`` seconds after the first one. One timer,
    moved on lazily (no work per read beyond the ``t_read`` store)."""

    __slots__ = ("loop", "c", "ex", "s", "handle")

    def __init__(self, loop, c: Conn, ex: Exchange, s: float):
        self.loop, self.c, self.ex, self.s = loop, c, ex, s
        self.handle = loop.call_at(_mono() + s, self._check)

    def _check(self) -> None:
        c, ex = self.c, self.ex
        if c.ex is not ex:
            return
        now = _mono()
        if ex.got_bytes and now - c.t_read >= self.s:
            c._abort("timeout", f"no byte for {self.s:g} s after the last one (idle timeout)")
            return
        self.handle = self.loop.call_at((c.t_read if ex.got_bytes else now) + self.s, self._check)

    def cancel(self) -> None:
        self.handle.cancel()


def _first_byte_timeout(c: Conn, ex: Exchange, s: float) -> None:
    if c.ex is ex and not ex.got_bytes:
        c._abort("timeout", f"no response byte within {s:g} s (first-byte timeout)")


def _total_timeout(c: Conn, ex: Exchange, s: float) -> None:
    if c.ex is ex:
        c._abort("timeout", f"request not complete within {s:g} s (timeout)")
