"""vk-send against real HTTP stacks on 127.0.0.1: aiohttp.web, uvicorn+FastAPI (GZipMiddleware on one mount),
and nginx as a reverse proxy in front of both (default buffering with HTTP/1.0 upstream, proxy_buffering off with
HTTP/1.1 keep-alive upstream, gzip on, a virtual host reached by a Host header). Every case with every client,
and the clients' records agree."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import Server
from http_helpers import (
    JSON_ANSWER,
    agree,
    run_one,
    sse_events,
)
from test_send import _free_port

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


class Proc(Server):
    """Another server process (an HTTP stack, nginx), stopped like vk-serve."""

    def __init__(self, argv, port, cwd=None):  # not Server's: that one starts vk-serve
        self.port = port
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_port(port, self.proc)

    def url(self, prefix=""):
        return f"http://127.0.0.1:{self.port}{prefix}/v1"


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


@pytest.mark.parametrize("stack,compressed,redirect", [("aiohttp_web", "/gzip", 308), ("fastapi_app", "/gz", 307)])
@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("accept", [None, "gzip"])
def test_real_stack(request, stack, compressed, redirect, stream, accept):
    # aiohttp.web compresses its /gzip route always; FastAPI's /gz mount (GZipMiddleware) when asked
    srv = request.getfixturevalue(stack)
    hdr = [f"Accept-Encoding: {accept}"] if accept else []
    for prefix in ("", compressed):
        for r in agree(srv.url(prefix), stream=stream, headers=hdr):
            assert r["status"] == "ok" and r["usage"]["completion_tokens"] == 3, (prefix, r["error"])
            if stream:
                assert r["events"]["kind"] == "ccceu"
    for r in agree(srv.url("/redirect"), stream=stream):
        assert r["status"] == "error" and r["http_status"] == redirect and "https://api.example.test/" in r["error"]
    for r in agree(srv.url("/html"), stream=stream):
        assert r["status"] == "error"


def test_fastapi_gzip_route_really_compresses(fastapi_app):
    import httpx

    r = httpx.post(fastapi_app.url("/gz") + "/chat/completions", json={"stream": False},
                   headers={"Accept-Encoding": "gzip"})
    assert r.headers.get("content-encoding") == "gzip"


def test_uvicorn_keep_alive_timeout_never_gives_negative_times(fastapi_app):
    # uvicorn closes idle connections after 1 s: think times around it meet closed keep-alive connections
    for client in ("raw", "aiohttp"):
        rs, recs = run_one(fastapi_app.url(), client, n=4, think=0.99)
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


def test_nginx_gzip_is_really_on(nginx):
    import httpx

    for stream in (True, False):
        r = httpx.post(nginx.url("/unbuf/aio") + "/chat/completions", json={"stream": stream},
                       headers={"Host": "api.internal", "Accept-Encoding": "gzip"})
        assert r.headers.get("content-encoding") == "gzip", (stream, r.headers)

