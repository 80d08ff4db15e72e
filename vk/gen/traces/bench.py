"""Trace conversion figures for ``make bench``: rows/s and memory on large synthesized traces.

The traces are synthesized from real ones (the whole Mooncake FAST'25 conversation trace when
``../shared/data/traces`` is there, else the slice in ``tests/data/traces``; the Azure 2023 slice): copies one
after another, timestamps shifted and hash ids offset per copy, so that each copy keeps the real prefix-reuse
structure. Memory is measured in a fresh process converting a million-row trace to /dev/null: the peak RSS
(``resource.getrusage``) and the growth of the resident set during the conversion, after the tokenizer and the
corpus are loaded (flat memory: no growth in one pass; a few dozen bytes a row in the indexed mode).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT / "tests" / "data" / "traces"


def _synth_mooncake(src: Path, dst: Path, rows: int) -> None:
    base = [orjson.loads(x) for x in src.read_bytes().splitlines() if x.strip()]
    span = base[-1]["timestamp"] - base[0]["timestamp"] + 1000
    top = max(max(r["hash_ids"]) for r in base) + 1
    with open(dst, "wb") as f:
        n = 0
        copy = 0
        while n < rows:
            for r in base:
                if n >= rows:
                    break
                ids = [h if h == 0 else h + copy * top for h in r["hash_ids"]]
                f.write(orjson.dumps({"timestamp": r["timestamp"] + copy * span, "input_length": r["input_length"],
                                      "output_length": r["output_length"], "hash_ids": ids}) + b"\n")
                n += 1
            copy += 1


def _synth_light(dst: Path, rows: int) -> None:
    """A million-row mooncake-like trace with short prompts (1-2 blocks of 32 tokens): per-row cost, not text."""
    import numpy as np

    rng = np.random.default_rng(1)
    k = rng.integers(1, 3, size=rows)
    last = rng.integers(1, 33, size=rows)
    out = rng.integers(1, 200, size=rows)
    reuse = rng.random(size=rows) < 0.3
    with open(dst, "wb") as f:
        nid = 1
        buf = []
        for i in range(rows):
            if k[i] == 1:
                ids = [0]
            else:
                ids = [0, int(rng.integers(1, nid + 1)) if reuse[i] else nid + 1]
                nid += 1
            buf.append(orjson.dumps({"timestamp": i * 7, "input_length": int(32 * (k[i] - 1) + last[i]),
                                     "output_length": int(out[i]), "hash_ids": ids}))
            if len(buf) >= 10000:
                f.write(b"\n".join(buf) + b"\n")
                buf = []
        if buf:
            f.write(b"\n".join(buf) + b"\n")


def _synth_azure(src: Path, dst: Path, rows: int) -> None:
    lines = src.read_text().splitlines()
    header, body = lines[0], lines[1:]
    import datetime as dt

    t0 = dt.datetime.fromisoformat(body[0].split(",")[0][:26])
    t1 = dt.datetime.fromisoformat(body[-1].split(",")[0][:26])
    span = (t1 - t0) + dt.timedelta(seconds=1)
    with open(dst, "w") as f:
        f.write(header + "\n")
        n = 0
        copy = 0
        while n < rows:
            for ln in body:
                if n >= rows:
                    break
                ts, a, b = ln.split(",")
                t = dt.datetime.fromisoformat(ts[:26]) + copy * span
                f.write(f"{t.isoformat(sep=' ')},{a},{b}\n")
                n += 1
            copy += 1


def _convert_rate(path: Path, flavor: dict, tok) -> tuple[float, int, float]:
    from vk.gen import traces
    from vk.jsonl import dumps

    cfg = {"session_generator": {"type": "trace", "trace_file": str(path), "flavor": flavor}}
    list(traces.generate(cfg, seed=1, count=2, tokenizer=tok, warnings=[]))  # warm: corpus, tokenizer
    t = time.perf_counter()
    n = 0
    size = 0
    for s in traces.generate(cfg, seed=1, tokenizer=tok, warnings=[]):
        size += len(dumps(s))
        n += 1
    dt = time.perf_counter() - t
    return n / dt, n, size / dt


_MEM_SCRIPT = r"""
import resource, sys
from vk.gen import traces
from vk.jsonl import dumps
from vk.tokenizer import load_tokenizer

def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0

tok = load_tokenizer()
cfg = {"session_generator": {"type": "trace", "trace_file": sys.argv[1], "flavor": {"type": "mooncake", "block_size": 32},
       "max_rows": int(sys.argv[2]), "shuffle": sys.argv[3] == "1"}}
