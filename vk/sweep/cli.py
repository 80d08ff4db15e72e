"""vk-sweep: a series of probes over one arrival knob, or a capacity search against SLOs, with confidence."""

from __future__ import annotations

import sys

import click

from vk.cli import command, examples, main_wrapper


@command("vk-sweep", epilog=examples(
    "vk-sweep sessions.jsonl --api http://127.0.0.1:8000/v1 -o sw/ --poisson 1,2,4,8,16 --duration 60",
    "vk-sweep sessions.jsonl --api URL -o sw/ --concurrency 1,4,16,64 --max-sessions 500 --warmup 10",
    "vk-sweep sessions.jsonl --api URL -o cap/ --search rate --slo 'ttft:p90<500ms,tpot:p99<50ms' --duration 60",
    "vk-sweep sessions.jsonl --api URL -o cap/ --search concurrency --min-goodput 0.9 --goodput 'ttft<1s'",
    "vk-gen w.yaml --count 200 | vk-sweep - --api URL -o sw/ --gamma 5,10,20 --cv 2 --duration 30 --plot",
    "vk-eval sweep cap/ --slo 'ttft:p90<1s'      # score the kept runs again under new objectives, no traffic",
    "",
    "Running the same command again reuses the probes already complete (an interrupted sweep resumes).",
))
@click.argument("sessions", type=click.Path(allow_dash=True))
@click.option("--api", required=True, metavar="URL", help="The server's base URL (e.g. http://127.0.0.1:8000/v1).")
@click.option("-o", "--output", "outdir", required=True, metavar="DIR",
              help="The sweep's directory: sweep.jsonl and one directory per probe.")
@click.option("--poisson", metavar="LIST", help="Grid of Poisson rates (sessions/s), e.g. 1,2,4,8.")
@click.option("--gamma", metavar="LIST", help="Grid of gamma-process rates (with --cv).")
@click.option("--cv", type=float, help="Coefficient of variation of the gaps for --gamma (or --search rate).")
@click.option("--concurrency", metavar="LIST", help="Grid of closed-loop concurrencies, e.g. 1,4,16,64.")
@click.option("--target-rate", "target_rate", metavar="LIST", help="Grid of replay rates for trace sessions.")
@click.option("--search", type=click.Choice(["rate", "concurrency"]),
              help="Capacity search: the largest rate or concurrency meeting every objective.")
@click.option("--slo", metavar="SPEC", help="Objectives, as vk-eval's --slo (e.g. 'ttft:p90<500ms,tpot:p99<50ms').")
@click.option("--goodput", metavar="SPEC", help="Per-request objectives for --min-goodput (as vk-eval's --goodput).")
@click.option("--min-goodput", "min_goodput", type=float, metavar="SHARE",
              help="Objective: at least this share of requests meets the per-request objectives (--goodput, "
                   "else one per latency --slo).")
@click.option("--start", type=float, help="Search: the first value probed.  [default: 1]")
@click.option("--growth", type=float, default=2.0, show_default=True, help="Search: factor between probes until "
              "one fails.")
@click.option("--tolerance", type=float, default=0.1, show_default=True,
              help="Search: stop when first failing / last passing - 1 is at most this.")
@click.option("--max-probes", "max_probes", type=int, default=12, show_default=True,
              help="Search: most probes run, extensions included.")
@click.option("--max-value", "max_value", type=float, help="Search: never probe above this value.")
@click.option("--confidence", type=float, default=0.95, show_default=True, help="Level of the verdicts' intervals.")
@click.option("--bootstrap", type=int, default=1000, show_default=True, help="Bootstrap resamples per check.")
@click.option("--extend", type=int, default=1, show_default=True,
              help="Times an uncertain probe is run again, twice as long each time.")
@click.option("--duration", type=float, metavar="SECONDS", help="Length of each probe.")
@click.option("--max-sessions", "max_sessions", type=int, metavar="N", help="Sessions per probe.")
@click.option("--warmup", type=int, default=0, show_default=True, help="Warm-up sessions per probe (not measured).")
@click.option("--seed", type=int, default=0, show_default=True, help="The sweep's seed (each probe derives its own).")
@click.option("--no-saturation-stop", "no_saturation", is_flag=True,
              help="Run every probe to its end, even one the server plainly cannot carry.")
