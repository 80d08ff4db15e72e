#!/usr/bin/env bash
# vk-sweep against vk-serve with a known answer: fixed latencies and a cap of 16 running requests make it an
# M/D/16 queue whose capacity is 16 / 0.13 s = 123 sessions/s (each request: 40 ms to the first token, then
# 9 tokens at 10 ms). A capacity search finds the largest Poisson rate meeting the SLO, as an interval with its
# confidence; a grid shows the whole curve; two sweeps overlay in one set of figures.
set -euo pipefail
OUT=${OUT:-out/sweep}
mkdir -p "$OUT"
cat > "$OUT/w.yaml" <<'YAML'
session_generator:
  type: synthetic
  session_graph: {type: single_request}
  channels: [{type: text, body_length_generator: 40}]
  output_spec: {text: {output_length_generator: 10}}
YAML
vk-gen "$OUT/w.yaml" --count 100 --seed 1 -o "$OUT/sessions.jsonl"

rm -f "$OUT/serve.url"
vk-serve --port 0 --ttft 0.04 --tpot 0.01 --max-num-seqs 16 > "$OUT/serve.url" &
SERVE=$!
trap 'kill $SERVE' EXIT
until [ -s "$OUT/serve.url" ]; do sleep 0.2; done   # vk-serve prints its URL once it listens
API=$(head -1 "$OUT/serve.url")

# the capacity under a tight TTFT objective (about 105 sessions/s); run it again: every probe is reused
vk-sweep "$OUT/sessions.jsonl" --api "$API" -o "$OUT/cap" --search rate --start 40 --slo 'ttft:p90<75ms' \
  --duration 3 --warmup 10 --tolerance 0.2
# the same probes under a looser objective, without sending a request
vk-eval sweep "$OUT/cap" --slo 'ttft:p90<600ms'
# a grid up to and past the capacity (the last probe stops early: saturation), with the figures
vk-sweep "$OUT/sessions.jsonl" --api "$API" -o "$OUT/grid" --poisson 20,40,60,80,100,120,240 --duration 3 \
  --slo 'ttft:p90<75ms' --plot -q
vk-eval sweep "$OUT/cap" "$OUT/grid" --plot "$OUT/figs"   # both sweeps overlaid
