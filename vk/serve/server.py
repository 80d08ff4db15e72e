"""vk-serve's entry point: the event loop, the listening socket and the process settings.

The server is a small HTTP/1.1 implementation on asyncio Protocols with uvloop (:mod:`vk.serve.connection`),
request handling and routes in :mod:`vk.serve.app`, streamed and whole responses in :mod:`vk.serve.sinks`, the
two schedulers in :mod:`vk.serve.engine` and :mod:`vk.serve.model`, ``/metrics`` in :mod:`vk.serve.metrics`.
"""

from __future__ import annotations

import asyncio
import gc
import os

from vk.serve.app import App, Options
from vk.serve.connection import Conn

__all__ = ["Options", "serve", "raise_fd_limit", "pin_to_cpu"]


def serve(host: str = "127.0.0.1", port: int = 8000, *, ready=None, **options) -> None:
    """Run vk-serve until interrupted (blocking). Prints the base URL as the first stdout line once listening.

    ``options`` are the fields of :class:`Options` (``ttft``, ``tpot``, ``profile``, ``num_blocks``, ...).
    ``ready(url)``, if given, is called instead of printing.
    """
    unknown = set(options) - set(Options.__dataclass_fields__)
    if unknown:
        raise TypeError(f"serve(): unknown options {sorted(unknown)}")
    opts = Options(host=host, port=port, **options)
    raise_fd_limit()
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        app = App(opts, loop)
        # Long-lived objects (tokenizer, vocabulary tables) leave the cyclic GC's view; fewer, later collections
        # keep pauses out of the step timing.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50000, 50, 100)
        tls = None
        if opts.tls_cert:
            import ssl

            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(opts.tls_cert, opts.tls_key)
        server = loop.run_until_complete(loop.create_server(lambda: Conn(app), host, port, backlog=4096,
                                                            reuse_address=True, ssl=tls))
        bound = server.sockets[0].getsockname()[1]
        url = f"{'https' if tls else 'http'}://{host}:{bound}/v1"
        if ready is not None:
            ready(url)
        else:
            print(url, flush=True)
        stop = loop.create_future()
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                pass
        loop.run_until_complete(stop)
        server.close()
    finally:
        loop.close()
        asyncio.set_event_loop(None)


def raise_fd_limit() -> None:
    """Thousands of concurrent streams need more than the usual 1,024 open files: raise the soft limit."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, 1 << 20), hard))
    except (ImportError, ValueError, OSError):
        pass


def pin_to_cpu(cpu: int) -> None:
    """Pin this process to one core (bench)."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
