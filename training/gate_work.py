"""Measured work of a gated model on the validation mixtures (never a test set): the share of the
H neurons a threshold (or delta) layer updated per frame, mean and 99th percentile over frames,
and for a delta layer the share of its input entries propagated.

    python3 training/gate_work.py training/runs/nsnet2-threshold/step400.safetensors --count 16

The mixtures are those ``npdgru train`` validates on (``speech/val``, held-out noise, seed 0).
Per-frame counts come from ``MaskModel.work_per_frame`` (the work a frame pays for).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from npdgru import stft
from npdgru.model import MaskModel
from npdgru.train.data import MixtureSampler
from npdgru.weights import load_weights


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("weights")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args(argv)
    model = MaskModel(load_weights(args.weights), backend="cpu")
    noisy, _, _ = MixtureSampler(args.data, split="val", seconds=args.seconds, seed=0).fixed_set(args.count)
    shares, inputs = {}, {}
    for x in noisy:
        features = stft.log_power(stft.stft(x))[:, None, :].astype(np.float32)
        for name, w in model.work_per_frame(features).items():
            shares.setdefault(name, []).append(w.share())
            inputs.setdefault(name, []).append(None if w.input_columns is None else w.input_columns / w.size_in)
    print(f"{args.weights}: {args.count} validation mixtures of {args.seconds:g} s")
    print("| layer | mean share of the state updated | p99 over frames | mean share of the input propagated (delta) |")
    print("|---|---:|---:|---:|")
    for name, v in shares.items():
        v = np.concatenate(v)
        x = None if inputs[name][0] is None else np.concatenate(inputs[name]).mean()
        print(f"| {name} | {v.mean():.3f} | {np.percentile(v, 99):.3f} | {'-' if x is None else f'{x:.3f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
