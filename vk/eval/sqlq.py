"""``vk-eval sql``: SQL over views of the records (requests, events, sessions, runs, server_metrics)."""

from __future__ import annotations

import csv
import io
from typing import Any

import duckdb
import orjson

from vk.errors import VkError
from vk.eval import load as L


def open_db(inputs: Any, db: str | None = None) -> tuple[duckdb.DuckDBPyConnection, L.Inputs]:
    import contextlib

    from vk.eval.data import VIEWS_SQL
    from vk.eval.data import open_db as connect
    from vk.eval.outputs import writing

    inp = L.Inputs(inputs)
    con = connect(db)
    with writing(db) if db else contextlib.nullcontext():
        L.load(con, inp)
    con.execute(
        f"CREATE OR REPLACE VIEW responses AS SELECT rowid AS row, * EXCLUDE ({L.RUN_ONLY_COLUMNS}) FROM raw "
        "WHERE kind = 'response'"
    )
    con.execute(VIEWS_SQL)
    from vk.eval.server_metrics import view_sql

    con.execute(view_sql(inp.paths))
    return con, inp


def run_sql(query: str, inputs: Any, *, db: str | None = None) -> tuple[list[str], list[tuple]]:
    con, inp = open_db(inputs, db)
    try:
        try:
            cur = con.execute(query)
        except duckdb.Error as e:
            raise VkError(f"sql: {str(e).splitlines()[0]}") from None
        if cur.description is None:
            return [], []
        cols = [c[0] for c in cur.description]
        rows = cur.fetchall()
        return cols, rows
    finally:
        con.close()
        inp.close()


def _cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def format_rows(cols: list[str], rows: list[tuple], fmt: str = "table") -> str:
    if fmt == "json":
        return "".join(orjson.dumps(dict(zip(cols, r, strict=False)), default=str).decode() + "\n" for r in rows)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(cols)
        w.writerows(["" if v is None else v for v in r] for r in rows)
        return buf.getvalue()
    cells = [[_cell(v) for v in r] for r in rows]
    if fmt == "markdown":
        out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        out += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(out) + "\n"
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=False)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) for r in cells]
    return "\n".join(out) + f"\n({len(rows)} row{'s' if len(rows) != 1 else ''})\n"