@click.option("--saturation-min", "saturation_min", type=float, default=2.0, show_default=True,
              metavar="SECONDS", help="No saturation stop before this far into a probe.")
@click.option("--cooldown", type=float, default=0.0, show_default=True, metavar="SECONDS",
              help="Pause between probes, after the server has drained.")
@click.option("--between-cmd", "between_cmd", metavar="CMD", help="Shell command run between probes (e.g. reset the "
              "server's prefix cache); a failure stops the sweep.")
@click.option("--drain-timeout", "drain_timeout", type=float, default=60.0, show_default=True, metavar="SECONDS",
              help="Longest wait for /metrics to show nothing running or waiting.")
@click.option("--model", help="Model name (default: the server's first).")
@click.option("--workers", type=int, default=1, show_default=True, help="vk-send worker processes.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a table.")
@click.option("--plot", is_flag=True, help="Also write the figures to DIR/plots/.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
def cli_command(sessions, api, outdir, poisson, gamma, cv, concurrency, target_rate, search, slo, goodput,
                min_goodput, start, growth, tolerance, max_probes, max_value, confidence, bootstrap, extend,
                duration, max_sessions, warmup, seed, no_saturation, saturation_min, cooldown, between_cmd,
                drain_timeout, model, workers, as_json, plot, quiet):
    """Run SESSIONS (vk-gen output, a file or - for stdin) as a series of probes against --api, each a
    vk-schedule + vk-send + vk-eval with one arrival knob changed, kept in DIR; or search for the capacity
    that meets --slo. Prints a table of the probes and, for a search, the answer as an interval with its
    confidence. See man vk-sweep.
    """
    import os

    from vk.sweep import sweep

    res = sweep(sessions, api=api, output=outdir, model=model, workers=workers, quiet=quiet, argv=sys.argv[1:],
                poisson=poisson, gamma=gamma, cv=cv, concurrency=concurrency, target_rate=target_rate,
                search=search, start=start, growth=growth, tolerance=tolerance, max_probes=max_probes,
                max_value=max_value, slo=slo, goodput=goodput, min_goodput=min_goodput, confidence=confidence,
                bootstrap=bootstrap, extend=extend, duration=duration, max_sessions=max_sessions, warmup=warmup,
                seed=seed, saturation=not no_saturation, saturation_min=saturation_min, cooldown=cooldown,
                between_cmd=between_cmd, drain_timeout=drain_timeout)
    click.echo(res.format("json" if as_json else "table"), nl=False)
    if plot:
        from vk.sweep.plots import plot_sweeps

        for p in plot_sweeps([res], os.path.join(outdir, "plots")):
            print(f"vk-sweep: wrote {p}", file=sys.stderr)


@click.command("sweep", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
               epilog=examples("vk-eval sweep cap/                              # the sweep's table again",
                               "vk-eval sweep cap/ --slo 'ttft:p90<1s,tpot:p99<40ms' --json",
                               "vk-eval sweep a/ b/ --plot figs/                # two sweeps overlaid"))
@click.argument("dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--slo", metavar="SPEC", help="New objectives (default: the sweep's own).")
@click.option("--goodput", metavar="SPEC", help="New per-request objectives for --min-goodput.")
@click.option("--min-goodput", "min_goodput", type=float, metavar="SHARE", help="New minimum goodput share.")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of tables.")
@click.option("--plot", "plotdir", metavar="DIR", help="Write the figures, the sweeps overlaid, to DIR.")
def eval_sweep_cmd(dirs, slo, goodput, min_goodput, as_json, plotdir):
    """Score finished vk-sweep directories again from their kept runs (no request is sent): the probes' table
    and, for a capacity search, the answer under the new objectives."""
    import orjson

    from vk.sweep import rescore

    results = [rescore(d, slo=slo, goodput=goodput, min_goodput=min_goodput) for d in dirs]
    if as_json:
        click.echo(orjson.dumps([r.to_dict() for r in results] if len(results) > 1 else results[0].to_dict(),
                                option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode())
    else:
        click.echo("\n".join(r.format("table") for r in results), nl=False)
    if plotdir:
        from vk.sweep.plots import plot_sweeps

        for p in plot_sweeps(results, plotdir):
            print(f"vk-eval: wrote {p}", file=sys.stderr)


main = main_wrapper(cli_command, "vk-sweep")

if __name__ == "__main__":
    main()
