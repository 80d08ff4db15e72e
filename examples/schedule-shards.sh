#!/usr/bin/env bash
# One schedule, N senders: vk-schedule --shard K/N keeps every N-th session (by schedule index), so the shards of
# the same input, options and seed partition the schedule exactly; --start-at makes all senders start together.
# Usage: examples/schedule-shards.sh SESSIONS.jsonl API_URL [N]
set -euo pipefail
sessions=${1:?sessions file}
api=${2:?API base URL, e.g. http://127.0.0.1:8000/v1}
n=${3:-4}
rate=${VK_RATE:-40}          # sessions/s of the whole schedule
duration=${VK_DURATION:-300}
out=${VK_OUT:-out/shards}
mkdir -p "$out"
start=$(( $(date +%s) + 10 ))   # everyone starts 10 s from now (on N machines: agree on this number)
for k in $(seq 1 "$n"); do
  vk-schedule "$sessions" --poisson "$rate" --duration "$duration" --cycle --seed 1 --shard "$k/$n" --start-at "$start" -q \
    -o "$out/schedule-$k.jsonl"
done
for k in $(seq 1 "$n"); do
  vk-send --api "$api" -o "$out/run-$k.jsonl" < "$out/schedule-$k.jsonl" &
done
wait
vk-eval "$out"/run-*.jsonl
