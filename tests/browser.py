"""Open a page in headless Chromium and drive it over the DevTools protocol (aiohttp's websocket client).

Used by tests/test_reports.py: console errors and exceptions, the network requests the page made, each chart's
rectangle, and a screenshot of each chart (PNG bytes)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Page:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.ids = itertools.count(1)
        self.events: list[dict] = []
        self.pending: dict[int, asyncio.Future] = {}
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = msg.json()
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            else:
                self.events.append(data)

    async def call(self, method: str, **params) -> dict:
        i = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.pending[i] = fut
        await self.ws.send_json({"id": i, "method": method, "params": params})
        res = await asyncio.wait_for(fut, 60)
        if "error" in res:
            raise RuntimeError(f"{method}: {res['error']}")
        return res.get("result", {})

    async def wait_event(self, method: str, timeout: float = 60) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for e in self.events:
                if e.get("method") == method:
                    return e
            await asyncio.sleep(0.05)
        raise TimeoutError(method)

    async def js(self, expr: str):
        res = await self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expr}: {res['exceptionDetails']}")
        return res["result"].get("value")


async def _inspect(port: int, url: str, selector: str) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.put(f"http://127.0.0.1:{port}/json/new?about:blank") as r:
            target = await r.json()
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = Page(ws)
            for domain in ("Runtime", "Log", "Page", "Network"):
                await page.call(f"{domain}.enable")
            await page.call("Emulation.setDeviceMetricsOverride", width=1300, height=900, deviceScaleFactor=1,
                            mobile=False)
            await page.call("Page.navigate", url=url)
            await page.wait_event("Page.loadEventFired")
            await asyncio.sleep(1.0)  # plotly draws on load; let it settle
            rects = await page.js(
                f"Array.from(document.querySelectorAll({selector!r})).map(e => {{"
                "const r = e.getBoundingClientRect(); return {x: r.left + window.scrollX, y: r.top + window.scrollY,"
                " width: r.width, height: r.height, svg: e.querySelectorAll('.main-svg').length,"
                " traces: (e.data || []).length}; })")
            shots = []
            for r in rects:
                res = await page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                                      clip={"x": r["x"], "y": r["y"], "width": r["width"], "height": r["height"],
                                            "scale": 1})
                shots.append(base64.b64decode(res["data"]))
            page.reader.cancel()
    errors = []
    requests = []
    for e in page.events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.exceptionThrown":
            errors.append(str(p.get("exceptionDetails")))
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            errors.append(str(p.get("args")))
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            errors.append(str(p["entry"]))
        elif m == "Network.requestWillBeSent":
            requests.append(p["request"]["url"])
    return {"errors": errors, "requests": requests, "charts": rects, "screenshots": shots}


def inspect_page(path: str | Path, selector: str = ".js-plotly-plot") -> dict:
    """Open ``path`` in headless Chromium; returns errors, network requests, chart rectangles and screenshots."""
    exe = chromium()
    assert exe, "no chromium"
    profile = tempfile.mkdtemp(prefix="vk-chromium-")
    proc = subprocess.Popen([exe, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
                             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                             f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        end = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > end or proc.poll() is not None:
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        return asyncio.run(_inspect(port, Path(path).resolve().as_uri(), selector))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
