"""vk-eval: metrics, SLOs and goodput from vk-send output; SQL, plots, comparisons and HTML reports.

    vk-eval run.jsonl                         report table (default command)
    vk-eval sql "SELECT ..." run.jsonl        SQL over views requests, events, sessions, runs
    vk-eval plot DIR run.jsonl ...            PNG figures
    vk-eval compare A.jsonl B.jsonl           side by side, with bootstrap confidence intervals
    vk-eval report DIR run.jsonl ...          self-contained HTML report
    vk-eval sweep DIR ...                     vk-sweep directories scored again, no traffic
"""

from __future__ import annotations

import os
import sys

import click

from vk import __version__
from vk.cli import CONTEXT_SETTINGS, examples, main_wrapper
from vk.eval.result import FORMATS

SUBCOMMANDS = ("sql", "plot", "compare", "report", "sweep", "live", "trace")

EPILOG = examples(
    "vk-eval run.jsonl",
    "vk-eval run.jsonl --json > summary.json",
    "vk-eval run.jsonl --slo 'ttft:p90<500ms,tpot:p99<50ms' --check      # exit 1 when an SLO is missed",
    "vk-eval run.jsonl --goodput 'ttft<1s,tpot<60ms' --warmup 30s --cooldown 10s",
    "vk-eval a.jsonl b.jsonl --format markdown                            # one group per run",
    "vk-eval run.jsonl --group-by input_bucket --percentiles p50,p99,p99.9",
    "vk-eval sql 'SELECT status, count(*) FROM requests GROUP BY 1' run.jsonl",
    "vk-eval plot plots/ run.jsonl        vk-eval report out/ run.jsonl     (or -o DIR after the files)",
    "vk-eval live run.jsonl --slo 'ttft:p90<500ms'     vk-eval trace run.jsonl -o run.trace.json",
    "vk-eval compare before.jsonl after.jsonl",
    "vk-eval big.jsonl --cache               # parsed once; later runs read big.jsonl.vk-eval-cache/",
    "",
    "\b",
    "Subcommands: sql, plot, compare, report, sweep, live, trace (vk-eval SUBCOMMAND --help). Times are in",
    "seconds in JSON/CSV and in milliseconds in tables. Percentiles are linear (not nearest rank); stddev is the population one.",
    "Exit status: 1 an SLO missed (--check), 2 bad input or option, 74 no space left for an output.",
)


LABEL_OPTION = click.option(
    "--label", "labels", multiple=True, metavar="NAME",
    help="Legend label of each input file, in order (repeat once per file); default: the file name without .jsonl.")


