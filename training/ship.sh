#!/usr/bin/env bash
# Convert the fine-tuned runs into shipped npdgru weights with `npdgru convert` (the user path).
# Usage: bash training/ship.sh WHAT   WHAT: default (the distilled NSNet2 default, run nsnet2-mix3), mpt (run mpt-kd),
#        dprnn (run dprnn-kd), delta (the default's weights with the delta gate); the functions below record how the earlier files were made
set -euo pipefail
cd "$(dirname "$0")/.."
LICENSE="CC BY 4.0. Fine-tuned from NSNet2 (c) Microsoft Corporation, CC BY 4.0 (https://github.com/microsoft/DNS-Challenge); trained on speechocean762 (Junbo Zhang et al., OpenSLR SLR101, CC BY 4.0) and Speech Commands v0.02 background noise (Pete Warden, Google, CC BY 4.0)"
ship() {  # run name, trained P ("any" for the any-P run), output stem
  local run=training/runs/$1
  local steps
  steps=$(python3 -c "import torch; print(torch.load('$run/last.pt', weights_only=True)['step'])")
  npdgru convert "$run/last.pt" -o "weights/$3.safetensors" --overwrite --arch nsnet2 \
    --trained-update-percent "$2" --license "$LICENSE" \
    --source "NSNet2 fine-tuned by npdgru with the D-GRU select gate in place ($1: $steps steps of 16 x 4 s; recipe in weights/README.md; training/lanes.sh)" \
    --meta "training_run=$1" --meta "training_steps=$steps" "${@:4}"
}
# ship p100 100 nsnet2-ft-p100   # not shipped since the distilled model (recipe v2): git history keeps it
# ship p75 75 nsnet2-ft-p75   # no longer shipped (size budget): git show deff58b:weights/nsnet2-ft-p75.safetensors
# ship p50 50 nsnet2-ft-p50   # not shipped since the distilled model (recipe v2)
# ship p25 25 nsnet2-ft-p25   # no longer shipped (size budget): git show deff58b:weights/nsnet2-ft-p25.safetensors
# ship anyp any nsnet2-ft-anyp --meta "trained_update_range=25-100"   # replaced by nsnet2-kd-anyp

# DPRNN and MPT: trained from scratch with any-P on an H200 (recipe: weights/README.md)
ship_scratch() {  # run name, architecture
  local run=training/runs/$1
  local steps
  steps=$(python3 -c "import torch; print(torch.load('$run/last.pt', weights_only=True)['step'])")
  npdgru convert "$run/last.pt" -o "weights/$1.safetensors" --overwrite --arch "$2" \
    --trained-update-percent any --license "$SCRATCH_LICENSE" \
    --source "$2 trained from scratch by npdgru with the D-GRU select gate, P drawn per batch from U[25, 100] ($steps steps of 64 x 4 s on an H200; recipe in weights/README.md)" \
    --meta "training_run=$1" --meta "training_steps=$steps" --meta "trained_update_range=25-100"
}
SCRATCH_LICENSE="CC BY 4.0. Trained on speechocean762 (Junbo Zhang et al., OpenSLR SLR101, CC BY 4.0) and Speech Commands v0.02 background noise (Pete Warden, Google, CC BY 4.0)"
# ship_scratch dprnn-anyp dprnn   # dprnn-anyp.safetensors until it is distilled
# ship_scratch mpt-anyp mpt   # replaced by the distilled MPT (git history keeps it)

# The distilled NSNet2 (the default since recipe v2): best.pt of the mix run (chosen by validation loss)
ship_distill() {  # run name, output stem, architecture, how P was drawn, what the student started from
  local run=training/runs/$1
  local steps
  steps=$(python3 -c "import torch; print(torch.load('$run/best.pt', weights_only=True)['step'])")
  npdgru convert "$run/best.pt" -o "weights/$2.safetensors" --overwrite --arch "$3" \
    --trained-update-percent any --license "$DISTILL_LICENSE" \
    --source "$3 distilled from the original NSNet2 (teacher, dense) with the D-GRU select gate in place, $5, P drawn per batch from $4 ($1: step $steps of 16 x 4 s, chosen by validation loss; recipe v2 and loss in weights/README.md; training/cpu_distill.sh)" \
    --meta "training_run=$1" --meta "training_steps=$steps" --meta "trained_update_range=25-100" --meta "distill_weight=0.5" --meta "recipe=v2"
}
DISTILL_LICENSE="CC BY 4.0. Distilled from NSNet2 (c) Microsoft Corporation, CC BY 4.0 (https://github.com/microsoft/DNS-Challenge); trained on speechocean762 (Junbo Zhang et al., OpenSLR SLR101, CC BY 4.0), Speech Commands v0.02 background noise (Pete Warden, Google, CC BY 4.0) and the noise clips and RIRs listed with their licences (CC0, CC BY, public domain) and attribution in weights/ATTRIBUTION.md"
# ship_distill nsnet2-mix nsnet2-kd-anyp nsnet2 "U[25, 100]" "initialised from the teacher"   # the first distilled default
# The default's weights with the delta gate (DeltaGRU) put on after training, its threshold chosen on
# the validation split (training/score_val.py, 64 mixtures): the largest of 0.05 / 0.1 / 0.15 / 0.2 whose
# validation loss stays within 0.001 of the default's own P = 100 (docs/gates.md)
ship_delta() {
  npdgru convert weights/nsnet2-kd-anyp.safetensors -o weights/nsnet2-kd-delta.safetensors --overwrite --gate delta --theta 0.15 \
    --trained-update-percent any --license "$DISTILL_LICENSE" \
    --source "the weights of nsnet2-kd-anyp (the default) with the delta gate (|change| > 0.15 of state and input propagated) on both GRU layers, put on after training; threshold chosen by validation loss (docs/gates.md)" \
    --meta "training_run=nsnet2-mix3" --meta "training_steps=5500" --meta "distill_weight=0.5" --meta "recipe=v2"
}
case "${1:-}" in
  default) ship_distill nsnet2-mix3 nsnet2-kd-anyp nsnet2 "25 + 75 u^2, u ~ U[0, 1] (--p-skew 2), weights averaged (--ema 0.99)" \
             "initialised from the teacher, continued from the first distilled default (run nsnet2-mix, step 300)" ;;
  mpt) ship_distill mpt-kd mpt-anyp mpt "U[25, 100], weights averaged (--ema 0.99)" "continued from the MPT trained from scratch (mpt-anyp, 600 steps of 64 x 4 s, recipe v1)" ;;
  dprnn) ship_distill dprnn-kd dprnn-anyp dprnn "U[25, 100], weights averaged (--ema 0.99)" "continued from the DPRNN trained from scratch (dprnn-anyp, 1200 steps of 64 x 4 s, recipe v1)" ;;
  delta) ship_delta ;;
  *) echo "usage: bash training/ship.sh default|mpt|dprnn|delta" >&2; exit 2 ;;
esac
