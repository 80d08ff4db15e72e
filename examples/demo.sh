#!/usr/bin/env bash
# make demo: start vk-serve on a free port, run vk-gen | vk-schedule | vk-send against it, print vk-eval's report.
# Everything the run wrote stays in $VK_DEMO_DIR (default out/demo) for a second look:
#   vk-eval out/demo/run.jsonl --format markdown ; vk-eval plot out/demo/run.jsonl -o out/demo/plots
set -euo pipefail
cd "$(dirname "$0")/.."

out=${VK_DEMO_DIR:-out/demo}
mkdir -p "$out"
rm -f "$out/serve.url"

# The simulated server: a vLLM-like engine model (continuous batching, chunked prefill, prefix cache).
vk-serve --port 0 --server-timestamps >"$out/serve.url" 2>"$out/serve.log" &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT

for _ in $(seq 1 600); do
  [ -s "$out/serve.url" ] && break
  kill -0 "$server" 2>/dev/null || { echo "demo: vk-serve failed to start:" >&2; cat "$out/serve.log" >&2; exit 1; }
  sleep 0.1
done
url=$(head -n 1 "$out/serve.url")
echo "demo: vk-serve is listening at $url" >&2

# Multi-turn chat sessions with a shared system prompt, 4 new sessions per second for about 20 seconds.
# The schedule is kept as a file: vk-send checks it whole before the first request, nothing else competes for
# the two cores while it runs, and the same command replays it against another server.
vk-gen examples/demo.yaml --seed 7 --count 80 | tee "$out/sessions.jsonl" \
  | vk-schedule --poisson 4 --seed 7 -o "$out/schedule.jsonl"
vk-send "$out/schedule.jsonl" --api "$url" --workers 1 --continuous-usage -o "$out/run.jsonl"

echo >&2
vk-eval "$out/run.jsonl"
