#!/usr/bin/env bash
# The gate comparison of docs/gates.md: the default model's top-A gate at P = 100/50/25 against
# the same NSNet2 topology with a threshold gate (fine-tuned with it: training/cpu_distill.sh 8)
# and a delta gate (the default's weights with the gate put on by `npdgru convert --gate`: two
# thresholds and the shipped nsnet2-kd-delta; fine-tuned with it where a run exists), on a test set, with the original NSNet2 in onnxruntime
# as the reference point; then the streaming hop and the measured work of the same rows on
# validation mixtures (benchmarks/bench_gates.py). One thread each.
#   bash benchmarks/compare_gates.sh [DATA] [OUT]     DATA: ../shared/data/testset_ood (default) or ../shared/data/testset
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/testset_ood}
OUT=${2:-results/gates_$(basename "$DATA")}
LIMIT=${LIMIT:-100}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for theta in 0.03 0.1; do
  npdgru convert weights/nsnet2-kd-anyp.safetensors -o "$tmp/delta-$theta-posthoc.safetensors" --gate delta --theta "$theta" \
    --trained-update-percent any --source "weights/nsnet2-kd-anyp.safetensors with the delta gate put on after training" > /dev/null
done
trained=(training/runs/nsnet2-threshold/threshold-0.2-step600.safetensors)
shipped=(weights/nsnet2-kd-delta.safetensors)   # the delta gate at 0.15 on the default's weights
for f in training/runs/nsnet2-threshold06/threshold-0.6-step*.safetensors training/runs/nsnet2-delta/delta-0.03-step*.safetensors; do
  [ -f "$f" ] && trained+=("$f")
done
npdgru eval --data "$DATA" --limit "$LIMIT" --out "$OUT" --jobs "${JOBS:-1}" \
  --weights weights/nsnet2-kd-anyp.safetensors@100,50,25 "${trained[@]}" "$tmp"/delta-*-posthoc.safetensors "${shipped[@]}" -q
python3 benchmarks/bench_gates.py --model weights/nsnet2-kd-anyp.safetensors --repeats "${REPEATS:-5}" \
  --gates delta:0.03 delta:0.1 --extra "${trained[@]}" "${shipped[@]}" | tee "$OUT/bench_gates.md"
