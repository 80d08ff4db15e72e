"""``make bench``: the speed and accuracy figures the issues name, measured on this machine, as a table.

Each stage has ``vk/<stage>/bench.py`` with ``run(quick=False) -> list[dict]`` rows
``{"figure", "value", "target", "ok"}``. This module runs them one after another (so they do not compete for the
two cores), prints one table with the date and the machine, and optionally writes it as Markdown for the README.

    python -m vk.bench                 # everything
    python -m vk.bench --only send     # one stage
    python -m vk.bench --quick         # a smoke run of every benchmark (seconds, not figures to quote)
    python -m vk.bench --markdown FILE # also write the table as Markdown
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import sys
import time
import traceback

STAGES = [
    ("gen", "vk.gen.bench"),
    ("traces", "vk.gen.traces.bench"),
    ("schedule", "vk.schedule.bench"),
    ("serve", "vk.serve.bench"),
    ("send", "vk.send.bench"),
    ("ray", "vk.send.bench_ray"),
    ("eval", "vk.eval.bench"),
    ("sweep", "vk.sweep.bench"),
]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            mem = f", {kb / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} cores ({cpu}){mem}, Python {platform.python_version()}, {platform.system()}"


def run_all(only: list[str] | None = None, quick: bool = False) -> list[tuple[str, dict]]:
    rows: list[tuple[str, dict]] = []
    for stage, module in STAGES:
        if only and stage not in only:
            continue
        t0 = time.monotonic()
        print(f"== {stage} ...", file=sys.stderr, flush=True)
        try:
            mod = importlib.import_module(module)
            for row in mod.run(quick=quick):
                rows.append((stage, row))
        except Exception as e:  # noqa: BLE001 - one failing benchmark must not hide the others
            traceback.print_exc(file=sys.stderr)
            rows.append((stage, {"figure": "benchmark failed", "value": f"{type(e).__name__}: {e}",
                                 "target": "", "ok": False}))
        print(f"== {stage} done in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return rows


def _mark(ok) -> str:
    return "" if ok is None else ("yes" if ok else "NO")


def format_table(rows: list[tuple[str, dict]]) -> str:
    head = ("stage", "figure", "value", "target", "met")
    body = [(s, r["figure"], str(r["value"]), str(r.get("target", "")), _mark(r.get("ok"))) for s, r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths, strict=True)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


def format_markdown(rows: list[tuple[str, dict]], stamp: str) -> str:
    out = [stamp, "", "| stage | figure | measured | asked for | met |", "|---|---|---|---|---|"]
    for s, r in rows:
        out.append(f"| {s} | {r['figure']} | {r['value']} | {r.get('target', '')} | {_mark(r.get('ok'))} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vk.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=[s for s, _ in STAGES], help="run only this stage")
    ap.add_argument("--quick", action="store_true", help="smoke-run every benchmark with tiny sizes")
    ap.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown")
    args = ap.parse_args(argv)
    stamp = f"Measured {datetime.date.today().isoformat()} on {machine()}."
    rows = run_all(args.only, args.quick)
    print(stamp)
    print(format_table(rows))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_markdown(rows, stamp))
    return 1 if any(r.get("figure") == "benchmark failed" for _, r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
