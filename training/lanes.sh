#!/usr/bin/env bash
# The NSNet2 fine-tuning runs (2-vCPU machine): two lanes of one thread each, each run
# stopped by wall time and resumable (rerun the same line: it continues from last.pt).
# Usage: bash training/lanes.sh 1   (or 2)
set -euo pipefail
cd "$(dirname "$0")/.."
run() { python3 -m npdgru.train --threads 1 --steps 100000 "$@"; }
case "$1" in
  1) run --out training/runs/p100 --update-percent 100 --minutes 22
     run --out training/runs/p75 --update-percent 75 --minutes 22
     run --out training/runs/p25 --update-percent 25 --minutes 22 ;;
  2) run --out training/runs/anyp --any-p 25 100 --minutes 33
     run --out training/runs/p50 --update-percent 50 --minutes 33 ;;
esac
