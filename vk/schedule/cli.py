"""vk-schedule: when each session starts (arrival processes, trace replay, closed-loop concurrency)."""

from __future__ import annotations

import sys

import click
import orjson

from vk.cli import _quiet_broken_pipe, command, examples, main_wrapper
from vk.errors import VkError
from vk.jsonl import Writer, open_input
from vk.schedule.core import Input, Scheduler, make_config, needs_rewind
from vk.schedule.stats import format_summary

EPILOG = examples(
    "vk-gen synth.yaml | vk-schedule --poisson 10 --duration 300 > schedule.jsonl",
    "vk-schedule sessions.jsonl --gamma 10 --cv 3 --max-sessions 5000 --warmup 100 -o schedule.jsonl",
    "vk-schedule sessions.jsonl --ramp 1:50:600                  # 1 -> 50 sessions/s over 10 minutes",
    'vk-schedule sessions.jsonl --stages "10:60,20:60,40:60"      # 3 minutes, rate doubling each minute',
    "vk-schedule sessions.jsonl --onoff 40:2:5:20 --duration 600  # bursts of 40/s, ~5 s on, ~20 s off",
    "vk-schedule trace-sessions.jsonl --replay --speedup 2 --max-idle 5",
    "vk-schedule trace-sessions.jsonl --replay --target-rate 30   # thin or superpose whole sessions",
    "vk-schedule sessions.jsonl --concurrency 32 --ramp-up 30 --cycle --max-sessions 10000",
    "vk-schedule sessions.jsonl --poisson 100 --duration 600 --shard 2/4 --start-at 1767225600",
    "vk-schedule sessions.jsonl --poisson 10 --duration 3600 --stats   # only the summary",
)


@command("vk-schedule", epilog=EPILOG)
@click.argument("files", nargs=-1, type=click.Path(allow_dash=True, dir_okay=False))
@click.option("--seed", type=int, default=0, show_default=True, callback=lambda _c, _p, v: _seed_fits(v),
              help="Random seed, 0 to 2**64-1 (same input and seed: same bytes).")
@click.option("--poisson", type=float, metavar="RATE", help="Poisson arrivals: exponential gaps, RATE sessions/s.")
@click.option("--gamma", type=float, metavar="RATE", help="Gamma-distributed gaps at RATE sessions/s (with --cv).")
@click.option("--cv", type=float, help="Coefficient of variation of the --gamma gaps (1 = Poisson, >1 bursty).")
@click.option("--constant", type=float, metavar="RATE", help="Evenly spaced arrivals, RATE sessions/s.")
@click.option("--ramp", metavar="FROM:TO:SECONDS", help="Poisson with a rate going linearly FROM -> TO.")
@click.option("--stages", metavar="RATE:SECONDS,...", help="Poisson with a piecewise-constant rate.")
@click.option("--onoff", metavar="ON:OFF:MEAN_ON:MEAN_OFF",
              help="Markov-modulated Poisson: rate ON/OFF sessions/s, exponential on/off periods of these means (s).")
@click.option("--replay", is_flag=True, help="Start sessions at their trace_time (sessions from a trace).")
@click.option("--speedup", type=float, default=1.0, show_default=True, help="Replay: divide trace gaps by X.")
@click.option("--max-idle", type=float, metavar="SECONDS", help="Replay: cap every gap at SECONDS.")
@click.option("--target-rate", type=float, metavar="RATE",
              help="Replay: thin or superpose whole sessions to RATE sessions/s.")
@click.option("--concurrency", type=int, metavar="N", help="Closed loop: vk-send keeps N sessions active.")
@click.option("--ramp-up", type=float, metavar="SECONDS", help="Closed loop: grow to N sessions over SECONDS.")
@click.option("--rate-limit", type=float, metavar="RATE", help="Closed loop: start at most RATE sessions/s.")
@click.option("--duration", type=float, metavar="SECONDS", help="Stop scheduling at this offset.")
@click.option("--max-sessions", type=int, metavar="N", help="Stop after N sessions (of the whole schedule).")
@click.option("--cycle", is_flag=True, help="Reuse the input when it runs out (copies get ids ID#2, ID#3, ...).")
@click.option("--identical-copies", is_flag=True,
              help="Copies (--cycle, --target-rate) byte-identical to their original (default: new requests, "
                   "with another first word, so they do not hit the cache their original filled).")
