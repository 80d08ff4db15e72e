#!/usr/bin/env bash
# vk-serve as a what-if model: the same prefix-heavy workload against three engine settings.
#   1. the default engine (Llama-3.1-8B on one H100, prefix caching on)
#   2. prefix caching off: every shared system prompt is prefilled again (TTFT goes up)
#   3. a small KV cache (2,000 blocks of 16 tokens): admission control makes requests wait
# Usage: examples/serve-whatif.sh [OUTDIR]     (needs vk-* on PATH, e.g. after `make install`: .venv/bin)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/serve-whatif}
mkdir -p "$out"

vk-gen examples/gen-prefix.yaml --seed 1 --count 200 | vk-schedule --poisson 8 --seed 1 > "$out/schedule.jsonl"

run() {  # run NAME VK-SERVE-OPTIONS...
  local name=$1; shift
  vk-serve --port 0 "$@" > "$out/$name.url" 2> "$out/$name.log" &
  local pid=$!
  until [ -s "$out/$name.url" ]; do kill -0 "$pid" 2>/dev/null || { cat "$out/$name.log" >&2; exit 1; }; sleep 0.1; done
  local url; url=$(head -n 1 "$out/$name.url")
  vk-send --api "$url" -o "$out/$name.jsonl" < "$out/schedule.jsonl"
  curl -s "${url%/v1}/metrics" | grep -E '^vllm:(prefix_cache_(hits|queries)_total|num_preemptions_total)' \
    > "$out/$name.metrics" || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
  echo "== $name" >&2
  vk-eval "$out/$name.jsonl"
  cat "$out/$name.metrics"
}

run default
run no-prefix-cache --no-prefix-caching
run small-cache --num-blocks 2000