def _common(fn):
    opts = [
        click.option("--percentiles", metavar="LIST", help="Percentiles to report (default p50,p90,p95,p99,p99.9)."),
        click.option("--warmup", metavar="DURATION",
                     help="Steady window starts this long after the run start (e.g. 30s); default: after "
                          "the warm-up requests marked by vk-schedule, else the whole run."),
        click.option("--cooldown", metavar="DURATION", help="Steady window ends this long before the last response."),
        click.option("--group-by", "group_by", metavar="FIELDS",
                     help="Summarise per value of these comma-separated response fields (any top-level field, "
                          "annotations included; also run, input_bucket, output_bucket). Default: run, when "
                          "several runs are given."),
        click.option("--fluidity", metavar="SPEC",
                     help="Fluidity-index deadlines, e.g. 'ttft=1s,tbt=50ms' (the default)."),
        click.option("--progress", is_flag=True, help="Show a progress bar on stderr (default: when it is a terminal)."),
        click.option("--validate", type=click.Choice(["auto", "full", "fast"]), default="auto", show_default=True,
                     help="Record-by-record validation: always (full), only for inputs under 32 MiB (auto), or "
                          "SQL checks of kind/version/status only (fast)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


@click.command("vk-eval", context_settings=CONTEXT_SETTINGS, epilog=EPILOG)
@click.argument("files", nargs=-1, required=True, type=click.Path(allow_dash=True))
@click.option("-f", "--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="Output format.")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option("--slo", metavar="SPEC",
              help="Aggregate objectives, e.g. 'ttft:p90<500ms,tpot:p99<50ms,error_rate<1%'. Latency thresholds "
                   "need a unit (us, ms, s; 'm' is refused); the SLO table prints each as read.")
@click.option("--goodput", metavar="SPEC",
              help="Per-request objectives, e.g. 'ttft<1s,tpot<60ms': attainment and goodput (failed requests "
                   "are violations; one-token outputs have no TPOT and pass a TPOT condition).")
@click.option("--check", is_flag=True, help="Exit 1 when an --slo objective is missed (--goodput only reports).")
@_common
@click.option("--db", metavar="FILE", help="Also save the DuckDB database (views requests, events, sessions, runs).")
@click.option("--cache", is_flag=True,
              help="Keep the parsed input in FILE.vk-eval-cache next to the first file and read it instead of the "
                   "JSON on the next run while the files are unchanged (size, modification time).")
@click.option("-o", "--output", metavar="FILE", default="-", help="Write the report to FILE (default stdout).")
@click.version_option(__version__, "--version", prog_name="vk-eval", message="%(prog)s %(version)s")
def summary_cmd(files, fmt, as_json, slo, goodput, check, percentiles, warmup, cooldown, group_by, fluidity,
                progress, validate, db, cache, output):
    """Summarise vk-send output FILE... (several files: one run each; - is stdin).

    Every latency is computed from the raw event times under one unambiguous name: ttft (first token of any
    kind), ttfc (first content token), tpot, itl_chunk / itl_token / itl_token_zeros, e2e, normalized_latency,
    max_stall, and each also *_from_intended (the client's own queueing included). See man vk-eval.
    """
    from vk.eval import evaluate

    _progress(progress)
    res = evaluate(list(files), percentiles=percentiles, slo=slo, goodput=goodput, warmup=warmup,
                   cooldown=cooldown, group_by=group_by, fluidity=fluidity, db=db, validate=validate, cache=cache)
    _progress_done()
    text = res.format("json" if as_json else fmt)
    _write(output, text)
    if check and not res.slo_ok:
        missed = [c for c in res["slo"] if not c["ok"]]
        print(f"vk-eval: {len(missed)} SLO check(s) missed: "
              + ", ".join(f"{c['slo']} ({c['group']})" for c in missed[:5]), file=sys.stderr)
        sys.exit(1)


def _progress(flag: bool) -> None:
    from vk.eval.progress import progress

    progress(flag or sys.stderr.isatty())


def _progress_done() -> None:
    from vk.eval.progress import progress

    progress(False)


def _write(output: str, text: str) -> None:
    """The report to stdout or to a file; a full disk is one line naming it (exit 74, vk.eval.outputs)."""
    from vk.eval.outputs import writing

    if output == "-":
        try:
            with writing("<stdout>"):
                sys.stdout.write(text)
                sys.stdout.flush()
        except Exception:
            _drop_stdout()  # what is still buffered must not fail again at exit
            raise
    else:
        with writing(output), open(output, "w") as f:
            f.write(text)


def _drop_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


@click.command("sql", context_settings=CONTEXT_SETTINGS, epilog=examples(
    "vk-eval sql 'SELECT status, count(*) FROM requests GROUP BY 1' run.jsonl",
    "vk-eval sql 'SELECT quantile_cont(ttft, 0.99) FROM requests WHERE status = $$ok$$' a.jsonl b.jsonl",
    "vk-eval sql 'SELECT kind, count(*) FROM events GROUP BY 1' run.jsonl --format csv",
    "vk-eval sql 'SELECT 1' run.jsonl --db run.duckdb          # then: duckdb run.duckdb",
))
@click.argument("query")
@click.argument("files", nargs=-1, required=True, type=click.Path(allow_dash=True))
@click.option("-f", "--format", "fmt", type=click.Choice(["table", "csv", "json", "markdown"]), default="table",
              show_default=True)
@click.option("--db", metavar="FILE", help="Save the DuckDB database to FILE.")
def sql_cmd(query, files, fmt, db):
    """Run QUERY over views of the records: requests (one row per response, with metric columns), events (one
    row per streamed event), sessions, runs, and for runs recorded with vk-send --scrape server_metrics (the
    server's gauges and counters per scrape, named alike for vLLM, SGLang and TGI) and server_samples (as
    scraped); tables raw and responses hold the records as read."""
    from vk.eval.sqlq import format_rows, run_sql

    cols, rows = run_sql(query, list(files), db=db)
    _write("-", format_rows(cols, rows, fmt))


@click.command("plot", context_settings=CONTEXT_SETTINGS, epilog=examples(
    "vk-eval plot plots/ run.jsonl",
    "vk-eval plot plots/ a.jsonl b.jsonl --overlay     # runs overlaid in one set of figures",
    "vk-eval plot plots/ a.jsonl b.jsonl --overlay --label before --label after",
))
@click.argument("args", nargs=-1, required=True, type=click.Path(allow_dash=True), metavar="[DIR] FILE...")
@click.option("-o", "--outdir", metavar="DIR", help="Output directory (else the first argument).")
@click.option("--overlay", is_flag=True, help="Overlay the runs in one set of figures (default: one set per run).")
@LABEL_OPTION
def plot_cmd(args, outdir, overlay, labels):
    """Write PNG figures to DIR: CDFs of TTFT, TPOT, ITL and e2e; latency and throughput over time; TTFT
    against prompt length; ITL distribution. DIR is -o DIR or the first argument."""
    from vk.eval.plots import plot_files

    outdir, files = _dir_and_files(outdir, args)
    for p in plot_files(files, outdir, overlay=overlay, labels=list(labels) or None):
        print(p)


@click.command("compare", context_settings=CONTEXT_SETTINGS, epilog=examples(
    "vk-eval compare before.jsonl after.jsonl",
    "vk-eval compare a.jsonl b.jsonl --json --bootstrap 2000",
))
@click.argument("a", type=click.Path(allow_dash=True))
@click.argument("b", type=click.Path(allow_dash=True))
@click.option("-f", "--format", "fmt", type=click.Choice(["table", "json", "markdown", "csv"]), default="table",
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option("--bootstrap", default=1000, show_default=True, help="Bootstrap resamples for the intervals (0: none).")
@click.option("--confidence", default=0.95, show_default=True, help="Confidence level of the intervals (0 < C < 1).")
@click.option("--seed", default=0, show_default=True, help="Seed of the bootstrap.")
@click.option("--percentiles", metavar="LIST", help="Percentiles to compare (default p50,p90,p99).")
def compare_cmd(a, b, fmt, as_json, bootstrap, confidence, seed, percentiles):
    """Compare run A with run B: each metric side by side, B - A, and a bootstrap confidence interval of the
    difference; 'yes' in the last column when the interval excludes zero (larger than the noise)."""
    from vk.eval.compare import compare_runs, format_compare

    res = compare_runs(a, b, bootstrap=bootstrap, confidence=confidence, seed=seed, percentiles=percentiles)
    _write("-", format_compare(res, "json" if as_json else fmt))


@click.command("report", context_settings=CONTEXT_SETTINGS, epilog=examples(
    "vk-eval report out/ run.jsonl          # writes out/report.html",
    "vk-eval report out/ a.jsonl b.jsonl --slo 'ttft:p90<500ms'",
))
@click.argument("args", nargs=-1, required=True, type=click.Path(allow_dash=True), metavar="[DIR] FILE...")
@click.option("-o", "--outdir", metavar="DIR", help="Output directory (else the first argument).")
@click.option("--slo", metavar="SPEC", help="Aggregate objectives to check (as for vk-eval).")
@click.option("--goodput", metavar="SPEC", help="Per-request objectives (as for vk-eval).")
@click.option("--xlsx", metavar="FILE", help="Also (or, without DIR, only) write an Excel workbook: summary sheets, "
                                             "per-request records, charts.")
@click.option("--static", is_flag=True, help="The page with PNG figures (matplotlib) instead of interactive charts.")
@LABEL_OPTION
@_common
def report_cmd(args, outdir, slo, goodput, xlsx, static, labels, percentiles, warmup, cooldown, group_by, fluidity,
               progress, validate):
    """Write DIR/report.html: a self-contained page with interactive charts (plotly, embedded: no network) and
    the tables of the run(s), for sharing; with --xlsx FILE, a workbook too. DIR is -o DIR or the first
    argument (not needed with --xlsx alone)."""
    kw = dict(slo=slo, goodput=goodput, percentiles=percentiles, warmup=warmup, cooldown=cooldown, group_by=group_by,
              fluidity=fluidity, validate=validate)
    if xlsx and outdir is None and (len(args) == 1 or os.path.isfile(args[0])):
        outdir, files = None, list(args)
    else:
        outdir, files = _dir_and_files(outdir, args)
    _progress(progress)
    if outdir is not None:
        if static:
            from vk.eval.report import write_report
        else:
            from vk.eval.html_report import write_interactive_report as write_report
        print(write_report(files, outdir, labels=list(labels) or None, **kw))
    if xlsx:
        from vk.eval.xlsx import write_xlsx

        print(write_xlsx(files, xlsx, **kw))
    _progress_done()


@click.command("live", context_settings=CONTEXT_SETTINGS, epilog=examples(
    "vk-send sched.jsonl --api URL -o run.jsonl &  vk-eval live run.jsonl --slo 'ttft:p90<500ms'",
    "ssh host tail -c +0 -f run.jsonl | vk-eval live -          # a run on another machine",
    "vk-eval live run.jsonl --schedule sched.jsonl --window 30s  # sessions due and time left",
))
@click.argument("file", type=click.Path(allow_dash=True))
@click.option("--slo", metavar="SPEC", help="Aggregate objectives (as for vk-eval): attainment so far.")
@click.option("--goodput", metavar="SPEC", help="Per-request objectives (as for vk-eval): attainment so far.")
@click.option("--schedule", metavar="SCHED.jsonl", type=click.Path(exists=True, dir_okay=False),
              help="The schedule vk-send runs: sessions due and done, time left.")
@click.option("--window", default="10s", show_default=True, metavar="DURATION",
              help="The last window's length (its percentiles beside the whole run's).")
@click.option("--interval", type=float, metavar="SECONDS",
              help="Refresh period (default 1 on a terminal, 5 for plain lines); longer when an evaluation takes "
                   "more than half of it.")
@click.option("--plain", is_flag=True, help="Plain lines even on a terminal.")
@click.option("--final-json", metavar="FILE", help="At the end, write vk-eval's JSON summary of the run to FILE.")
@click.option("--warmup", metavar="DURATION", help="As for vk-eval.")
@click.option("--cooldown", metavar="DURATION", help="As for vk-eval.")
def live_cmd(file, slo, goodput, schedule, window, interval, plain, final_json, warmup, cooldown):
    """Follow FILE while vk-send writes it (- : a stream, e.g. over ssh) and show the run live; ends by itself
    when the run's footer arrives (exit 0; 1 when the input ended without it). Only reads the file."""
    from vk.eval.live import follow
    from vk.eval.slo import parse_duration

    sys.exit(follow(file, slo=slo, goodput=goodput, warmup=warmup, cooldown=cooldown, schedule=schedule,
                    window=parse_duration(window, "--window"), interval=interval, plain=plain or None,
                    final_json=final_json))


@click.command("trace", context_settings=CONTEXT_SETTINGS, epilog=examples(
    "vk-eval trace run.jsonl -o run.trace.json          # open in ui.perfetto.dev or chrome://tracing",
    "vk-eval trace run.jsonl --by worker -o run.trace.json",
))
@click.argument("files", nargs=-1, required=True, type=click.Path(allow_dash=True))
@click.option("-o", "--output", metavar="FILE", default="-", help="The trace file (default stdout).")
@click.option("--by", type=click.Choice(["session", "worker"]), default="session", show_default=True,
              help="One track per session or per vk-send worker.")
def trace_cmd(files, output, by):
    """Write the run(s) as a Chrome trace-event / Perfetto timeline: a slice per request from t_intended to t_done
    with its phases (queued, waiting for first token, decoding), instant markers for events, ids and token
    counts in the arguments."""
    from vk.eval.trace import trace_file

    trace_file(list(files), output, by=by)


def _dir_and_files(outdir: str | None, args: tuple[str, ...]) -> tuple[str, list[str]]:
    if outdir is None:
        if len(args) < 2 or os.path.isfile(args[0]):
            raise click.UsageError("give the output directory (DIR or -o DIR) and at least one input FILE"
                                   + (f" ({args[0]} is a file, not a directory)" if args and os.path.isfile(args[0])
                                      else ""))
        return args[0], list(args[1:])
    return outdir, list(args)


class EvalCommand(click.Group):
    """``vk-eval FILE...`` runs the summary; ``vk-eval sql|plot|compare|report ...`` the subcommands."""

    def main(self, args=None, prog_name=None, **kw):
        args = list(sys.argv[1:] if args is None else args)
        if args and args[0] in self.commands:
            sub = self.commands[args[0]]
            return sub.main(args=args[1:], prog_name=f"{prog_name or 'vk-eval'} {args[0]}", **kw)
        return summary_cmd.main(args=args, prog_name=prog_name or "vk-eval", **kw)


cli = EvalCommand("vk-eval", context_settings=CONTEXT_SETTINGS)
for _c in (sql_cmd, plot_cmd, compare_cmd, report_cmd, live_cmd, trace_cmd):
    cli.add_command(_c)
from vk.sweep.cli import eval_sweep_cmd  # noqa: E402 - vk-eval sweep DIR: vk-sweep's re-scoring, no traffic

cli.add_command(eval_sweep_cmd)

main = main_wrapper(cli, "vk-eval")

if __name__ == "__main__":
    main()
