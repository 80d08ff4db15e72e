"""make bench: vk-schedule's speed (scheduled sessions per second, Poisson on single-request sessions).

Writes its own input (single-request chat sessions with ~1,000-character prompts) to a temporary directory and
runs the real command (``python -m vk.schedule.cli``) over it, output to a file, timing the whole process
(start-up included) on one core. Also reports the in-process engine rate and the cost of ``--validate``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import orjson

TARGET = 200_000  # scheduled sessions per second, one core

_WORDS = ("the whale ship sea captain harpoon deck crew ocean voyage white storm sail mast island wind "
          "boat line rope oil cabin night watch").split()


def make_sessions(path: str, n: int) -> None:
    """n single-request chat sessions, each with a prompt of about 1,000 characters (1,000 distinct prompts)."""
    import random

    rnd = random.Random(0)
    prompts = []
    for _ in range(1000):
        words: list[str] = []
        size = 0
        while size < 1000:
            w = _WORDS[rnd.randrange(len(_WORDS))]
            words.append(w)
            size += len(w) + 1
        prompts.append(" ".join(words))
    with open(path, "wb") as f:
        buf = []
        for i in range(n):
            sess = {"kind": "session", "v": 1, "id": f"s{i:07d}",
                    "requests": [{"id": "r0", "parents": [],
                                  "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                                  "input_tokens": 200, "output_tokens": 128}],
                    "source": {"generator": "bench", "seed": 0, "row": i}}
            buf.append(orjson.dumps(sess))
            if len(buf) >= 10_000:
                f.write(b"\n".join(buf) + b"\n")
                buf = []
        if buf:
            f.write(b"\n".join(buf) + b"\n")


def _run_cli(args: list[str], stdin=None) -> tuple[float, float]:
    """Run vk-schedule; (wall seconds, CPU seconds user+sys of the process), start-up included."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "vk.schedule.cli", *args], stdin=stdin or subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"vk-schedule {' '.join(args)} failed: {err.decode()[-500:]}")
    return wall, ru.ru_utime + ru.ru_stime


def _one_core() -> None:
    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    except (AttributeError, OSError):
        pass


def run(quick: bool = False) -> list[dict]:
    n = 20_000 if quick else 500_000
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="vk-schedule-bench-") as d:
        src = os.path.join(d, "sessions.jsonl")
        out = os.path.join(d, "schedule.jsonl")
        make_sessions(src, n)
        mb = os.path.getsize(src) / 1e6
        # the command, as a user runs it (process start-up included), pinned to one core
        prev = None
        try:
            prev = os.sched_getaffinity(0)
            _one_core()
        except (AttributeError, OSError):
            pass
        try:
            runs = [_run_cli([src, "--poisson", "1000", "--seed", "1", "-q", "-o", out])
                    for _ in range(1 if quick else 2)]
            wall = min(r[0] for r in runs)
            cpu = min(r[1] for r in runs)
            rows.append({"figure": f"--poisson FILE -o FILE, {n:,} 1-request sessions ({mb:.0f} MB), "
                                   "per CPU-s (user+sys, incl. start-up)",
                         "value": f"{n / cpu:,.0f} sessions/s", "target": f">= {TARGET:,} sessions/s",
                         "ok": None if quick else n / cpu >= TARGET})
            rows.append({"figure": "--poisson FILE -o FILE, wall clock, one pinned core (noisy when shared)",
                         "value": f"{n / wall:,.0f} sessions/s", "target": "-", "ok": None})
            with open(src, "rb") as fh:
                r = os.pipe()
                # piped input (vk-gen | vk-schedule): read in whatever chunks the pipe has, flushed per chunk
                feeder = subprocess.Popen(["cat"], stdin=fh, stdout=r[1])
                os.close(r[1])
                with os.fdopen(r[0], "rb") as pipe_in:
                    wall, cpu = _run_cli(["--poisson", "1000", "--seed", "1", "-q", "-o", out], stdin=pipe_in)
                feeder.wait()
            rows.append({"figure": "--poisson, input from a pipe (cat FILE |), per CPU-s",
                         "value": f"{n / cpu:,.0f} sessions/s", "target": "-", "ok": None})
            # in-process engine rate (no interpreter start-up, output discarded)
            from vk.schedule.core import Input, Scheduler, make_config

            cfg = make_config(poisson=1000, seed=1)
            t = time.process_time()
            with open(os.devnull, "wb") as sink:
                for chunk in Scheduler(cfg, Input(paths=[src])).run():
                    sink.write(chunk)
            dt = time.process_time() - t
            rows.append({"figure": "engine in-process (no start-up, output discarded), per CPU-s",
                         "value": f"{n / dt:,.0f} sessions/s", "target": "-", "ok": None})
            if not quick:
                _, cpu = _run_cli([src, "--poisson", "1000", "--seed", "1", "-q", "--validate", "-o", out])
                rows.append({"figure": "--poisson --validate (full session validation), per CPU-s",
                             "value": f"{n / cpu:,.0f} sessions/s", "target": "-", "ok": None})
                _, cpu = _run_cli([src, "--concurrency", "64", "-q", "-o", out])
                rows.append({"figure": "--concurrency 64 (closed loop), per CPU-s",
                             "value": f"{n / cpu:,.0f} sessions/s", "target": "-", "ok": None})
        finally:
            if prev is not None:
                os.sched_setaffinity(0, prev)
        # memory stays flat: peak RSS of a run over the whole file
        if not quick:
            rss = _peak_rss_mb([src, "--poisson", "1000", "-q", "-o", out])
            if rss is not None:
                rows.append({"figure": f"peak RSS over {mb:.0f} MB of input",
                             "value": f"{rss:.0f} MB", "target": "flat (< 100 MB)", "ok": rss < 100})
    return rows


def _peak_rss_mb(args: list[str]) -> float | None:
    """Peak resident memory (VmHWM) of a vk-schedule process, read from /proc just before it exits."""
    code = ("import sys\nfrom vk.schedule.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "for ln in open('/proc/self/status'):\n"
            "    if ln.startswith('VmHWM:'):\n        print(int(ln.split()[1]), file=sys.stderr)\n")
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True)
    try:
        return int(p.stderr.decode().strip().splitlines()[-1]) / 1024
    except (ValueError, IndexError):
        return None


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(f"{row['figure']:<70} {row['value']:>22}  {row['target']:<24} {row['ok']}")
