"""Start, watch and stop the server under test: the server lifecycle shared by run_benchmark and vk-sweep.

A benchmark that starts its own server must (1) start the command in a process group of its own, so that every
process it forks can be stopped together, (2) keep the server's output in a log file next to the run, (3) wait
until the server answers (``GET /health``, else ``GET {api}/models``) and not a moment longer, (4) stop it:
SIGTERM to the group, SIGKILL to whatever is left after a grace period, also on an exception or Ctrl-C, and
(5) say what ran: the command, the pid, how long the server took to get ready and what it says about itself
(``/version``, the model list). That record is the ``server`` field of the run header (see vk-formats(5)).

A server that exits before it is ready, or never gets ready, is a ``ServerError``: one line saying what
happened, followed by the last lines of its log, and nothing of it left running.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from vk.errors import VkError

DEFAULT_READY_TIMEOUT = 900.0  # large models take minutes to load; a stuck server still ends with an error
DEFAULT_STOP_GRACE = 15.0  # SIGTERM first; SIGKILL to whatever is left after this
LOG_TAIL_LINES = 8
_PROBE_TIMEOUT = 2.0


class ServerError(VkError):
    """The server command exited, never got ready, or could not be started."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def format_command(cmd: str | Sequence[str], params: Mapping[str, Any]) -> str | list[str]:
    """Substitute ``{name}`` placeholders (``{port}``, grid parameters) into a command string or argv list.

    Unknown placeholders are an error naming them; ``{{`` and ``}}`` stand for literal braces.
    """
    def one(s: str) -> str:
        try:
            return s.format_map(dict(params))
        except KeyError as e:
            raise ServerError(f"server command: no value for placeholder {{{e.args[0]}}} in {s!r}") from None
        except (ValueError, IndexError) as e:
            raise ServerError(f"server command: bad placeholder in {s!r} ({e})") from None

    return one(cmd) if isinstance(cmd, str) else [one(a) for a in cmd]


