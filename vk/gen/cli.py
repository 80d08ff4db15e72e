"""vk-gen: sessions (DAGs of requests with exact-length content and output targets), synthetic or from traces."""

from __future__ import annotations

import itertools
import sys

import click

from vk.cli import command, examples, main_wrapper
from vk.errors import VkError

EPILOG = examples(
    "vk-gen --count 100 > sessions.jsonl                     # default: single requests, 512 in / 128 out",
    "vk-gen examples/gen-linear.yaml --seed 1 --count 500 -o sessions.jsonl",
    "vk-gen examples/gen-single.yaml --set input.length='{type: uniform, min: 100, max: 2000}'",
    "vk-gen examples/gen-prefix.yaml --tokenizer deepseek-v3 --set output.length.value=64",
    "vk-gen examples/gen-branching.yaml --dot | dot -Tpng > dag.png",
    "vk-gen examples/gen-branching.yaml --png dag.png",
    "vk-gen --trace trace.jsonl --flavor mooncake --stats",
    'vk-gen --scenario "N(480,240)/(300,150)" --scenario "D(100,1000)" --count 200 > sessions.jsonl',
    'vk-gen --scenario "E(512)" --set task.documents=16 --count 100 > embeddings.jsonl',
    "vk-gen synth.yaml | vk-schedule --poisson 10 | vk-send --api http://127.0.0.1:8000/v1 > run.jsonl",
)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


@command("vk-gen", epilog=EPILOG)
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), metavar="N",
              help="Random seed, 0 to 2**64-1 (default: the config's seed, else 0).")
@click.option("--count", type=click.IntRange(min=0), metavar="N",
              help="Number of sessions (default: the config's count, else 100 for synthetic workloads and every "
                   "row for traces; 0 = no limit).")
@click.option("--duration", type=float, metavar="S",
              help="Trace workloads: only sessions whose trace_time is within S seconds of the trace start.")
@click.option("--tokenizer", metavar="NAME", help="Tokenizer: built-in name (qwen2.5, deepseek-v3) or path.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override any config field (dotted path; value read as YAML). Repeatable.")
@click.option("-o", "--output", default="-", metavar="FILE", help="Write here instead of stdout.")
@click.option("--progress", is_flag=True, help="Progress bar on stderr even when it is not a terminal.")
@click.option("--dot", is_flag=True, help="Write the sessions' graphs as Graphviz text instead of records.")
@click.option("--png", metavar="FILE", help="Render the sessions' graphs to FILE with Graphviz (needs 'dot').")
@click.option("--trace", metavar="FILE", help="Sessions from a trace file (session_generator.type: trace).")
@click.option("--flavor", metavar="NAME", help="The trace's flavor (format), e.g. mooncake, claude_code, rag.")
@click.option("--stats", is_flag=True, help="Print a summary of the trace (with --trace) instead of sessions.")
@click.option("--scenario", "scenarios", multiple=True, metavar="S",
              help="A genai-bench scenario string: N(480,240)/(300,150), U(..), D(100,1000), E(1024), R(512,64), "
                   "I(1024,512[,n]), P(2000,500)/200. Repeatable: --count sessions of each, labelled (field scenario).")
def cli_command(config, seed, count, duration, tokenizer, overrides, output, progress, dot, png, trace, flavor,
                stats, scenarios):
    """Generate sessions: graphs of requests whose prompts have exactly the target number of tokens under
    the tokenizer, with output targets, think times and shared prefixes. Reads a YAML workload (none: single
    requests of 512 tokens with 128-token outputs), writes one session record per line."""
    from vk.gen.config import load_config
    from vk.gen.synth import generate, ignored_sections, trace_stats

    cfg = load_config(config)
    if flavor and not trace:
        raise VkError("--flavor goes with --trace FILE")
    if trace:
        from vk.jsonl import open_input

        if trace != "-":
            open_input(trace).close()  # missing, a directory or unreadable: one line before anything else
        sg: dict = {"type": "trace", "trace_file": trace}
        if flavor:
            sg["flavor"] = {"type": flavor}
        base = cfg.data.get("session_generator")
        if isinstance(base, dict) and str(base.get("type", "synthetic")).lower() != "trace":
            base = None  # a synthetic section says nothing about the trace
        cfg.data["session_generator"] = _deep_merge(base or {}, sg)
    ign = ignored_sections(cfg)
    if ign:
        print(f"vk-gen: note: ignoring {', '.join(ign)} (settings of other stages)", file=sys.stderr)
    if stats:
        print(trace_stats(cfg, overrides, seed=seed, tokenizer=tokenizer).rstrip("\n"))
        return
    show = progress or (sys.stderr.isatty() and not dot and not png)
    if (dot or png) and count is None:
        count = 1
    if (dot or png) and count == 0:
        raise VkError("--dot/--png need a number of sessions: --count N (at most 200)")
    sessions = generate(cfg, seed=seed, count=count, duration=duration, tokenizer=tokenizer,
                        overrides=overrides, progress=show, scenarios=scenarios)
    if dot or png:
        from vk.gen.graph import graph_to_dot, render_session_graph

        items = list(itertools.islice(sessions, 201))
        if len(items) > 200:
            raise VkError("--dot/--png draw at most 200 sessions: use --count")
        if png:
            path = render_session_graph(items[0] if len(items) == 1 else items, png)
            print(f"vk-gen: wrote {path}", file=sys.stderr)
        if dot:
            text = graph_to_dot(items[0] if len(items) == 1 else items)
            if output == "-":
                sys.stdout.write(text)
            else:
                try:
                    with open(output, "w", encoding="utf-8") as f:
                        f.write(text)
                except OSError as e:
                    raise VkError(f"{output}: cannot write ({e.strerror})") from None
        return
    from vk.jsonl import Writer

    try:
        with Writer(output, flush_each=(output == "-")) as w:
            for s in sessions:
                w.write(s)
    except BrokenPipeError:
        # the reader went away (vk-gen --count 0 | head): not an error. click would turn this into exit 1.
        _stdout_to_devnull()
        raise click.exceptions.Exit(0) from None


def _stdout_to_devnull() -> None:
    import os

    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
    except OSError:
        pass


main = main_wrapper(cli_command, "vk-gen")

if __name__ == "__main__":
    main()
