#!/usr/bin/env bash
# vk-eval examples: a report, SLO checks for CI, goodput, groups, SQL, plots, comparison and an HTML page.
# Run from the repository root with the venv on PATH (make demo does this); RUN is a vk-send output file.
set -euo pipefail
RUN=${1:-run.jsonl}
OUT=${OUT:-out/eval}
mkdir -p "$OUT"

# The readable report: every latency under its own name (ttft, ttfc, tpot, itl_chunk, itl_token, ...).
vk-eval "$RUN"

# Fail a CI job when an objective is missed (exit 1); bad input exits 2 with one line.
vk-eval "$RUN" --slo 'ttft:p90<500ms,tpot:p99<50ms,error_rate<1%' --check --format markdown > "$OUT/slo.md" \
  || echo "an SLO was missed: see $OUT/slo.md"

# Per-request objectives: attainment and goodput over the steady state (first 10 s and last 5 s left out).
vk-eval "$RUN" --goodput 'ttft<1s,tpot<60ms' --warmup 10s --cooldown 5s --json > "$OUT/summary.json"

# Group by prompt-length bucket (or any field of the records, e.g. a label added upstream).
vk-eval "$RUN" --group-by input_bucket --percentiles p50,p99

# SQL over the records: views requests, events, sessions, runs.
vk-eval sql 'SELECT status, count(*) AS n, round(quantile_cont(ttft, 0.99) * 1000, 1) AS ttft_p99_ms
             FROM requests GROUP BY status ORDER BY n DESC' "$RUN"
vk-eval sql 'SELECT tokens AS tokens_per_chunk, count(*) FROM events WHERE kind = $$c$$ GROUP BY 1 ORDER BY 1' \
  "$RUN" --db "$OUT/run.duckdb"   # the database stays for notebooks: duckdb out/eval/run.duckdb

# Figures and a self-contained HTML page to share.
vk-eval plot "$OUT/plots" "$RUN"
vk-eval report "$OUT" "$RUN" --slo 'ttft:p90<500ms'
echo "open $OUT/report.html"