def command_uses(cmd: str | Sequence[str], name: str) -> bool:
    """Whether the command has the placeholder ``{name}``."""
    text = cmd if isinstance(cmd, str) else " ".join(cmd)
    return "{" + name + "}" in text.replace("{{", "").replace("}}", "")


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies waiting to be reaped do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may contain spaces and parentheses, so split after the last ')'
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def log_tail(path: str | os.PathLike, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last non-empty lines of a log file (at most the last 64 KiB are read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65536))
            data = f.read()
    except OSError:
        return []
    out = [ln.rstrip() for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    return out[-lines:]


def _origin(url: str) -> str:
    u = urllib.parse.urlsplit(url)
    return f"{u.scheme}://{u.netloc}"


def _get(url: str, timeout: float = _PROBE_TIMEOUT) -> tuple[int | None, bytes]:
    """GET a URL; (status, body). Status None: no HTTP answer (refused, reset, timed out)."""
    req = urllib.request.Request(url, headers={"User-Agent": "vk"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (the user's own server)
            return r.status, r.read(1 << 20)
    except urllib.error.HTTPError as e:
        return e.code, b""
    except (OSError, ValueError):
        return None, b""


class Server:
    """One server process: ``start()``, ``wait_ready()``, ``stop()``; or ``with Server(...) as s:``.

    ``cmd`` is split with shlex (no shell) unless ``shell`` is true; ``{port}`` and any ``params`` are
    substituted first (a free port is chosen when the command asks for ``{port}`` and none is given). ``api``
    is the server's API base URL (``http://127.0.0.1:{port}/v1`` when the command has ``{port}`` and no api is
    given). The server's stdout and stderr go to ``log`` (a new temporary file when None).
    """

    def __init__(
        self,
        cmd: str | Sequence[str],
        *,
        api: str | None = None,
        port: int | None = None,
        params: Mapping[str, Any] | None = None,
        log: str | os.PathLike | None = None,
        shell: bool = False,
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
        stop_grace: float = DEFAULT_STOP_GRACE,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        host: str = "127.0.0.1",
    ):
        if isinstance(cmd, str) and not cmd.strip() or not isinstance(cmd, str) and not list(cmd):
            raise ServerError("server command is empty")
        values = dict(params or {})
        if command_uses(cmd, "port"):
            if port is None:
                port = free_port(host)
            values["port"] = port
        self.template = cmd if isinstance(cmd, str) else list(cmd)
        self.params = {k: v for k, v in values.items()}
        formatted = format_command(cmd, values)
        if shell:
            self.argv = None
            self.command = formatted if isinstance(formatted, str) else shlex.join(formatted)
        else:
            try:
                self.argv = shlex.split(formatted) if isinstance(formatted, str) else list(formatted)
            except ValueError as e:
                raise ServerError(f"server command: cannot split {formatted!r} ({e})") from None
            if not self.argv:
                raise ServerError("server command is empty")
            self.command = shlex.join(self.argv)
        if api is None:
            if port is None:
                raise ServerError("server command: give the server's API URL, or put {port} in the command "
                                  "so that vk chooses a free port")
            api = f"http://{host}:{port}/v1"
        self.api = api.rstrip("/")
        self.origin = _origin(self.api)
        self.port = port
        self.shell = shell
        self.ready_timeout = ready_timeout
        self.stop_grace = stop_grace
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.log_path = Path(log) if log is not None else None
        self.proc: subprocess.Popen | None = None
        self.pgid: int | None = None
        self.t_start: float | None = None
        self.start_epoch: float | None = None
        self.ready_s: float | None = None
        self.ready_probe: str | None = None
        self.version: Any = None
        self.models: list[str] | None = None
        self.exit_status: int | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> Server:
        """Start the command in a new session (its own process group), output to the log file."""
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="vk-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.start_epoch = time.time()
            self.t_start = time.monotonic()
            self.proc = subprocess.Popen(
                self.command if self.shell else self.argv, shell=self.shell, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **self.env} if self.env is not None else None, cwd=self.cwd,
            )
        except OSError as e:
            raise ServerError(f"server command {self.command!r} could not be started: {e.strerror or e}") from None
        finally:
            log.close()
        self.pgid = self.proc.pid  # start_new_session: the leader's pid is the group id
        return self

    def wait_ready(self) -> Server:
        """Poll until ``/health`` (else ``{api}/models``) answers 200; ServerError (and stop) if it never does."""
        assert self.proc is not None, "start() first"
        deadline = self.t_start + self.ready_timeout
        pause = 0.05
        try:
            while True:
                rc = self.proc.poll()
                if rc is not None:
                    self.exit_status = rc
                    raise self._failure(f"exited with status {rc} before it was ready")
                probe = self._probe()
                if probe is not None:
                    self.ready_s = time.monotonic() - self.t_start
                    self.ready_probe = probe
                    break
                if time.monotonic() >= deadline:
                    raise self._failure(f"was not ready after {self.ready_timeout:g} s (no 200 from "
                                        f"{self.origin}/health or {self.api}/models)")
                time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                pause = min(pause * 1.5, 1.0)
        except BaseException:
            self.stop()
            raise
        self._describe()
        return self

    def _probe(self) -> str | None:
        status, _ = _get(self.origin + "/health")
        if status == 200:
            return "/health"
        if status is None:
            return None  # not listening yet
        models_url = self.api + "/models"
        status, _ = _get(models_url)
        if status == 200:
            return urllib.parse.urlsplit(models_url).path
        return None

    def _describe(self) -> None:
        """What the server says about itself: /version and the model ids (best effort, never fatal)."""
        status, body = _get(self.origin + "/version")
        if status == 200 and body:
            try:
                self.version = orjson.loads(body)
            except orjson.JSONDecodeError:
                self.version = body.decode("utf-8", "replace").strip()[:200]
        status, body = _get(self.api + "/models")
        if status == 200:
            try:
                data = orjson.loads(body).get("data")
                self.models = [str(m.get("id")) for m in data if isinstance(m, dict)]
            except (orjson.JSONDecodeError, AttributeError, TypeError):
                self.models = None

    def _failure(self, what: str) -> ServerError:
        tail = log_tail(self.log_path) if self.log_path else []
        msg = f"server {what}: {self.command}"
        if tail:
            msg += f"\n  last lines of {self.log_path}:\n" + "\n".join("  | " + ln for ln in tail)
        else:
            msg += f" (its log {self.log_path} is empty)"
        return ServerError(msg)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        """Raise ServerError if the server exited (e.g. crashed during the run)."""
        if self.proc is not None and self.proc.poll() is not None and self.exit_status is None:
            self.exit_status = self.proc.returncode
            raise self._failure(f"exited with status {self.exit_status} during the run")

    def stop(self) -> None:
        """SIGTERM to the whole group; SIGKILL to what is left after the grace period. Idempotent."""
        if self.proc is None or self.pgid is None:
            return
        deadline = time.monotonic() + self.stop_grace
        _killpg(self.pgid, signal.SIGTERM)
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        # the leader may be gone while its children (engine workers) still shut down
        while group_alive(self.pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if group_alive(self.pgid) or self.proc.poll() is None:
            _killpg(self.pgid, signal.SIGKILL)
            self.proc.wait()
            t_kill = time.monotonic() + 5.0
            while group_alive(self.pgid) and time.monotonic() < t_kill:
                time.sleep(0.02)
        if self.exit_status is None:
            self.exit_status = self.proc.returncode

    def info(self) -> dict:
        """The run header's ``server`` field: what ran and what it said about itself."""
        return {
            "cmd": self.command,
            "params": {k: v for k, v in self.params.items()} or None,
            "pid": self.proc.pid if self.proc is not None else None,
            "api": self.api,
            "log": str(self.log_path) if self.log_path is not None else None,
            "start_epoch": round(self.start_epoch, 6) if self.start_epoch is not None else None,
            "ready_s": round(self.ready_s, 3) if self.ready_s is not None else None,
            "ready_probe": self.ready_probe,
            "version": self.version,
            "models": self.models,
        }

    def __enter__(self) -> Server:
        self.start()
        self.wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@contextlib.contextmanager
def launched(cmd: str | Sequence[str], **kwargs: Any) -> Iterator[Server]:
    """Start the server, wait until it is ready, yield it, stop it (also on an exception or Ctrl-C)."""
    server = Server(cmd, **kwargs)
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
