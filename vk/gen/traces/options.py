"""Checked access to a config mapping: wrong types and unknown keys are errors naming the key."""

from __future__ import annotations

from typing import Any

from vk.errors import VkError

_MISSING = object()


def _tname(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return f"the number {v}"
    if isinstance(v, str):
        return f"the string {v!r}"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return type(v).__name__


class Options:
    """Read typed values out of ``data`` (a dict from YAML/--set); ``done()`` rejects keys nobody read."""

    def __init__(self, data: Any, prefix: str):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise VkError(f"{prefix}: expected a mapping, got {_tname(data)}")
        self.data = data
        self.prefix = prefix
        self.used: set[str] = set()

    def key(self, k: str) -> str:
        return f"{self.prefix}.{k}" if self.prefix else k

    def fail(self, k: str, msg: str):
        raise VkError(f"{self.key(k)}: {msg}")

    def has(self, k: str) -> bool:
        return k in self.data and self.data[k] is not None

    def raw(self, k: str, default: Any = None) -> Any:
        self.used.add(k)
        v = self.data.get(k, _MISSING)
        return default if v is _MISSING or v is None else v

    def int(self, k: str, default: Any = None, *, minimum: int | None = None, required: bool = False):
        v = self.raw(k, _MISSING)
        if v is _MISSING:
            if required:
                self.fail(k, "missing (an integer is required)")
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
            self.fail(k, f"expected an integer, got {_tname(v)}")
        v = int(v)
        if minimum is not None and v < minimum:
            self.fail(k, f"must be >= {minimum}, got {v}")
        return v

    def float(self, k: str, default: Any = None, *, minimum: float | None = None, maximum: float | None = None,
              exclusive_min: bool = False):
        v = self.raw(k, _MISSING)
        if v is _MISSING:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(k, f"expected a number, got {_tname(v)}")
        v = float(v)
        if v != v:
            self.fail(k, "NaN is not allowed")
        if minimum is not None and (v < minimum or (exclusive_min and v == minimum)):
            self.fail(k, f"must be {'>' if exclusive_min else '>='} {minimum}, got {v:g}")
        if maximum is not None and v > maximum:
            self.fail(k, f"must be <= {maximum}, got {v:g}")
        return v

    def bool(self, k: str, default: bool = False) -> bool:
        v = self.raw(k, _MISSING)
        if v is _MISSING:
            return default
        if not isinstance(v, bool):
            self.fail(k, f"expected true or false, got {_tname(v)}")
        return v

    def str(self, k: str, default: Any = None, *, choices: tuple | None = None, required: bool = False):
        v = self.raw(k, _MISSING)
        if v is _MISSING:
            if required:
                self.fail(k, "missing" + (f" (one of: {', '.join(choices)})" if choices else ""))
            return default
        if not isinstance(v, str):
            self.fail(k, f"expected a string, got {_tname(v)}")
        if choices is not None and v not in choices:
            self.fail(k, f"expected one of {', '.join(choices)}, got {v!r}")
        return v

    def str_list(self, k: str, default: Any = None) -> list[str] | None:
        """A list of strings (a single string is a one-item list)."""
        v = self.raw(k, _MISSING)
        if v is _MISSING:
            return default
        if isinstance(v, str):
            return [v]
        if not isinstance(v, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in v):
            self.fail(k, f"expected a list of strings, got {_tname(v)}")
        return [str(x) for x in v]

    def list(self, k: str, default: Any = None) -> list | None:
        v = self.raw(k, _MISSING)
        if v is _MISSING:
            return default
        if not isinstance(v, list):
            self.fail(k, f"expected a list, got {_tname(v)}")
        return v

    def mapping(self, k: str) -> dict:
        v = self.raw(k, _MISSING)
        if v is _MISSING:
            return {}
        if not isinstance(v, dict):
            self.fail(k, f"expected a mapping, got {_tname(v)}")
        return v

    def done(self, known_elsewhere: tuple[str, ...] = ()) -> None:
        extra = [k for k in self.data if k not in self.used and k not in known_elsewhere]
        if extra:
            k = sorted(map(str, extra))[0]
            known = sorted(self.used | set(known_elsewhere))
            self.fail(k, f"unknown key (known keys here: {', '.join(known)})")
