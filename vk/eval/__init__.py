"""vk-eval: metrics, SLOs, goodput, SQL, plots, comparisons and reports over vk-send output.

Python API::

    from vk.eval import evaluate, sql, plot, compare, report
    res = evaluate("run.jsonl", slo="ttft:p90<500ms", goodput="ttft<1s,tpot<60ms")
    res.to_dict()["overall"]["latency"]["ttft"]["p90"]
    print(res.format("table"))
    res.slo_ok            # False when an SLO is missed
"""

from __future__ import annotations

from typing import Any

from vk.eval.result import EvalResult


def evaluate(inputs: Any, *, percentiles=None, slo=None, goodput=None, warmup=None, cooldown=None,
             group_by=None, fluidity=None, db: str | None = None, validate: str = "auto",
             cache: bool = False) -> EvalResult:
    """Evaluate vk-send output: a path, a list of paths (one run each), or an iterable of record dicts.

    ``percentiles`` ("p50,p99" or [50, 99]); ``slo`` ("ttft:p90<500ms,..."); ``goodput`` ("ttft<1s,tpot<60ms");
    ``warmup``/``cooldown`` (seconds or "30s") bound the steady-state window; ``group_by`` (field or list of
    fields; default: by run when there are several); ``fluidity`` ("ttft=1s,tbt=50ms"); ``db`` saves the
    DuckDB database (tables raw and responses; views requests, events, sessions, runs) to a file. ``cache``
    keeps the parsed input next to the first file (``FILE.vk-eval-cache``) and reads it instead of the JSON
    while the files are unchanged (path, size, modification time); not with ``db``.
    """
    from vk.eval.core import Data, Options, evaluate_data

    opts = Options(percentiles=percentiles, slo=slo, goodput=goodput, warmup=warmup, cooldown=cooldown,
                   group_by=group_by, fluidity=fluidity)
    extra = [g for g in opts.group_by]
    data = Data(inputs, extra_fields=extra, db=db, validate=validate, opts=opts, cache=cache)
    try:
        res = evaluate_data(data, consume=True)
    finally:
        data.con.close()
        data.inputs.close()
    return EvalResult(res)


def sql(query: str, inputs: Any, *, db: str | None = None, columns: bool = False):
    """Run a SQL query over views ``requests``, ``events``, ``sessions``, ``runs``, ``server_metrics``,
    ``server_samples``; returns the rows (tuples), or ``(column names, rows)`` with ``columns=True``. ``db``
    also saves the DuckDB database to that file."""
    from vk.eval.sqlq import run_sql

    cols, rows = run_sql(query, inputs, db=db)
    return (cols, rows) if columns else rows


def plot(inputs: Any, outdir: str, *, overlay: bool = False, **kwargs) -> list[str]:
    """Write PNG figures to ``outdir``; returns their paths."""
    from vk.eval.plots import plot_files

    return plot_files(inputs, outdir, overlay=overlay, **kwargs)


def compare(a: Any, b: Any, **kwargs) -> dict:
    """The metrics of two runs side by side, with differences and bootstrap confidence intervals."""
    from vk.eval.compare import compare_runs

    return compare_runs(a, b, **kwargs)


def report(inputs: Any, outdir: str, *, static: bool = False, **kwargs) -> str:
    """Write a self-contained HTML report to ``outdir/report.html`` and return its path: interactive charts (plotly,
    embedded) as ``vk-eval report`` writes by default, or with ``static=True`` the page of matplotlib figures."""
    if static:
        from vk.eval.report import write_report
    else:
        from vk.eval.html_report import write_interactive_report as write_report
    return write_report(inputs, outdir, **kwargs)


__all__ = ["EvalResult", "evaluate", "sql", "plot", "compare", "report"]
