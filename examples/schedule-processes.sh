#!/usr/bin/env bash
# The arrival processes of vk-schedule side by side: the same sessions, each process's summary (achieved rate,
# gap CV, index of dispersion, against what was asked). Only the summaries are printed (--stats).
# Usage: examples/schedule-processes.sh [SESSIONS.jsonl]   (default: 2000 sessions from examples/demo.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."
sessions=${1:-}
if [ -z "$sessions" ]; then
  sessions=$(mktemp --suffix .jsonl)
  trap 'rm -f "$sessions"' EXIT
  vk-gen examples/demo.yaml --seed 1 --count 2000 > "$sessions"
fi
run() { echo "== vk-schedule $*" >&2; vk-schedule "$sessions" --cycle "$@" --stats; echo >&2; }
run --poisson 10 --duration 3600
run --gamma 10 --cv 3 --duration 3600          # bursty renewal: dispersion ~ CV^2 = 9
run --constant 10 --duration 3600              # CV 0
run --ramp 1:20:600                            # 1 -> 20 sessions/s over 10 minutes
run --stages "5:120,0:60,20:120"               # 2 minutes at 5/s, a silent minute, 2 minutes at 20/s
run --onoff 40:1:5:20 --duration 3600          # bursts of 40/s, ~5 s on, ~20 s at 1/s
