"""Alternative HTTP clients behind the same interface as ``RawClient``: aiohttp and httpx (``--http2``).

Their event times are taken in Python when the library hands a body piece over, i.e. after the client's own
parsing and the loop's backlog: fine at modest concurrency, measurably late when many streams burst at once
(see the bench). They are used for ``--client aiohttp|httpx`` and for ``--http2`` (httpx).

They move bytes only, like the raw client: redirects are not followed, bodies are handed over as received
(``auto_decompress=False``, ``aiter_raw``) and ``vk.send.answer`` decodes and judges them for every client alike.
Timeouts (first byte, total, idle) are vk's own, the same for every client. Neither library re-sends a POST on
its own, so ``attempts`` is always 1 here.
"""

from __future__ import annotations

import asyncio
import time

from vk.send.rawhttp import Exchange

_mono = time.monotonic


class _Base:
    def __init__(self, url: str, headers: dict[str, str], http2: bool = False, ssl_context=None,
                 idle_timeout: float | None = None):
        self.url = url
        self.headers = headers
        self.http2 = http2
        self.ssl_context = ssl_context
        self.idle_timeout = idle_timeout or None
        host = next((v for k, v in headers.items() if k.lower() == "host"), None)
        if host is not None and ssl_context is not None:
            from vk.send.tls import sni_host

            self.sni = sni_host(host)
        else:
            self.sni = None

    def new_pool(self):
        return None

    def release_pool(self, pool) -> None:
        pass

    async def request(self, pool, ex: Exchange, xrid: str, body: bytes, first_byte_timeout, total_timeout,
                      extra_headers: dict | None = None):
        ex.attempts = 1
        loop = asyncio.get_running_loop()
        t0 = _mono()
        task = loop.create_task(self._do(ex, xrid, body, first_byte_timeout, extra_headers))
        fired: list[str] = []
        handles = []

        def stop(why: str) -> None:
            if not task.done() and not fired:
                fired.append(why)
                task.cancel()

        if total_timeout:
            handles.append(loop.call_at(t0 + total_timeout, stop, "total"))
        idle = self.idle_timeout

        def check_idle() -> None:
            last = ex.chunks[-1][0] if ex.chunks else ex.t_first_byte
            now = _mono()
            if last is not None and now - last >= idle:
                stop("idle")
            elif not task.done():
                handles.append(loop.call_at((last if last is not None else now) + idle, check_idle))

        if idle:
            handles.append(loop.call_at(t0 + idle, check_idle))
        try:
            await task
        except asyncio.CancelledError:
            if not fired:
                ex.fail("cancelled", "cancelled: run stopped while the request was in flight")
                ex.t_done = _mono()
                raise
            if fired[0] == "idle":
                ex.fail("timeout", f"no byte for {idle:g} s after the last one (idle timeout)")
            else:
                ex.fail("timeout", f"request not complete within {total_timeout:g} s (timeout)")
        except asyncio.TimeoutError:
            ex.fail("timeout", f"no response byte within {first_byte_timeout:g} s (first-byte timeout)")
        except Exception as e:  # noqa: BLE001 - every failure becomes a record
            ex.fail("error", _describe(e, ex.status is not None))
        finally:
            for h in handles:
                h.cancel()
        if ex.t_done is None:
            ex.t_done = _mono()


def _describe(e: BaseException, answered: bool) -> str:
    import ssl

    from vk.send.tls import describe

    cause = e
    for _ in range(8):  # the TLS error under the library's own wrapper exceptions (which may be SSLErrors too)
        inner = getattr(cause, "certificate_error", None) or getattr(cause, "os_error", None)
        if isinstance(inner, ssl.SSLError):
            cause = inner
            break
        if cause is None or isinstance(cause, ssl.SSLError):
            break
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLError):
        return describe(cause)
    name = type(e).__name__
    text = str(e)
    low = text.lower()
    if "refused" in low:
        return "connection refused"
    if "reset" in low:
        return "connection reset by the server" + (" mid-stream" if answered else " before any response")
    closed = ("disconnected", "without sending", "peer closed", "payload", "transfer", "incomplete", "closed")
    if any(w in low for w in closed):
        if not answered:
            return f"connection closed by the server before any response: {name}: {text[:200]}"
        return f"connection closed mid-stream (truncated response): {name}: {text[:200]}"
    return f"{name}: {text[:300]}" if text else name


class AiohttpClient(_Base):
    name = "aiohttp"

    def __init__(self, url: str, headers: dict[str, str], **kw):
        super().__init__(url, headers, **kw)
        import aiohttp  # noqa: F401 - imported now, not on the first request (that would stall the loop)

        self.session = None  # created inside the running loop

    async def _do(self, ex: Exchange, xrid: str, body: bytes, fbt, extra_headers=None) -> None:
        if self.session is None:
            import aiohttp

            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, force_close=False),
                timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=False,
            )
        h = dict(self.headers)
        h["X-Request-Id"] = xrid
        if extra_headers:
            h.update(extra_headers)
        kw = {}
        if self.ssl_context is not None:
            kw["ssl"] = self.ssl_context
            if self.sni:
                kw["server_hostname"] = self.sni
        ex.t_sent = _mono()
        coro = self.session.post(self.url, data=body, headers=h, allow_redirects=False, **kw)
        resp = await (asyncio.wait_for(coro, fbt) if fbt else coro)
        try:
            ex.t_first_byte = _mono()
            ex.status = resp.status
            ex.protocol = f"HTTP/{resp.version.major}.{resp.version.minor}"
            ex.headers = {k.lower(): v for k, v in resp.headers.items()}
            chunks = ex.chunks
            async for data in resp.content.iter_any():
                chunks.append((_mono(), data))
            ex.t_done = _mono()
        finally:
            resp.release()

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class HttpxClient(_Base):
    name = "httpx"

    def __init__(self, url: str, headers: dict[str, str], **kw):
        super().__init__(url, headers, **kw)
        import httpx

        self.client = httpx.AsyncClient(
            http2=self.http2, timeout=None, follow_redirects=False,
            verify=self.ssl_context if self.ssl_context is not None else True,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        )

    async def _do(self, ex: Exchange, xrid: str, body: bytes, fbt, extra_headers=None) -> None:
        h = dict(self.headers)
        h["X-Request-Id"] = xrid
        if extra_headers:
            h.update(extra_headers)
        ext = {"sni_hostname": self.sni} if self.sni else None
        req = self.client.build_request("POST", self.url, content=body, headers=h, extensions=ext)
        ex.t_sent = _mono()
        coro = self.client.send(req, stream=True)
        resp = await (asyncio.wait_for(coro, fbt) if fbt else coro)
        try:
            ex.t_first_byte = _mono()
            ex.status = resp.status_code
            ex.protocol = resp.http_version
            ex.headers = {k.lower(): v for k, v in resp.headers.items()}
            chunks = ex.chunks
            async for data in resp.aiter_raw():
                chunks.append((_mono(), data))
            ex.t_done = _mono()
        finally:
            await resp.aclose()

    async def close(self) -> None:
        await self.client.aclose()
