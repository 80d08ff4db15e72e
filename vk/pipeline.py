"""The whole pipeline in one call, from Python: generate -> schedule -> send -> evaluate.

This is the programmatic counterpart of::

    vk-gen CONFIG | vk-schedule --poisson RATE | vk-send --api URL > run.jsonl
    vk-eval run.jsonl

Each stage is still its own library function (``vk.gen.generate``, ``vk.schedule.schedule``, ``vk.send.send``,
``vk.eval.evaluate``); stages pass records (dicts) to each other exactly as the commands pass JSON lines, and the
run's records are written to a file so that they can be re-evaluated later. When no ``api`` is given, a
``vk-serve`` process is started on a free port of 127.0.0.1 for the duration of the run (never in this process:
a simulated server sharing the client's interpreter would distort the client's timing).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vk.errors import VkError


@contextlib.contextmanager
def serving(*args: str, host: str = "127.0.0.1", startup_timeout: float = 60.0) -> Iterator[str]:
    """Start ``vk-serve`` as a subprocess on a free port; yield its base URL (``http://host:port/v1``)."""
    cmd = [sys.executable, "-m", "vk.serve.cli", "--host", host, "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline().strip()  # the first line is the base URL, printed once listening
        if not line.startswith("http"):
            err = proc.stderr.read() if proc.poll() is not None else ""
            raise VkError(f"vk-serve did not start: {err.strip().splitlines()[-1] if err.strip() else line!r}")
        yield line
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_benchmark(
    workload: dict | str | os.PathLike | None = None,
    *,
    api: str | None = None,
    seed: int = 0,
    count: int | None = 100,
    poisson: float | None = None,
    concurrency: int | None = None,
    model: str | None = None,
    output: str | os.PathLike | None = None,
    tokenizer: str | None = None,
    serve_args: Sequence[str] = ("--ttft", "0.05", "--tpot", "0.01"),
    schedule_options: dict[str, Any] | None = None,
    send_options: dict[str, Any] | None = None,
    eval_options: dict[str, Any] | None = None,
    server_cmd: str | Sequence[str] | None = None,
    server_ready_timeout: float | None = None,
):
    """Run generate -> schedule -> send -> evaluate and return vk-eval's result.

    ``workload`` is a vk-gen config (dict or YAML path; None is vk-gen's default workload). Choose the arrival
    process with ``poisson`` (sessions/s) or ``concurrency`` (closed loop), or pass any vk-schedule option in
    ``schedule_options``. ``api`` is the server's base URL; without it a vk-serve process is started with
    ``serve_args``. ``send_options`` are vk.send.send's keyword arguments (``workers`` defaults to 1 here). The
    run's records go to ``output``; without one they go to a temporary directory that is removed once they are
    evaluated (pass ``output`` to keep them).

    ``server_cmd`` starts the server under test for the run (vk.launch: its own process group, output in
    ``<output>.server.log``, ready when /health or /models answers, stopped afterwards; ``{port}`` in it is
    replaced by a free port, which then gives ``api``). The run header's ``server`` field records it.
    """
    from vk.eval import evaluate
    from vk.gen import generate
    from vk.schedule import schedule
    from vk.send import send

    sched_opts = dict(schedule_options or {})
    if poisson is not None:
        sched_opts["poisson"] = poisson
    if concurrency is not None:
        sched_opts["concurrency"] = concurrency
    if not any(k in sched_opts for k in ("poisson", "gamma", "constant", "ramp", "stages", "onoff", "replay",
                                         "concurrency")):
        sched_opts["concurrency"] = 1
    sched_opts.setdefault("seed", seed)

    send_opts = {"workers": 1, **(send_options or {})}  # one worker unless asked: the caller's choice wins

    with contextlib.ExitStack() as files:
        if output is None:
            output = Path(files.enter_context(tempfile.TemporaryDirectory(prefix="vk-run-"))) / "run.jsonl"
        with contextlib.ExitStack() as stack:  # the servers stop before the evaluation
            server_info = None
            if server_cmd is not None:
                from vk.launch import DEFAULT_READY_TIMEOUT, launched

                server = stack.enter_context(launched(
                    server_cmd, api=api, log=f"{output}.server.log",
                    ready_timeout=server_ready_timeout or DEFAULT_READY_TIMEOUT))
                api, server_info = server.api, server.info()
            if api is None:
                extra = ["--tokenizer", tokenizer] if tokenizer else []
                api = stack.enter_context(serving(*serve_args, *extra))
            sessions = generate(workload if workload is not None else {}, seed=seed, count=count,
                                tokenizer=tokenizer)
            scheduled = schedule(sessions, **sched_opts)
            send(scheduled, api=api, output=str(output), model=model, server=server_info, **send_opts)
        return evaluate(str(output), **(eval_options or {}))
