"""vk-send's options: defaults, parsing and checking (URL, headers, --max-errors), the model lookup, the
open-file limit, and the command line as recorded (secrets removed)."""

from __future__ import annotations

import math
import os
import re
import urllib.parse
import urllib.request
from collections.abc import Iterable

import orjson

from vk.errors import VkError

DEFAULT_TIMEOUT = 600.0
DEFAULT_FIRST_BYTE_TIMEOUT = 120.0
DEFAULT_IDLE_TIMEOUT = 120.0
DEFAULT_LAG_THRESHOLD = 0.001


# names (of headers, JSON fields, URL query parameters) whose values are credentials
_SECRET_NAME = re.compile(r"auth|api[-_]?key|secret|passw(or)?d|cookie|credential|signature|session[-_]?id|"
                          r"(^|[-_])(key|token|sig)$|access[-_]?token|bearer", re.I)
MASK = "***"
# options whose value may carry a secret, and how to mask it
_VALUE_OPTIONS = {"--api-key": "all", "--header": "header", "-H": "header", "--extra-body": "json", "--api": "url"}


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name.strip()))


def redact_url(url: str) -> str:
    """The URL without credentials: user:password@ and secret query parameters masked."""
    try:
        u = urllib.parse.urlsplit(url)
    except ValueError:
        return MASK
    netloc = u.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rsplit("@", 1)[1]
    query = u.query
    if query:
        parts = []
        for item in query.split("&"):
            k, sep, v = item.partition("=")
            parts.append(f"{k}={MASK}" if sep and is_secret_name(urllib.parse.unquote_plus(k)) else item)
        query = "&".join(parts)
    return urllib.parse.urlunsplit((u.scheme, netloc, u.path, query, u.fragment))