list(traces.generate(dict(cfg, session_generator=dict(cfg["session_generator"], shuffle=False)), seed=1, count=1,
                     tokenizer=tok, warnings=[]))  # load the tokenizer and the corpus first
base = rss_mb()
top = base
with open(__import__("os").devnull, "wb") as out:
    for i, s in enumerate(traces.generate(cfg, seed=1, tokenizer=tok, warnings=[])):
        out.write(dumps(s))
        if i % 20000 == 0:
            top = max(top, rss_mb())
top = max(top, rss_mb())
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, top - base)
"""


def _peak_rss_mb(path: Path, rows: int, shuffle: bool = False) -> tuple[float, float, float]:
    """(peak RSS MB, RSS growth MB during the conversion after start-up, seconds) in a fresh process."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, str(path), str(rows), "1" if shuffle else "0"],
                       capture_output=True, text=True, cwd=str(ROOT))
    if p.returncode != 0:
        raise RuntimeError(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "memory probe failed")
    peak, growth = (float(x) for x in p.stdout.strip().splitlines()[-1].split())
    return peak, growth, time.perf_counter() - t


def run(quick: bool = False) -> list[dict]:
    from vk.tokenizer import load_tokenizer

    tok = load_tokenizer()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="vk-trace-bench-") as d:
        d = Path(d)
        mc = d / "mooncake.jsonl"
        n_mc = 200 if quick else 20000
        real = ROOT.parent / "shared" / "data" / "traces" / "mooncake_conversation_trace.jsonl"
        _synth_mooncake(real if real.is_file() else DATA / "mooncake_head200.jsonl", mc, n_mc)
        rate, n, bps = _convert_rate(mc, {"type": "mooncake"}, tok)
        rows.append({"figure": f"mooncake conversion ({n} rows, ~14k-token prompts, 512-token hash blocks)",
                     "value": f"{rate:,.0f} rows/s ({bps / 1e6:.0f} MB/s of sessions)", "target": ">= 1,000 rows/s",
                     "ok": None if quick else rate >= 1000})
        az = d / "azure.csv"
        n_az = 1000 if quick else 100000
        _synth_azure(DATA / "azure2023_head200.csv", az, n_az)
        rate, n, bps = _convert_rate(az, {"type": "azure"}, tok)
        rows.append({"figure": f"azure conversion ({n} rows, CSV by column name)",
                     "value": f"{rate:,.0f} rows/s", "target": ">= 5,000 rows/s", "ok": None if quick else rate >= 5000})
        from vk.gen import traces

        t = time.perf_counter()
        st = traces.stats_dict({"session_generator": {"type": "trace", "trace_file": str(mc), "flavor": "mooncake"}})
        dt = time.perf_counter() - t
        rows.append({"figure": f"--stats on the mooncake trace ({st['requests']} rows)",
                     "value": f"{st['requests'] / dt:,.0f} rows/s (cache share {100 * st['cache_share']:.1f}%)",
                     "target": ">= 10,000 rows/s", "ok": None if quick else st["requests"] / dt >= 10000})
        big = d / "light.jsonl"
        n_big = 5000 if quick else 1_000_000
        _synth_light(big, n_big)
        if quick:  # one probe: the figures need the full run
            mem, growth, secs = _peak_rss_mb(big, n_big)
            rows.append({"figure": f"memory converting {n_big:,} rows", "value": f"peak {mem:.0f} MB, +{growth:.0f} MB",
                         "target": "flat: < +50 MB for 1M rows", "ok": None})
        else:
            mem, growth, secs = _peak_rss_mb(big, n_big)
            rows.append({"figure": f"memory converting {n_big:,} rows (one pass)",
                         "value": f"peak RSS {mem:.0f} MB, +{growth:.0f} MB during the run ({n_big / secs:,.0f} rows/s)",
                         "target": "flat: < +50 MB", "ok": growth < 50})
            # the indexed mode (shuffle, wrap, multi-turn grouping) keeps a few numbers per row
            mem, growth, secs = _peak_rss_mb(big, n_big, shuffle=True)
            per_row = growth * 1024 * 1024 / n_big
            rows.append({"figure": f"memory with shuffle (indexed mode), {n_big:,} rows",
                         "value": f"peak RSS {mem:.0f} MB, +{growth:.0f} MB ({per_row:.0f} bytes/row; "
                                  f"{n_big / secs:,.0f} rows/s)",
                         "target": "< 100 bytes/row", "ok": per_row < 100})
        try:
            os.unlink(big)
        except OSError:
            pass
    return rows


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    for r in run(ap.parse_args().quick):
        print(f"{r['figure']:<70} {r['value']:<50} {r['target']:<20} {r['ok']}")
