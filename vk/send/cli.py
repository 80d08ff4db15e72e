"""vk-send: run a schedule against an OpenAI-compatible API and write one response record per request."""

from __future__ import annotations

import os
import sys

import click
import orjson

from vk.cli import command, examples, main_wrapper
from vk.errors import VkError
from vk.jsonl import open_input, read_records, source_name
from vk.records import API_STYLES
from vk.send.inputs import first_due, peak_starts, read_input
from vk.send.options import read_api_key_file, redact_argv
from vk.send.run import (
    DEFAULT_FIRST_BYTE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_LAG_THRESHOLD,
    DEFAULT_TIMEOUT,
    send,
)
from vk.send.scrape import DEFAULT_SCRAPE_INTERVAL

# exit statuses (man vk-send: EXIT STATUS); 2 is bad input (vk.errors), 74 a full disk (vk.jsonl.EXIT_NO_SPACE)
EXIT_STATUS = {"max_errors": 1, "worker_lost": 3, "unreachable": 4, "interrupted": 130}

EPILOG = examples(
    "vk-gen synth.yaml | vk-schedule --poisson 10 | vk-send --api http://127.0.0.1:8000/v1 > run.jsonl",
    "vk-send sched.jsonl --api http://127.0.0.1:8000/v1 -o run.jsonl --workers 1 --progress",
    "vk-gen chat.yaml | vk-send --api http://127.0.0.1:8000/v1 --concurrency 8 -o run.jsonl",
    "vk-send sched.jsonl --api https://api.example.com/v1 --model my-model -H 'X-Team: bench' \\",
    "        --extra-body '{\"temperature\": 0}' --max-errors 0.2 -o run.jsonl",
    "vk-send sched.jsonl --api https://api.anthropic.com --api-style anthropic --model claude-sonnet-4-5 \\",
    "        -o anthropic.jsonl   # key from $ANTHROPIC_API_KEY",
)


def _is_file(p: str) -> bool:
    return p != "-" and os.path.isfile(p)


@command("vk-send", epilog=EPILOG)
@click.argument("schedule", nargs=-1, metavar="[SCHEDULE]...")
@click.option("--api", required=True, metavar="URL", help="Base URL of the API, e.g. http://127.0.0.1:8000/v1.")
@click.option("-o", "--output", default="-", metavar="FILE", show_default=True, help="Write records here.")
@click.option("--model", default=None, help="Model name [default: first id from GET {api}/models].")
@click.option("--api-style", type=click.Choice(API_STYLES),
              default="openai", show_default=True,
              help="The API's protocol (request, authentication, stream format); see man vk-send, API STYLES.")
@click.option("--endpoint", type=click.Choice(["chat", "completions", "invoke"]), default="chat", show_default=True,
              help="chat: /chat/completions with messages; completions: /completions with a prompt; invoke: "
                   "Bedrock's InvokeModelWithResponseStream (--api-style bedrock).")
@click.option("--stream/--no-stream", default=True, show_default=True, help="Stream the responses (SSE).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes, each with its own event loop [default: one per core].")
@click.option("--concurrency", type=click.IntRange(min=1), default=None,
              help="Sessions kept active when the input is plain sessions (no schedule) [default: 1]; "
                   "overrides a closed-loop schedule's concurrency.")
@click.option("--api-key", default=None, metavar="KEY",
              help="Bearer token [default: $VK_API_KEY, else $OPENAI_API_KEY]. Never written to any record; "
                   "prefer --api-key-file or the environment (a command line is visible to every user in ps).")
@click.option("--api-key-file", default=None, metavar="FILE", help="Read the bearer token from FILE's first line.")
@click.option("-H", "--header", "headers", multiple=True, metavar="'NAME: VALUE'",
              help="Extra HTTP header (repeatable).")
@click.option("--extra-body", default=None, metavar="JSON", help="JSON object merged into every request body.")
@click.option("--timeout", type=click.FloatRange(min=0), default=DEFAULT_TIMEOUT, show_default=True, metavar="S",
              help="Total time allowed per request (0: none).")
@click.option("--first-byte-timeout", type=click.FloatRange(min=0), default=DEFAULT_FIRST_BYTE_TIMEOUT, show_default=True,
              metavar="S", help="Time allowed until the first response byte (0: none).")
