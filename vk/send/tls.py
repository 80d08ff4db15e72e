"""TLS for the raw client: ``ssl.SSLObject`` over memory BIOs on the client's own non-blocking socket.

Why memory BIOs and not ``ssl.SSLSocket`` or an asyncio transport: the raw client reads the socket itself with
``recvmsg`` to get the kernel's receive timestamp of each segment (see ``vk.send.rawhttp``). With memory BIOs the
encrypted bytes still come through that ``recvmsg``, are fed to the ``SSLObject``, and the plaintext it returns
keeps the timestamp of the read that completed its TLS record, so https events are timed exactly like http ones.

``--cacert FILE`` verifies the server against that CA bundle (instead of the system's), ``--insecure`` skips
verification; ALPN offers only ``http/1.1`` (the raw client speaks nothing else) and SNI is the host the request
names (a user ``Host`` header, else the URL's host).
"""

from __future__ import annotations

import asyncio
import socket
import ssl

from vk.errors import VkError


def make_context(cacert: str | None = None, insecure: bool = False, alpn: list[str] | None = ("http/1.1",)):
    """A client ``SSLContext``; a missing or unreadable CA file is one clear error."""
    try:
        ctx = ssl.create_default_context(cafile=cacert)
    except (OSError, ssl.SSLError) as e:
        raise VkError(f"--cacert: cannot load {cacert!r} ({getattr(e, 'strerror', None) or e})") from None
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def sni_host(host: str) -> str:
    """The server name of a ``Host`` header value (``name:port`` or ``[v6]:port``)."""
    host = host.strip()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def describe(e: BaseException) -> str:
    """One line for a TLS failure, with the hint the user needs."""
    if isinstance(e, ssl.SSLCertVerificationError):
        why = e.verify_message or str(e)
        return f"TLS certificate verification failed: {why} (use --cacert FILE, or --insecure)"
    reason = getattr(e, "reason", None) or str(e) or type(e).__name__
    return f"TLS handshake failed: {reason}"


class Tls:
    """The TLS state of one connection."""

    __slots__ = ("obj", "inc", "out")

    def __init__(self, ctx: ssl.SSLContext, server_hostname: str | None):
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname=server_hostname)

    async def handshake(self, loop, sock: socket.socket) -> None:
        """Run the handshake on the non-blocking ``sock`` (before the connection's reader is registered)."""
        obj, inc, out = self.obj, self.inc, self.out
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            if out.pending:
                await loop.sock_sendall(sock, out.read())
            data = await loop.sock_recv(sock, 65536)
            if not data:
                raise ConnectionResetError("connection closed by the server during the TLS handshake")
            inc.write(data)
        if out.pending:
            await loop.sock_sendall(sock, out.read())
        proto = obj.selected_alpn_protocol()
        if proto not in (None, "http/1.1"):
            raise ssl.SSLError(f"the server chose ALPN protocol {proto!r}, not http/1.1")

    def decrypt(self, data: bytes):
        """Feed received bytes; returns the plaintext now complete (maybe b""), or None at close_notify."""
        self.inc.write(data)
        obj = self.obj
        parts = []
        try:
            while True:
                d = obj.read(65536)
                if not d:
                    return b"".join(parts) if parts else None
                parts.append(d)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            return b"".join(parts) if parts else None
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def encrypt(self, data: bytes) -> bytes:
        self.obj.write(data)
        return self.out.read()

    def pending_out(self) -> bytes:
        return self.out.read() if self.out.pending else b""


async def connect_tls(loop, sock: socket.socket, ctx: ssl.SSLContext, server_hostname: str | None,
                      timeout: float | None) -> Tls:
    tls = Tls(ctx, server_hostname)
    if timeout:
        await asyncio.wait_for(tls.handshake(loop, sock), timeout)
    else:
        await tls.handshake(loop, sock)
    return tls
