"""Alternative HTTP clients behind the same interface as ``RawClient``: aiohttp and httpx (``--http2``, https).

Their event times are taken in Python when the library hands a body piece over, i.e. after the client's own
parsing and the loop's backlog: fine at modest concurrency, measurably late when many streams burst at once
(see the bench). They are used for ``--client aiohttp``, for ``--http2`` (httpx) and for https URLs.
"""

from __future__ import annotations

import asyncio
import time

from vk.send.rawhttp import Exchange

_mono = time.monotonic


class _Base:
    def __init__(self, url: str, headers: dict[str, str]):
        self.url = url
        self.headers = headers

    def new_pool(self):
        return None

    def release_pool(self, pool) -> None:
        pass

    async def request(self, pool, ex: Exchange, xrid: str, body: bytes, first_byte_timeout, total_timeout):
        t0 = _mono()
        try:
            if total_timeout:
                await asyncio.wait_for(self._do(ex, xrid, body, first_byte_timeout), total_timeout)
            else:
                await self._do(ex, xrid, body, first_byte_timeout)
        except asyncio.TimeoutError:
            if ex.t_first_byte is None and first_byte_timeout and _mono() - t0 >= first_byte_timeout - 1e-3:
                ex.fail("timeout", f"no response byte within {first_byte_timeout:g} s (first-byte timeout)")
            else:
                ex.fail("timeout", f"request not complete within {total_timeout:g} s (timeout)")
        except asyncio.CancelledError:
            ex.fail("cancelled", "cancelled: run stopped while the request was in flight")
            ex.t_done = _mono()
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a record
            ex.fail("error", _describe(e))
        if ex.t_done is None:
            ex.t_done = _mono()


def _describe(e: BaseException) -> str:
    name = type(e).__name__
    text = str(e)
    low = text.lower()
    if "refused" in low:
        return "connection refused"
    if "reset" in low:
        return "connection reset by the server"
    if "payload" in low or "transfer" in low or "incomplete" in low or "closed" in low:
        return f"connection closed mid-stream (truncated response): {name}: {text[:200]}"
    return f"{name}: {text[:300]}" if text else name


class AiohttpClient(_Base):
    name = "aiohttp"

    def __init__(self, url: str, headers: dict[str, str]):
        super().__init__(url, headers)
        import aiohttp  # noqa: F401 - imported now, not on the first request (that would stall the loop)

        self.session = None  # created inside the running loop

    async def _do(self, ex: Exchange, xrid: str, body: bytes, fbt) -> None:
        if self.session is None:
            import aiohttp

            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, force_close=False),
                timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=False,
            )
        h = dict(self.headers)
        h["X-Request-Id"] = xrid
        ex.t_sent = _mono()
        coro = self.session.post(self.url, data=body, headers=h)
        resp = await (asyncio.wait_for(coro, fbt) if fbt else coro)
        try:
            ex.t_first_byte = _mono()
            ex.status = resp.status
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

    def __init__(self, url: str, headers: dict[str, str], http2: bool = False):
        super().__init__(url, headers)
        import httpx

        self.client = httpx.AsyncClient(
            http2=http2, timeout=None,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        )

    async def _do(self, ex: Exchange, xrid: str, body: bytes, fbt) -> None:
        h = dict(self.headers)
        h["X-Request-Id"] = xrid
        req = self.client.build_request("POST", self.url, content=body, headers=h)
        ex.t_sent = _mono()
        coro = self.client.send(req, stream=True)
        resp = await (asyncio.wait_for(coro, fbt) if fbt else coro)
        try:
            ex.t_first_byte = _mono()
            ex.status = resp.status_code
            ex.headers = {k.lower(): v for k, v in resp.headers.items()}
            chunks = ex.chunks
            async for data in resp.aiter_raw():
                chunks.append((_mono(), data))
            ex.t_done = _mono()
        finally:
            await resp.aclose()

    async def close(self) -> None:
        await self.client.aclose()
