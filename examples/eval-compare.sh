#!/usr/bin/env bash
# Compare two runs (e.g. before and after a server change): B - A with bootstrap confidence intervals.
# "beyond noise: yes" means the interval of the difference excludes zero.
set -euo pipefail
A=${1:?usage: eval-compare.sh A.jsonl B.jsonl}
B=${2:?usage: eval-compare.sh A.jsonl B.jsonl}
vk-eval compare "$A" "$B" --bootstrap 2000
vk-eval "$A" "$B" --format markdown          # both runs' full reports, one group per run
vk-eval plot out/compare "$A" "$B" --overlay # the runs overlaid in one set of figures
