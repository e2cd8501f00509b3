#!/usr/bin/env bash
# Distillation runs on one GPU, all at once, each stopped by wall time.
#   bash training/gpu_distill.sh DATA OUTDIR MINUTES
# DATA: the corpus (../shared/data, or its Opus copy from training/make_opus_corpus.py).
# Runs (recipe v2, P drawn per batch from U[25, 100], teacher = the original NSNet2, dense):
#   nsnet2-sup   NSNet2 from the teacher's weights, supervised only       (--distill-weight 0)
#   nsnet2-dis   NSNet2 from the teacher's weights, teacher term only     (--distill-weight 1)
#   nsnet2-mix   NSNet2 from the teacher's weights, both                  (--distill-weight 0.5)
#   dprnn-mix, mpt-mix   from the shipped DPRNN / MPT weights, both       (--distill-weight 0.5)
# A run folder that holds last.pt resumes (rerun the same line).
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=$1; OUT=$2; MIN=$3
mkdir -p "$OUT"
common=(--data "$DATA" --recipe v2 --device "${DEVICE:-cuda}" --any-p 25 100 --teacher weights/nsnet2.safetensors
        --seconds 4 --steps 100000 --minutes "$MIN" --val-every 50 --val-count 64 --log-every 10
        --threads 1 --workers 2)
run() { local name=$1; shift; python3 -m npdgru.train --out "$OUT/$name" "${common[@]}" "$@" > "$OUT/$name.log" 2>&1 & }
run nsnet2-sup --init weights/nsnet2.safetensors --distill-weight 0   --batch 32 --lr 1e-4 --warmup 50
run nsnet2-dis --init weights/nsnet2.safetensors --distill-weight 1   --batch 32 --lr 1e-4 --warmup 50
run nsnet2-mix --init weights/nsnet2.safetensors --distill-weight 0.5 --batch 32 --lr 1e-4 --warmup 50
run dprnn-mix  --init weights/dprnn-anyp.safetensors --arch dprnn --distill-weight 0.5 --batch 32 --lr 3e-4 --warmup 50
run mpt-mix    --init weights/mpt-anyp.safetensors   --arch mpt   --distill-weight 0.5 --batch 32 --lr 3e-4 --warmup 50
wait
