#!/usr/bin/env bash
# Distillation runs on a 2-core CPU: two lanes of one thread each, stopped by wall time and
# resumable (rerun the same line: a run folder that holds last.pt continues).
#   bash training/cpu_distill.sh 1   the candidate default: NSNet2, teacher + clean (W = 0.5)
#   bash training/cpu_distill.sh 2   the comparison at equal steps: supervised only (W = 0), teacher only (W = 1)
#   bash training/cpu_distill.sh 3   the default continued from weights/nsnet2-kd-anyp.safetensors with low P drawn
#                                    more often (--p-skew 2: P = 25 + 75 u^2) and a moving average of the weights
#                                    (--ema 0.99; the runs of training/runs/ resumed with it at step 600 / 1300: their
#                                    config.json records it)
#   bash training/cpu_distill.sh 4   MPT distilled from its current weights (teacher + clean, W = 0.5)
#   bash training/cpu_distill.sh 5   DPRNN distilled from its current weights (teacher + clean, W = 0.5)
#   bash training/cpu_distill.sh 6   the default continued from weights/nsnet2-kd-anyp.safetensors with lane 3's recipe plus
#                                    the residual-noise term (--noise-weight 3: output pulled down to the teacher's on bins
#                                    where the speech is 10 dB under the noise) and voice/channel augmentation
#                                    (--augment voice); logs DNSMOS SIG/BAK/OVRL at P = 50 on 32 validation mixtures
#   bash training/cpu_distill.sh 7   lane 6 with a lighter residual-noise term (--noise-weight 1), from the shipped default:
#                                    lane 6 raised validation BAK but lost 0.6 dB validation SI-SNR at P = 50;
#                                    RUN=, EXTRA= (as in lane 9) and STEPS= (the last step) for the comparison with a
#                                    second speech corpus: RUN=nsnet2-bak1-voices EXTRA=.cache/librispeech/speech/train STEPS=6800
#   bash training/cpu_distill.sh 8   lane 7's recipe with a variable gate instead of top-A (GATE=threshold THETA=0.35 by
#                                    default; GATE=delta THETA=0.03 the other): the default model's weights fine-tuned with
#                                    the gate in place. P is not drawn (these gates do not read it). Measured on the
#                                    default model before training (4 val speech files + training noise at 5 dB, 16 s):
#                                    threshold 0.2 / 0.35 / 0.5 / 0.65 updates 48-51 / 35-43 / 24-38 / 15-32 % of the
#                                    neurons per frame (gru1-gru2); delta 0.01 / 0.03 / 0.05 / 0.1 propagates 41-66 /
#                                    31-47 / 25-36 / 17-21 % of the state entries. The delta gate trains through a plain
#                                    autograd loop: one 400-unit layer on 16 x 4 s takes 5.1 s forward + backward against
#                                    1.0 (threshold) and 1.3 (top-A) with the hand-written backward (one thread).
#                                    Convert with the run's architecture:
#                                    npdgru convert training/runs/nsnet2-$GATE/last.pt --arch training/runs/nsnet2-$GATE/architecture.json
#                                    RUN=<folder name> writes to training/runs/<folder name> instead (e.g. a second theta);
#                                    INIT=<weight file> starts from it (e.g. a run's exported candidate, to go on in a new folder)
#   bash training/cpu_distill.sh 9   lane 7 plus the speech-pause term (--pause-weight MU=3: every bin of the frames whose
#                                    clean power is 25 dB under the crop's mean pulled down to the teacher's magnitude lowered
#                                    by MARGIN=6 dB), from the shipped default; RUN= names the folder (default nsnet2-pause);
#                                    EXTRA=<folder> adds a second speech corpus to the training split at a 30 % share
#                                    (EXTRA=.cache/librispeech/speech/train, written by tools/librispeech_voices.py)
#   bash training/cpu_distill.sh 10  MPT (ARCH=mpt, the default) or DPRNN (ARCH=dprnn) continued from its shipped weights
#                                    with lane 7's objective (residual-noise term at 1, voice/channel augmentation) and
#                                    EXTRA= as in lane 9, at lanes 4/5's learning rate (LR=3e-4); RUN= names the folder (default <arch>-bak)
#   bash training/cpu_distill.sh 11  an MPT with 1.5 times the recurrent widths (1.95 M MACs per frame at P = 100, 1.38 M at
#                                    P = 50; the shipped MPT 1.07 M / 0.82 M) distilled from scratch (teacher + clean, W = 0.5,
#                                    voice augmentation, LR=1e-3); its architecture is RUN/wide.json (RUN= default mpt-wide);
#                                    INIT=<weight file> continues from an exported average instead (e.g. on another machine)
# Recipe v2, P drawn per batch from U[25, 100], teacher = the original NSNet2 (dense), student
# initialised from the teacher. Lane 1 keeps step<N>.pt snapshots for the comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
common=(--recipe v2 --any-p 25 100 --teacher weights/nsnet2.safetensors --init weights/nsnet2.safetensors
        --batch 16 --seconds 4 --lr 1e-4 --warmup 50 --val-every 75 --val-count 32 --log-every 15 --threads 1 --steps 100000)