@click.option("--idle-timeout", type=click.FloatRange(min=0), default=DEFAULT_IDLE_TIMEOUT, show_default=True,
              metavar="S", help="Time allowed between two reads of a response, after its first byte (0: none).")
@click.option("--cacert", default=None, metavar="FILE", type=click.Path(exists=True, dir_okay=False),
              help="https: verify the server with the CA certificates in FILE (PEM) instead of the system's.")
@click.option("--insecure", is_flag=True, help="https: do not verify the server's certificate.")
@click.option("--max-errors", default=None, metavar="N|FRACTION",
              help="Stop the run once N requests failed, or once more than FRACTION of the attempted ones did "
                   "(after 20).")
@click.option("--save-text", is_flag=True, help="Keep the returned text in each record (field 'text').")
@click.option("--continuous-usage", is_flag=True,
              help="Ask for usage on every chunk (stream_options.continuous_usage_stats) for exact per-event "
                   "token counts.")
@click.option("--max-tokens-param", default="max_tokens", show_default=True, metavar="NAME",
              help="Body field for the output limit (e.g. max_completion_tokens; '' to omit).")
@click.option("--min-tokens-param", default="min_tokens", show_default=True, metavar="NAME",
              help="Body field for the minimum output length ('' to omit).")
@click.option("--ignore-eos-param", default="ignore_eos", show_default=True, metavar="NAME",
              help="Body field for ignore-EOS ('' to omit).")
@click.option("--client", type=click.Choice(["raw", "aiohttp", "httpx"]), default="raw", show_default=True,
              help="HTTP client: raw sockets with kernel receive timestamps, or aiohttp / httpx.")
@click.option("--http2", is_flag=True, help="Use HTTP/2 (through httpx; refused with another --client).")
@click.option("--no-kernel-timestamps", is_flag=True,
              help="Time events when Python reads them instead of when the kernel received them.")
@click.option("--lag-threshold", type=click.FloatRange(min=0), default=DEFAULT_LAG_THRESHOLD, show_default=True, metavar="S",
              help="p99 dispatch lag above which the run is flagged as lagged.")
@click.option("--progress", is_flag=True, help="Show a progress bar on stderr even when it is not a terminal.")
@click.option("--reassign-lost", is_flag=True,
              help="When a worker process is lost, hand its sessions that have not started and are still due to "
                   "the other workers (default: count them as not started).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="auto", default=None, metavar="[ADDRESS]",
              help="Run the workers on a Ray cluster: auto (this node's cluster), HOST:PORT or ray://HOST:10001 "
                   "(needs pip install 'vk[ray]').")
@click.option("--workers-per-node", type=click.IntRange(min=1), default=None, metavar="N",
              help="With --ray: workers on each node [default: the node's CPUs].")
@click.option("--scrape", is_flag=False, flag_value="", default=None, metavar="[URL]",
              help="Record the server's Prometheus metrics (server_metric records) [URL default: the API's "
                   "origin + /metrics].")
@click.option("--scrape-interval", type=click.FloatRange(min=0.05), default=DEFAULT_SCRAPE_INTERVAL,
              show_default=True, metavar="S", help="Seconds between scrapes (on the run's clock).")
