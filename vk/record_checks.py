"""Small field checkers for :mod:`vk.records`' validators: each reads one field of a record and fails with the
record's source, line and field name (``RecordError``) when it has the wrong type or value."""

from __future__ import annotations

from typing import Any

from vk.errors import RecordError


class _Ctx:
    """Where a record came from, for error messages."""

    __slots__ = ("source", "line")

    def __init__(self, source: str, line: int | None):
        self.source = source
        self.line = line

    def fail(self, field: str | None, message: str):
        raise RecordError(self.source, self.line, field, message)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _req(ctx: _Ctx, rec: dict, field: str, prefix: str = "") -> Any:
    if field not in rec:
        ctx.fail(prefix + field, "missing")
    return rec[field]


def _str(ctx, rec, field, prefix="", *, required=True, nullable=False):
    if field not in rec:
        if required:
            ctx.fail(prefix + field, "missing")
        return None
    v = rec[field]
    if v is None and nullable:
        return None
    if not isinstance(v, str):
        ctx.fail(prefix + field, f"expected a string, got {_type_name(v)}")
    return v


def _num(ctx, rec, field, prefix="", *, required=True, nullable=False, minimum=None, integer=False):
    if field not in rec:
        if required:
            ctx.fail(prefix + field, "missing")
        return None
    v = rec[field]
    if v is None and nullable:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        ctx.fail(prefix + field, f"expected {'an integer' if integer else 'a number'}, got {_type_name(v)}")
    if integer and not isinstance(v, int):
        if float(v).is_integer():
            v = int(v)
        else:
            ctx.fail(prefix + field, f"expected an integer, got {v}")
    if v != v:  # NaN
        ctx.fail(prefix + field, "NaN is not allowed")
    if minimum is not None and v < minimum:
        ctx.fail(prefix + field, f"must be >= {minimum}, got {v}")
    return v


def _bool(ctx, rec, field, prefix="", *, required=False):
    if field not in rec:
        if required:
            ctx.fail(prefix + field, "missing")
        return None
    v = rec[field]
    if not isinstance(v, bool):
        ctx.fail(prefix + field, f"expected true or false, got {_type_name(v)}")
    return v


def _obj(ctx, rec, field, prefix="", *, required=False, nullable=True):
    if field not in rec:
        if required:
            ctx.fail(prefix + field, "missing")
        return None
    v = rec[field]
    if v is None and nullable:
        return None
    if not isinstance(v, dict):
        ctx.fail(prefix + field, f"expected an object, got {_type_name(v)}")
    return v
