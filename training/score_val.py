"""Score models on the validation split (never a test set): validation loss, SI-SNR and DNSMOS.

    python3 training/score_val.py weights/nsnet2.safetensors training/runs/nsnet2-bak/best.pt \
        --like weights/nsnet2-kd-anyp.safetensors --count 64 --percents 100 50 25

Each model (an npdgru ``.safetensors`` file, or a run's ``.pt`` checkpoint read into the
architecture of ``--like``) enhances the fixed validation mixtures that ``npdgru train`` validates
on (``speech/val`` speakers, held-out noise, the same seed) at each P; the table gives the
validation loss (the spectral loss against clean speech, as logged in ``log.csv``), SI-SNR,
PESQ (wide band) and ESTOI against the clean speech, and DNSMOS P.835 SIG / BAK / OVRL, the latter exactly as ``--val-dnsmos`` computes them
(:func:`npdgru.train.loop.dnsmos_window`: one 9.01 s window per mixture). A row ``noisy`` gives
the unprocessed mixtures. One CPU thread.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
import torch

from npdgru.errors import ParameterError
from npdgru.evaluate.metrics import Dnsmos, estoi, pesq_wb
from npdgru.train.data import MixtureSampler
from npdgru.train.loop import DNSMOS_KEYS, _model_from_weights, dnsmos_window, validate, validate_dnsmos
from npdgru.weights import load_weights


def load_model(path: pathlib.Path, like: pathlib.Path | None):
    """A frozen model from a weight file, or from a checkpoint's ``model`` entry in ``like``'s architecture."""
    if path.suffix == ".safetensors":
        model = _model_from_weights(load_weights(path))
    elif path.suffix == ".pt":
        if like is None:
            raise ParameterError(f"{path}: a .pt checkpoint needs --like WEIGHTS.safetensors (its architecture)")
        model = _model_from_weights(load_weights(like))
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
        if not isinstance(ckpt, dict) or "model" not in ckpt:
            raise ParameterError(f"{path}: not a checkpoint of npdgru train (no 'model' entry)")
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise ParameterError(f"{path}: does not fit the architecture of {like}: {e}") from None
    else:
        raise ParameterError(f"{path}: expected a .safetensors weight file or a .pt checkpoint")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def intrusive(model, noisy, clean, P) -> tuple[float, float]:
    """Mean PESQ (wide band) and ESTOI of the model's output at P against the clean speech."""
    pesq, stoi = [], []
    for x, c in zip(noisy, clean):
        y = model.enhance(torch.from_numpy(x[None]), P)[0].numpy().astype(np.float32)
        pesq.append(pesq_wb(c, y))
        stoi.append(estoi(c, y))
    return float(np.mean(pesq)), float(np.mean(stoi))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", type=pathlib.Path)
    ap.add_argument("--like", type=pathlib.Path, default=None, help="weights whose architecture .pt checkpoints hold")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--count", type=int, default=64, help="validation mixtures (the first N of npdgru train's set)")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--percents", type=float, nargs="+", default=[100.0, 50.0])
    args = ap.parse_args(argv)
    if args.count < 1:
        raise ParameterError(f"--count must be >= 1, got {args.count}")
    if any(not 0 < P <= 100 for P in args.percents):
        raise ParameterError(f"--percents must lie in (0, 100], got {args.percents}")
    torch.set_num_threads(1)
    models = [(p, load_model(p, args.like)) for p in args.models]  # every file checked before any scoring
    noisy, clean, snr = MixtureSampler(args.data, split="val", seconds=args.seconds, seed=0).fixed_set(args.count)
    scorer = Dnsmos()
    print(f"{args.count} validation mixtures of {args.seconds:g} s (SNR {snr.min():.1f} to {snr.max():.1f} dB)\n")
    print("| model | P | val loss | SI-SNR | PESQ | ESTOI | DNSMOS SIG | BAK | OVRL |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    d = {k: np.mean([dnsmos_window(scorer, x)[k] for x in noisy]) for k in DNSMOS_KEYS}
    pn = float(np.mean([pesq_wb(c, x) for x, c in zip(noisy, clean)]))
    en = float(np.mean([estoi(c, x) for x, c in zip(noisy, clean)]))
    print(f"| noisy | | | | {pn:.3f} | {en:.3f} | " + " | ".join(f"{d[k]:.3f}" for k in DNSMOS_KEYS) + " |", flush=True)
    for path, model in models:
        v = validate(model, (noisy, clean, snr), args.percents)
        for P in args.percents:
            d = validate_dnsmos(model, noisy, scorer, P)
            pq, st = intrusive(model, noisy, clean, P)
            print(f"| {path} | {P:g} | {v[P][0]:.4f} | {v[P][1]:.2f} | {pq:.3f} | {st:.3f} | " + " | ".join(f"{d[k]:.3f}" for k in DNSMOS_KEYS) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