@click.option("--scrape-buckets", is_flag=True, help="Keep histogram buckets (default: only their _sum, _count).")
def cli_command(schedule, api, output, model, endpoint, stream, workers, concurrency, api_key, api_key_file,
                headers,
                extra_body, timeout, first_byte_timeout, max_errors, save_text, continuous_usage,
                max_tokens_param, min_tokens_param, ignore_eos_param, client, http2, no_kernel_timestamps,
                lag_threshold, progress, reassign_lost, idle_timeout, cacert, insecure, scrape, scrape_interval,
                scrape_buckets, ray_address, workers_per_node, api_style):
    """Run a schedule of sessions against an OpenAI-compatible API (or another: --api-style).

    Reads a schedule (a schedule header and scheduled sessions, from vk-schedule) or plain sessions (from
    vk-gen) from SCHEDULE files or stdin, and writes a run header, one response record per request and a run_end
    footer. Open loop: every session starts at its offset from the run start. Closed loop: N sessions are kept
    active. Exit status: 0 done, 1 stopped by --max-errors, 2 bad input or options, 3 a worker process was
    lost, 4 no request reached the server, 74 no space left for the output, 130 interrupted.
    """
    if api_key and api_key_file:
        raise VkError("--api-key and --api-key-file: give one")
    if api_key_file:
        api_key = read_api_key_file(api_key_file)
    _hide_secrets_from_ps(api_key)
    paths = list(schedule) or ["-"]
    if http2 and client != "httpx" and click.get_current_context().get_parameter_source("client") not in (
            click.core.ParameterSource.DEFAULT, None):
        raise VkError(f"--http2 runs the httpx client: drop --client {client}, or say --client httpx")
    if ray_address and os.path.exists(ray_address):
        raise VkError(f"--ray: {ray_address!r} is a file, not a cluster address (write --ray=ADDRESS, or put --ray "
                      "after the input files)")
    if workers_per_node is not None and ray_address is None:
        raise VkError("--workers-per-node: only with --ray (locally, say --workers)")
    if scrape and not scrape.startswith(("http://", "https://")):
        raise VkError(f"--scrape: expected an http(s) URL, got {scrape!r} (write --scrape=URL, or put --scrape "
                      "after the input files)")
    body = None
    if extra_body:
        try:
            body = orjson.loads(extra_body)
        except orjson.JSONDecodeError as e:
            raise VkError(f"--extra-body: not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise VkError("--extra-body: expected a JSON object")
    for p in paths:  # a missing or unreadable file is an error before the first request, not after the others
        if p != "-":
            open_input(p).close()
    total = peak = None
    if all(_is_file(p) for p in paths):
        # check the whole schedule before the first request, as the run will read it; count its sessions (so
        # that a stopped run's footer counts those it never read) and the busiest 10 s of an open loop
        _, mode, _, sessions, _ = read_input((r for _, _, r in read_records(paths)), False, source_name(paths[0]),
                                             concurrency)  # read_records validated each record (exact file:line)
        total = 0
        starts = []
        for ss in sessions:
            total += 1
            if mode == "open":
                starts.append(first_due(ss))
        if total == 0:
            raise VkError(f"{source_name(paths[0])}: no sessions in the input")
        peak = peak_starts(starts) if starts else None
        recs = (r for _, _, r in read_records(paths, validate=False))
        validate = False
    else:
        recs = (r for _, _, r in read_records(paths, ("schedule", "scheduled_session", "session")))
        validate = False
    progress = progress or sys.stderr.isatty()
    end = send(
        recs, api=api, output=output, model=model, endpoint=endpoint, stream=stream, workers=workers,
        api_key=api_key, headers=headers, extra_body=body, timeout=timeout, first_byte_timeout=first_byte_timeout,
        idle_timeout=idle_timeout, cacert=cacert, insecure=insecure,
        max_errors=max_errors, save_text=save_text, progress=progress, argv=sys.argv[1:],
        continuous_usage=continuous_usage, max_tokens_param=max_tokens_param, min_tokens_param=min_tokens_param,
        ignore_eos_param=ignore_eos_param, client=client, http2=http2, kernel_timestamps=not no_kernel_timestamps,
        lag_threshold=lag_threshold, concurrency=concurrency, validate=validate,
        source=source_name(paths[0]), reassign_lost=reassign_lost, total_sessions=total, peak_sessions=peak,
        scrape=scrape, scrape_interval=scrape_interval, scrape_buckets=scrape_buckets,
        ray=ray_address, workers_per_node=workers_per_node, api_style=api_style,
    )
    code = EXIT_STATUS.get(end["ended"], 0)
    if end["ended"] == "complete" and end.get("sessions_scheduled") == 0:  # e.g. an empty pipe
        print(f"vk-send: {source_name(paths[0])}: no sessions in the input", file=sys.stderr)
        code = 2
    if end["ended"] in ("max_errors", "unreachable"):
        print(f"vk-send: stopped early: {end['reason']}" if end["ended"] == "max_errors" else
              f"vk-send: {end['reason']}", file=sys.stderr)
    if code:
        sys.exit(code)


def _hide_secrets_from_ps(api_key: str | None) -> None:
    """Show the command line without its secrets in ps (the workers are forked: they would show it too)."""
    argv = sys.argv[1:]
    shown = redact_argv(argv, [api_key])
    if shown == argv:
        return
    try:
        import setproctitle
    except ImportError:  # pragma: no cover - a dependency; ps then shows what the user typed
        return
    setproctitle.setproctitle(" ".join(["vk-send", *shown]))


main = main_wrapper(cli_command, "vk-send")

if __name__ == "__main__":
    main()
