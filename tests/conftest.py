"""Shared fixtures: start real vk processes on 127.0.0.1 with free ports."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


def vk_cmd(name: str) -> list[str]:
    """The command line of a vk command, run with this interpreter (works without the venv on PATH)."""
    module = {"vk-gen": "vk.gen.cli", "vk-schedule": "vk.schedule.cli", "vk-send": "vk.send.cli",
              "vk-eval": "vk.eval.cli", "vk-serve": "vk.serve.cli"}[name]
    return [sys.executable, "-m", module]


class Server:
    """A running vk-serve process; ``url`` is its base URL (``http://127.0.0.1:PORT/v1``)."""

    def __init__(self, *args: str, timeout: float = 30.0):
        self.proc = subprocess.Popen(
            [*vk_cmd("vk-serve"), "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline()  # the server prints its base URL once it accepts connections
        if not line.startswith("http") or time.monotonic() > deadline:
            self.proc.kill()
            raise RuntimeError(f"vk-serve did not start: {line!r} {self.proc.stderr.read()}")
        self.url = line.strip()
        self.base = self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stderr.read() if self.proc.stderr else ""


@pytest.fixture
def serve():
    """Factory: ``serve("--ttft", "0.05")`` starts vk-serve and returns a Server; all are stopped afterwards."""
    started: list[Server] = []

    def start(*args: str) -> Server:
        s = Server(*args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def run_vk(name: str, *args: str, input: bytes | None = None, check: bool = False, timeout: float = 120):
    """Run a vk command as a process; returns CompletedProcess with bytes stdout/stderr."""
    p = subprocess.run([*vk_cmd(name), *args], input=input, capture_output=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{name} {' '.join(args)} exited {p.returncode}: {p.stderr.decode()}")
    return p