extra=()  # EXTRA=<folder>: a second speech corpus at a 30 % share of the training speech (lanes 7, 9, 10, 11)
[ -n "${EXTRA:-}" ] && extra=(--extra-speech "$EXTRA" --extra-speech-share 0.3)
case "$1" in
  1) python3 -m npdgru.train --out training/runs/nsnet2-mix "${common[@]}" --distill-weight 0.5 --snapshot-every 225 --minutes "${MINUTES:-85}" ;;
  2) python3 -m npdgru.train --out training/runs/nsnet2-sup "${common[@]}" --distill-weight 0 --steps 225
     python3 -m npdgru.train --out training/runs/nsnet2-dis "${common[@]}" --distill-weight 1 --steps 225 ;;
  3) python3 -m npdgru.train --out training/runs/nsnet2-mix3 --init weights/nsnet2-kd-anyp.safetensors --continue \
       --teacher weights/nsnet2.safetensors --distill-weight 0.5 --any-p 25 100 --p-skew 2 --recipe v2 --batch 16 --seconds 4 \
       --lr 1e-4 --warmup 30 --val-every 100 --val-count 64 --log-every 20 --threads 1 --steps 100000 --seed 11 --ema 0.99 --minutes "${MINUTES:-95}" ;;
  4|5) arch=$([ "$1" = 4 ] && echo mpt || echo dprnn)
     python3 -m npdgru.train --out "training/runs/$arch-kd" --init "weights/$arch-anyp.safetensors" --continue \
       --teacher weights/nsnet2.safetensors --distill-weight 0.5 --any-p 25 100 --recipe v2 --batch 16 --seconds 4 \
       --lr 3e-4 --warmup 50 --val-every 100 --val-count 64 --log-every 20 --threads 1 --steps 100000 --seed 3 --ema 0.99 --minutes "${MINUTES:-105}" ;;
  6) python3 -m npdgru.train --out training/runs/nsnet2-bak --init weights/nsnet2-kd-anyp.safetensors --continue \
       --teacher weights/nsnet2.safetensors --distill-weight 0.5 --noise-weight 3 --noise-below-db 10 --augment voice \
       --any-p 25 100 --p-skew 2 --recipe v2 --batch 16 --seconds 4 --lr 1e-4 --warmup 30 --val-every 100 --val-count 64 \
       --val-dnsmos 32 --snapshot-every 300 --log-every 20 --threads 1 --steps 100000 --seed 13 --ema 0.99 --minutes "${MINUTES:-80}" ;;
  7) python3 -m npdgru.train --out "training/runs/${RUN:-nsnet2-bak1}" --init weights/nsnet2-kd-anyp.safetensors --continue \
       --teacher weights/nsnet2.safetensors --distill-weight 0.5 --noise-weight 1 --noise-below-db 10 --augment voice \
       --any-p 25 100 --p-skew 2 --recipe v2 --batch 16 --seconds 4 --lr 1e-4 --warmup 30 --val-every 100 --val-count 64 \
       --val-dnsmos 32 --snapshot-every 300 --log-every 20 --threads 1 --steps "${STEPS:-100000}" --seed 17 --ema 0.99 --minutes "${MINUTES:-150}" \
       "${extra[@]}" ;;
  8) gate=${GATE:-threshold}
     python3 -m npdgru.train --out "training/runs/${RUN:-nsnet2-$gate}" --init "${INIT:-weights/nsnet2-kd-anyp.safetensors}" \
       --gate "$gate" --theta "${THETA:-0.35}" \
       --teacher weights/nsnet2.safetensors --distill-weight 0.5 --noise-weight 1 --noise-below-db 10 --augment voice \
       --recipe v2 --batch 16 --seconds 4 --lr 1e-4 --warmup 30 --val-every 100 --val-count 64 \
       --val-dnsmos 32 --snapshot-every 300 --log-every 20 --threads 1 --steps 100000 --seed 19 --ema 0.99 --minutes "${MINUTES:-150}" ;;
  9) python3 -m npdgru.train --out "training/runs/${RUN:-nsnet2-pause}" --init "${INIT:-weights/nsnet2-kd-anyp.safetensors}" --continue \
       --teacher weights/nsnet2.safetensors --distill-weight 0.5 --noise-weight 1 --noise-below-db 10 \
       --pause-weight "${MU:-3}" --pause-below-db 25 --pause-margin-db "${MARGIN:-6}" --augment voice \
       --any-p 25 100 --p-skew 2 --recipe v2 --batch 16 --seconds 4 --lr 1e-4 --warmup 30 --val-every 100 --val-count 64 \
       --val-dnsmos 32 --snapshot-every 100 --log-every 20 --threads 1 --steps 100000 --seed 23 --ema 0.99 --minutes "${MINUTES:-150}" \
       "${extra[@]}" ;;
  10) arch=${ARCH:-mpt}
     python3 -m npdgru.train --out "training/runs/${RUN:-$arch-bak}" --init "${INIT:-weights/$arch-anyp.safetensors}" --continue \
       --teacher weights/nsnet2.safetensors --distill-weight 0.5 --noise-weight 1 --noise-below-db 10 --augment voice \
       --any-p 25 100 --p-skew 2 --recipe v2 --batch 16 --seconds 4 --lr "${LR:-3e-4}" --warmup 30 --val-every 100 --val-count 64 \
       --val-dnsmos 32 --snapshot-every 100 --log-every 20 --threads 1 --steps 100000 --seed 29 --ema 0.99 --minutes "${MINUTES:-150}" \
       "${extra[@]}" ;;
  11) run=training/runs/${RUN:-mpt-wide}
     mkdir -p "$run"
     [ -f "$run/wide.json" ] || python3 -c 'import json; from npdgru.architectures import mpt; print(json.dumps(mpt(sub_hidden=240, full_hidden=384)))' > "$run/wide.json"
     if [ -n "${INIT:-}" ]; then start=(--init "$INIT" --continue); else start=(--arch "$run/wide.json"); fi
     python3 -m npdgru.train --out "$run" "${start[@]}" \
       --teacher weights/nsnet2.safetensors --distill-weight 0.5 --augment voice \
       --any-p 25 100 --recipe v2 --batch 16 --seconds 4 --lr "${LR:-1e-3}" --warmup 50 --val-every 100 --val-count 64 \
       --val-dnsmos 32 --snapshot-every 100 --log-every 20 --threads 1 --steps 100000 --seed 31 --ema 0.99 --minutes "${MINUTES:-150}" \
       "${extra[@]}" ;;
  *) echo "usage: bash training/cpu_distill.sh LANE (1-11)" >&2; exit 2 ;;
esac