@click.option("--warmup", type=int, default=0, metavar="N", help="Mark the first N sessions as warm-up.")
@click.option("--shard", metavar="K/N", help="Keep sessions K, K+N, K+2N, ... (1-based) of the schedule.")
@click.option("--start-at", type=float, metavar="EPOCH", help="Wall-clock start (Unix seconds) for the header.")
@click.option("--validate", is_flag=True, help="Fully validate every session (slower; default: a quick check).")
@click.option("-o", "--output", default="-", metavar="FILE", help="Write the schedule here (default stdout).")
@click.option("--stats", is_flag=True, help="Only print the summary (on stderr); write no schedule.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object (on stderr).")
@click.option("-q", "--quiet", is_flag=True, help="No summary on stderr.")
@click.option("--progress", is_flag=True, help="Show a progress bar on stderr even when it is not a terminal.")
def cli_command(files, seed, poisson, gamma, cv, constant, ramp, stages, onoff, replay, speedup, max_idle,
                target_rate, concurrency, ramp_up, rate_limit, duration, max_sessions, cycle, identical_copies, warmup,
                shard, start_at, validate, output, stats, as_json, quiet, progress):
    """Give each session its start time: an open-loop arrival process, the trace's own timestamps, or a
    closed loop. Reads sessions (JSONL, stdin by default), writes a schedule header and one
    scheduled_session per session. A summary (rate, gap CV, index of dispersion vs asked) goes to stderr."""
    cfg = make_config(seed=seed, poisson=poisson, gamma=gamma, cv=cv, constant=constant, ramp=ramp, stages=stages,
                      onoff=onoff, replay=replay or None, speedup=speedup, max_idle=max_idle,
                      target_rate=target_rate, concurrency=concurrency, ramp_up=ramp_up, rate_limit=rate_limit,
                      duration=duration, max_sessions=max_sessions, cycle=cycle, identical_copies=identical_copies,
                      warmup=warmup, shard=shard,
                      start_at=start_at, validate=validate)
    inp = Input(paths=list(files) or ["-"], validate=cfg.validate, keep=needs_rewind(cfg))
    sch = Scheduler(cfg, inp)
    bar = None
    if progress or sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_sessions, unit=" sessions", file=sys.stderr, disable=False, mininterval=0.5)
    for path in files:  # before the output exists: an input that cannot be opened leaves no header-only file
        if path != "-":
            open_input(path).close()
    writer = None if stats else Writer(output, flush_each=False)
    try:
        first = True
        for chunk in sch.run():
            if writer is not None:
                writer.write_raw(chunk)  # one chunk per read of the input: flushed as soon as it is written
                writer.fh.flush()
            if bar is not None:
                bar.update(chunk.count(b"\n") - (1 if first else 0))
            first = False
    except BrokenPipeError:
        # the reader went away (vk-schedule | head): not an error. (click would turn it into exit status 1.)
        _quiet_broken_pipe()
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    if quiet and not stats:
        return
    summary = sch.summary()
    if as_json:
        sys.stderr.write(orjson.dumps(summary).decode() + "\n")
    else:
        sys.stderr.write(format_summary(summary) + "\n")


def _seed_fits(seed: int) -> int:
    # the random streams take 64-bit seeds: a larger one would fail deep inside numpy
    if seed is not None and seed > 2**64 - 1:
        raise VkError(f"--seed: must be < 2**64, got {seed}")
    return seed


main = main_wrapper(cli_command, "vk-schedule")

if __name__ == "__main__":
    main()
