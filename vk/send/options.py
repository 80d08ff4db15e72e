"""vk-send's options: defaults, parsing and checking (URL, headers, --max-errors), the model lookup, the
open-file limit, and the command line as recorded (secrets removed)."""

from __future__ import annotations

import urllib.parse
import urllib.request
from collections.abc import Iterable

import orjson

from vk.errors import VkError

DEFAULT_TIMEOUT = 600.0
DEFAULT_FIRST_BYTE_TIMEOUT = 120.0
DEFAULT_LAG_THRESHOLD = 0.001


def redact_argv(argv: list[str]) -> list[str]:
    """The command line with secrets removed (API keys, credential headers)."""
    out = []
    skip = None
    secret_words = ("auth", "key", "token", "secret", "cookie", "password")
    for a in argv:
        if skip == "value":
            out.append("***")
            skip = None
            continue
        if skip == "header":
            name = a.split(":", 1)[0]
            out.append(f"{name}: ***" if any(w in name.lower() for w in secret_words) else a)
            skip = None
            continue
        if a == "--api-key":
            out.append(a)
            skip = "value"
        elif a.startswith("--api-key="):
            out.append("--api-key=***")
        elif a in ("--header", "-H"):
            out.append(a)
            skip = "header"
        elif a.startswith("--header="):
            name = a[len("--header="):].split(":", 1)[0]
            out.append(f"--header={name}: ***" if any(w in name.lower() for w in secret_words) else a)
        else:
            out.append(a)
    return out


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
    u = urllib.parse.urlsplit(api)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise VkError(f"--api: expected a URL like http://127.0.0.1:8000/v1, got {api!r}")
    port = u.port or (443 if u.scheme == "https" else 80)
    base = u.path.rstrip("/")
    if endpoint not in ("chat", "completions"):
        raise VkError(f"--endpoint: expected chat or completions, got {endpoint!r}")
    path = base + ("/chat/completions" if endpoint == "chat" else "/completions")
    return u.scheme, u.hostname, port, path, base


def resolve_model(api: str, api_key: str | None, headers: list, timeout: float = 10.0) -> str:
    """The first model id from GET {api}/models."""
    url = api.rstrip("/") + "/models"
    req = urllib.request.Request(url)
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    for k, v in headers:
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            obj = orjson.loads(r.read())
        data = obj.get("data") if isinstance(obj, dict) else None
        if not data:
            raise VkError(f"{url} lists no models; pass --model NAME")
        return str(data[0]["id"])
    except VkError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure becomes one line
        reason = getattr(e, "reason", None) or e
        raise VkError(f"cannot get the model list from {url} ({reason}); pass --model NAME") from None


def parse_headers(headers: Iterable) -> list[tuple[str, str]]:
    out = []
    for h in headers or ():
        if isinstance(h, (tuple, list)):
            k, v = h
        else:
            k, sep, v = str(h).partition(":")
            if not sep or not k.strip():
                raise VkError(f"--header: expected 'Name: value', got {h!r}")
        out.append((str(k).strip(), str(v).strip()))
    return out


def parse_max_errors(v) -> float | None:
    if v is None or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise VkError(f"--max-errors: expected a count (10) or a fraction (0.2), got {v!r}") from None
    if x <= 0 or (x >= 1 and not float(x).is_integer()):
        raise VkError(f"--max-errors: expected a count >= 1 or a fraction between 0 and 1, got {v!r}")
    return x
