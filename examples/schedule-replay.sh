#!/usr/bin/env bash
# Replaying a trace: its own timestamps, compressed, with idle gaps capped, or scaled to a target rate by thinning
# or superposing whole sessions (each session keeps its requests, think times and graph).
# Usage: examples/schedule-replay.sh TRACE_SESSIONS.jsonl   (sessions with trace_time, e.g. from vk-gen on a trace)
set -euo pipefail
trace=${1:?sessions with trace_time (vk-gen from a trace)}
vk-schedule "$trace" --replay --stats                          # as recorded
vk-schedule "$trace" --replay --speedup 4 --max-idle 2 --stats # 4x faster, no gap over 2 s
vk-schedule "$trace" --replay --target-rate 50 --stats         # thin or superpose to 50 sessions/s
vk-schedule "$trace" --replay --target-rate 50 --cycle --duration 1800 --warmup 100 -o replay-schedule.jsonl