def redact_json(text: str) -> str:
    """A JSON text with the values of secret-looking fields masked (unreadable JSON: all of it)."""
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return MASK

    def walk(x):
        if isinstance(x, dict):
            return {k: (MASK if is_secret_name(str(k)) else walk(v)) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return orjson.dumps(walk(obj)).decode()


def _redact_header(h: str) -> str:
    name, sep, _ = h.partition(":")
    return f"{name}: {MASK}" if sep and is_secret_name(name) else h


def _redact_value(how: str, v: str) -> str:
    return {"all": lambda _: MASK, "header": _redact_header, "json": redact_json, "url": redact_url}[how](v)


def redact_argv(argv: list[str], secrets: Iterable[str | None] = ()) -> list[str]:
    """The command line with secrets removed: API keys, credential headers (``-H 'Authorization: ...'``,
    ``-HAuthorization:...``, ``--header=...``), secret fields of ``--extra-body``, credentials in ``--api``; and,
    as a safety net, any of ``secrets`` wherever it appears."""
    out = []
    pending = None
    for a in argv:
        if pending is not None:
            out.append(_redact_value(pending, a))
            pending = None
            continue
        if a in _VALUE_OPTIONS:
            out.append(a)
            pending = _VALUE_OPTIONS[a]
            continue
        name, eq, value = a.partition("=")
        if a.startswith("--") and eq and name in _VALUE_OPTIONS:
            out.append(f"{name}={_redact_value(_VALUE_OPTIONS[name], value)}")
        elif a.startswith("-H") and len(a) > 2:  # attached short option: -HAuthorization:Bearer...
            out.append("-H" + _redact_header(a[2:]))
        else:
            out.append(a)
    for secret in secrets:
        if secret and len(secret) >= 4:
            out = [x.replace(secret, MASK) for x in out]
    return out


def api_key_from_env(names: tuple[str, ...] = ("OPENAI_API_KEY",)) -> str | None:
    """The API key from the environment: $VK_API_KEY, else the API style's own variables (``names``; the
    OpenAI style's: $OPENAI_API_KEY)."""
    for name in ("VK_API_KEY", *names):
        if os.environ.get(name):
            return os.environ[name]
    return None


def read_api_key_file(path: str) -> str:
    """The API key from a file (its first line, stripped): keeps the key off every command line."""
    try:
        with open(path, encoding="utf-8") as f:
            key = f.readline().strip()
    except FileNotFoundError:
        raise VkError(f"--api-key-file: {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise VkError(f"--api-key-file: {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if not key:
        raise VkError(f"--api-key-file: {path}: empty (expected the key on its first line)")
    return key


def check_seconds(option: str, v: float | None) -> None:
    """A duration option: a finite number >= 0 (None: not set)."""
    if v is None:
        return
    if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise VkError(f"{option}: expected a number of seconds >= 0, got {v!r}")


def usable_cpus() -> int:
    """The CPUs this process may run on (taskset, cgroup cpusets), not all the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


MAX_WORKERS_PER_CPU = 4


def check_workers(workers: int | None) -> int:
    """The number of worker processes: default one per usable CPU; more than MAX_WORKERS_PER_CPU per usable CPU
    only adds scheduling noise to the measurement, and is refused."""
    cpus = usable_cpus()
    if workers is None:
        return cpus
    workers = int(workers)
    if workers < 1:
        raise VkError(f"--workers: expected at least 1, got {workers}")
    cap = MAX_WORKERS_PER_CPU * cpus
    if workers > cap:
        raise VkError(f"--workers {workers}: more than {MAX_WORKERS_PER_CPU} per usable CPU ({cpus} here) only "
                      f"measures the client's own contention; at most {cap}")
    return workers


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft open-file limit to the hard limit; returns (soft, hard) after."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if soft < target:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
        return soft, hard
    except ImportError:  # pragma: no cover - not on Linux
        return -1, -1


def api_parts(api: str, endpoint: str) -> tuple[str, str, int, str, str]:
    try:
        u = urllib.parse.urlsplit(api)
        hostname = u.hostname
    except ValueError as e:  # e.g. "Invalid IPv6 URL" for http://[::1/v1
        raise VkError(f"--api: {e} in {redact_url(api)!r} (expected a URL like http://127.0.0.1:8000/v1)") from None
    if u.scheme not in ("http", "https") or not hostname:
        raise VkError(f"--api: expected a URL like http://127.0.0.1:8000/v1, got {redact_url(api)!r}")
    if "@" in u.netloc:
        # the requests would not carry them; say so rather than run unauthenticated
        raise VkError(f"--api: credentials in the URL ({redact_url(api)!r}) are not sent; use --api-key, or "
                      "-H 'Authorization: Basic ...'")
    try:
        port = u.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise VkError(f"--api: bad port in {redact_url(api)!r} (expected 1 to 65535)")
    port = port or (443 if u.scheme == "https" else 80)
    base = u.path.rstrip("/")
    if endpoint not in ("chat", "completions", "invoke"):  # invoke: --api-style bedrock only (vk.send.apis)
        raise VkError(f"--endpoint: expected chat or completions, got {endpoint!r}")
    path = base + ("/completions" if endpoint == "completions" else "/chat/completions")
    if u.query:  # e.g. Azure OpenAI's ?api-version=...
        path += "?" + u.query
    return u.scheme, u.hostname, port, path, base


def resolve_model(api: str, api_key: str | None, headers: list, timeout: float = 10.0, ssl_context=None) -> str:
    """The first model id from GET {api}/models (see ``vk.send.probe``)."""
    from vk.send.probe import resolve_model as lookup

    return lookup(api, api_key, headers, ssl_context=ssl_context, timeout=timeout)


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def parse_headers(headers: Iterable) -> list[tuple[str, str]]:
    """``'Name: value'`` strings (or pairs) as pairs. A name must be an HTTP token and a value may not hold CR, LF
    or NUL: anything else would let one option write extra headers or a second request (header injection)."""
    out = []
    for h in headers or ():
        if isinstance(h, (tuple, list)):
            k, v = h
        else:
            k, sep, v = str(h).partition(":")
            if not sep or not k.strip():
                raise VkError(f"--header: expected 'Name: value', got {_redact_header(str(h))!r}")
        k, v = str(k).strip(), str(v).strip()
        if not _TOKEN.fullmatch(k):
            raise VkError(f"--header: {k!r} is not a valid header name")
        if any(c in v for c in "\r\n\0"):
            raise VkError(f"--header {k}: the value holds a line break or NUL (header injection refused)")
        out.append((k, v))
    return out


def parse_max_errors(v) -> float | None:
    if v is None or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise VkError(f"--max-errors: expected a count (10) or a fraction (0.2), got {v!r}") from None
    if not math.isfinite(x) or x <= 0 or (x >= 1 and not float(x).is_integer()):
        raise VkError(f"--max-errors: expected a count >= 1 or a fraction between 0 and 1, got {v!r}")
    return x
