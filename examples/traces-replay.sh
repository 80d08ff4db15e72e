#!/usr/bin/env bash
# Replay a trace against vk-serve: the trace's shape, then the run. Run from the repository root.
set -euo pipefail
TRACE=${1:-tests/data/traces/mooncake_head200.jsonl}
FLAVOR=${2:-mooncake}
vk-gen --trace "$TRACE" --flavor "$FLAVOR" --stats
vk-serve --port 8411 --ttft 0.02 --tpot 0.002 > /tmp/vk-serve.url &
SERVE=$!
trap 'kill $SERVE' EXIT
sleep 2
vk-gen --trace "$TRACE" --flavor "$FLAVOR" --count 50 \
  | vk-schedule --replay --speedup 10 --max-idle 1 \
  | vk-send --api http://127.0.0.1:8411/v1 > /tmp/traces-run.jsonl
vk-eval /tmp/traces-run.jsonl
