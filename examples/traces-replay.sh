#!/usr/bin/env bash
# Replay a trace against vk-serve: the trace's shape, then the run. Run from the repository root.
# vk-serve listens on a free port; everything the run writes goes to $VK_OUT (default out/traces-replay).
# Usage: examples/traces-replay.sh [TRACE.jsonl] [FLAVOR]
set -euo pipefail
TRACE=${1:-tests/data/traces/mooncake_head200.jsonl}
FLAVOR=${2:-mooncake}
out=${VK_OUT:-out/traces-replay}
mkdir -p "$out"
rm -f "$out/serve.url"
vk-gen --trace "$TRACE" --flavor "$FLAVOR" --stats
vk-serve --port 0 --ttft 0.02 --tpot 0.002 > "$out/serve.url" 2> "$out/serve.log" &
SERVE=$!
trap 'kill "$SERVE" 2>/dev/null || true; wait "$SERVE" 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do   # the server prints its URL once it accepts connections
  [ -s "$out/serve.url" ] && break
  kill -0 "$SERVE" 2>/dev/null || { cat "$out/serve.log" >&2; exit 1; }
  sleep 0.1
done
url=$(head -n 1 "$out/serve.url")
vk-gen --trace "$TRACE" --flavor "$FLAVOR" --count 50 \
  | vk-schedule --replay --speedup 10 --max-idle 1 \
  | vk-send --api "$url" -o "$out/run.jsonl"
vk-eval "$out/run.jsonl"
