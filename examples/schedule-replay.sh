#!/usr/bin/env bash
# Replaying a trace: its own timestamps, compressed, with idle gaps capped, or scaled to a target rate by thinning
# or superposing whole sessions (each session keeps its requests, think times and graph).
# Usage: examples/schedule-replay.sh TRACE_SESSIONS.jsonl   (sessions with trace_time, e.g. from vk-gen on a trace)
# The first three print only their statistics (--stats writes no schedule); the last keeps a one-minute
# schedule in $VK_OUT (default out/replay): at 50 sessions/s that is 3,000 sessions, each with its whole text, so
# mind the size before asking for --duration 1800 (about 30 times as much).
set -euo pipefail
trace=${1:?sessions with trace_time (vk-gen from a trace)}
out=${VK_OUT:-out/replay}
mkdir -p "$out"
vk-schedule "$trace" --replay --stats                          # as recorded
vk-schedule "$trace" --replay --speedup 4 --max-idle 2 --stats # 4x faster, no gap over 2 s
vk-schedule "$trace" --replay --target-rate 50 --stats         # thin or superpose to 50 sessions/s
vk-schedule "$trace" --replay --target-rate 50 --cycle --duration 60 --warmup 10 -o "$out/replay-schedule.jsonl"
ls -lh "$out/replay-schedule.jsonl" >&2
