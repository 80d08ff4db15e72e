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



def steady_pace(times: list[float], step: float) -> float:
    """The pace of a stream of write times (vk-serve's --server-timestamps) that should be ``step`` apart, robust
    to writes the OS delayed: vk-serve keeps an absolute schedule (token k at t0 + k * step), so on a busy machine
    a stalled write is late and the next ones catch up, while the others are on their planned times. The median
    offset from that schedule over the second half of the stream, against the first half's, moved over the
    distance between the halves: exact while fewer than half the writes of each half are late; a server that
    keeps a wrong pace is off by it however the machine is loaded."""
    n = len(times)
    h = n // 2
    off = [t - k * step for k, t in enumerate(times)]
    first, second = sorted(off[:h]), sorted(off[n - h:])
    return step + (second[h // 2] - first[h // 2]) / (n - h)


# -- the suite's shape under pytest-xdist ---------------------------------------------------------------------------

# The slowest tests, measured (make test prints --durations): run first, so that under `-n auto` the two workers
# are not left with one long test each at the end. Node id prefixes, slowest first (seconds on the shared 2-core
# machine at load average 10, 2026-12-01: about twice a quiet machine's).
SLOW_FIRST = (
    "tests/test_sweep.py::test_search_agrees_with_a_dense_grid_on_the_engine_model",  # 106 s
    "tests/test_tokenizer_families.py::test_templated_lengths_are_exact_under_real_chat_templates",  # up to 47 s
    "tests/test_tokenizer_families.py::test_every_trace_flavor_is_exact",  # 7 cases, 9-21 s each
    "tests/test_send_faults.py::test_kill_one_worker_is_noticed_recorded_and_counted",  # 47 + 9 s
    "tests/test_sweep.py::test_grid_resume_rescore_and_overlay",  # 42 s
    "tests/test_eval.py::test_plots_and_report",  # 34 s
    "tests/test_eval.py::test_cli_subcommands",  # 23 s
    "tests/test_gen_traces.py::test_hash_id_prefix_reuse_reaches_the_server_cache",  # 22 s
    "tests/test_eval.py::test_full_disk_is_one_line_naming_the_file_exit_74",  # 16 s
    "tests/test_send_stacks.py::test_real_stack",  # 8 cases, 8-14 s each
    "tests/test_send_faults.py::test_signal_writes_footer_with_every_session_counted",  # 4 cases, 8-14 s each
    "tests/test_e2e.py::test_slow_upstream_is_not_client_lag",  # 14 s
    "tests/test_e2e.py::test_declared_prefix_reaches_the_records_and_the_ideal_cache_share",  # 14 s
    "tests/test_send.py::test_second_signal_exits_at_once_with_valid_lines",  # 14 s
    "tests/test_e2e.py::test_every_stage_output_validates",  # 13 s
)

# Timing tests in files of other branches (their own files mark the rest with @pytest.mark.timing)
TIMING = ("tests/test_ray.py::test_ray_cluster_runs_as_one_run",)


@pytest.hookimpl(tryfirst=True)  # before -m selects by the marks added here
def pytest_collection_modifyitems(config, items):
    rank = {prefix: i for i, prefix in enumerate(SLOW_FIRST)}

    def key(item) -> int:
        for prefix, i in rank.items():
            if item.nodeid.startswith(prefix):
                return i
        return len(rank)

    for item in items:
        if item.nodeid.startswith(TIMING):
            item.add_marker(pytest.mark.timing)
    items.sort(key=key)  # stable: the others keep their order (module by module, so module fixtures start once)


# In CI (.ci/run sets VK_CI=1) a skipped test is a failed one: a test of nginx, TLS or Ray that skips because the
# tool is missing cannot fail, so CI must install what they need. Only what a CI machine may lack by nature skips.
MAY_SKIP_IN_CI = ("no IPv6 loopback",)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if os.environ.get("VK_CI") and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        if not any(ok in reason for ok in MAY_SKIP_IN_CI):
            rep.outcome = "failed"
            rep.longrepr = f"skipped in CI (VK_CI=1), where every test must run: {reason}"
