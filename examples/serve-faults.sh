#!/usr/bin/env bash
# vk-serve for testing clients: fixed latency (TTFT 50 ms, 10 ms per token) with injected faults, seeded.
# 2% of requests get 429, 1% 500, 1% 503; 2% stall 3 s before the first byte; 1% are cut mid-stream; 1% get
# one malformed SSE event. Every chunk carries the server's send time (vk_server_time) as ground truth.
#   examples/serve-faults.sh &     then point vk-send --api at the URL it prints
exec vk-serve --port "${PORT:-8000}" --ttft 0.05 --tpot 0.01 --server-timestamps \
  --fault-429 0.02 --fault-500 0.01 --fault-503 0.01 \
  --fault-stall 0.02 --stall-seconds 3 --fault-disconnect 0.01 --fault-malformed 0.01 --fault-seed 42
