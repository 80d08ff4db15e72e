"""The server under test, started by vk-sweep (--server-cmd) for each server configuration (--server-grid).

The lifecycle itself (process group, log, readiness, stop, description) is ``vk.launch``'s. What this module adds:
the grid of server parameters (``max_num_seqs=32,64,128;block_size=16,32``, or a JSON/YAML file with a list of
combinations, as vLLM's ``--serve-params`` takes), a name per configuration (its directory under DIR), and a
server that starts only when a probe needs it: a resumed sweep whose probes are all complete starts nothing.
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Any

from vk.errors import VkError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _scalar(text: str) -> Any:
    t = text.strip()
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def parse_server_grid(spec: Any) -> list[dict]:
    """``"a=1,2;b=x,y"`` (a cross product), a .json/.yaml/.yml file holding a list of objects, or a list of
    dicts -> the list of parameter combinations, in order."""
    if spec is None:
        return []
    if isinstance(spec, (list, tuple)):
        combos = [dict(c) for c in spec]
    elif isinstance(spec, str) and spec.endswith((".json", ".yaml", ".yml")):
        if not os.path.isfile(spec):
            raise VkError(f"--server-grid: {spec}: no such file")
        import yaml

        try:
            with open(spec, encoding="utf-8") as fh:
                combos = yaml.safe_load(fh)  # YAML reads JSON too
        except yaml.YAMLError as e:
            raise VkError(f"--server-grid: {spec}: not valid JSON/YAML ({e})") from None
        if not isinstance(combos, list) or not all(isinstance(c, dict) for c in combos):
            raise VkError(f"--server-grid: {spec}: expected a list of objects (one per server configuration)")
    else:
        axes = []
        for part in str(spec).split(";"):
            if not part.strip():
                continue
            name, sep, values = part.partition("=")
            name = name.strip()
            if not sep or not _NAME.match(name) or not values.strip():
                raise VkError(f"--server-grid: cannot parse {part.strip()!r} (expected NAME=V1,V2[;NAME=...])")
            axes.append((name, [_scalar(v) for v in values.split(",") if v.strip()]))
        combos = [dict(zip([a for a, _ in axes], vals, strict=True))
                  for vals in itertools.product(*(v for _, v in axes))]
    if not combos:
        raise VkError("--server-grid: no server configuration")
    for c in combos:
        for k in c:
            if not isinstance(k, str) or not _NAME.match(k):
                raise VkError(f"--server-grid: {k!r} is not a parameter name (letters, digits, _)")
    return combos


def config_name(params: dict) -> str:
    """A configuration's directory name: ``max_num_seqs=32,block_size=16`` (file-name safe)."""
    text = ",".join(f"{k}={v}" for k, v in params.items()) or "server"
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text)


class LazyServer:
    """A vk.launch.Server started on the first call of :meth:`ensure` and stopped by :meth:`stop`."""

    def __init__(self, cmd: str, params: dict, *, api: str | None, log: str, ready_timeout: float | None):
        self.cmd = cmd
        self.params = dict(params)
        self.api_given = api
        self.log = log
        self.ready_timeout = ready_timeout
        self.server = None

    @property
    def identity(self) -> dict:
        """What a probe's key records of the server (not its port or pid, which change at every start)."""
        return {"server_cmd": self.cmd, "server_params": self.params}

    def ensure(self) -> str:
        """Start the server if it is not running; its API base URL."""
        from vk.launch import DEFAULT_READY_TIMEOUT, Server

        if self.server is None:
            srv = Server(self.cmd, api=self.api_given, params=self.params, log=self.log,
                         ready_timeout=self.ready_timeout or DEFAULT_READY_TIMEOUT)
            srv.start()
            self.server = srv  # stop() stops it even when it never gets ready
            srv.wait_ready()
        else:
            self.server.check_alive()
        return self.server.api

    def info(self) -> dict | None:
        return self.server.info() if self.server is not None else None

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
