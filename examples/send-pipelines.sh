#!/usr/bin/env bash
# vk-send examples: run from the repository root with the venv on PATH (make install; . .venv/bin/activate).
# Starts vk-serve on a free port, runs a few vk-send variants against it, and stops the server.
set -euo pipefail
out=${OUT:-out/send-examples}
mkdir -p "$out"

vk-serve --port 0 --ttft 0.05 --tpot 0.01 --server-timestamps > "$out/serve.url" 2> "$out/serve.log" &
serve_pid=$!
trap 'kill $serve_pid 2>/dev/null' EXIT
for _ in $(seq 300); do [ -s "$out/serve.url" ] && break; sleep 0.1; done
api=$(head -1 "$out/serve.url")

# 1. open loop: a hand-written schedule (header + scheduled sessions) straight from a file
vk-send examples/send-schedule.jsonl --api "$api" --workers 1 --save-text -o "$out/open.jsonl"

# 2. plain sessions (no schedule): a closed loop of 4 sessions at a time
grep -v '"kind":"schedule"' examples/send-schedule.jsonl | \
  python3 -c 'import sys, json; [print(json.dumps(json.loads(l)["session"])) for l in sys.stdin]' | \
  vk-send --api "$api" --concurrency 4 --workers 1 -o "$out/closed.jsonl"

# 3. exact per-event token counts and a stop rule for hopeless runs
vk-send examples/send-schedule.jsonl --api "$api" --continuous-usage --max-errors 0.2 -o "$out/usage.jsonl"

# the last line of each run is its footer: totals, dispatch-lag verdict, why it ended
tail -n 1 "$out/open.jsonl"
