"""Fine-tune a mask model with the select gate in place (``npdgru train``; extra ``torch``).

A run lives in one folder (``--out``): ``config.json`` (the arguments), ``log.csv`` (one line per
logging interval: step, wall seconds, train loss, and at validation steps the validation loss
and SI-SNR at each validation P), ``last.pt`` (model state + step) and ``optim.pt`` (Adam
moments). Starting a run whose folder holds ``last.pt`` resumes it. ``npdgru convert last.pt -o
model.safetensors`` turns the model into npdgru weights (the converter takes the ``model`` entry,
ignores the step counters and never unpickles anything but tensors and plain values).

The .pt files are not committed: the shipped weights are the checkpoint. ``--init
weights/<model>.safetensors --continue`` continues a shipped run from its recorded step count
(metadata ``training_steps``), with fresh Adam moments; config.json and log.csv are committed.

Loss (see :func:`loss_fn`): the compressed spectral loss of Braun & Tashev (2021, arXiv:2008.06412),
the loss NSNet2 itself was trained with, so fine-tuning keeps the objective the starting point
optimised: a mix of compressed-magnitude and compressed-complex MSE with c = 0.3, alpha = 0.3,
each example normalised by its clean-speech level so quiet and loud examples weigh the same.
The compression weighs low-energy bins (where residual noise and speech onsets are audible)
more than a plain MSE, which correlates better with PESQ and DNSMOS.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import pathlib
import sys
import time

import numpy as np
import torch

from ..weights import load_weights
from .data import MixtureSampler
from .torch_model import GraphNet, MaskNet, istft, log_power, stft

COMPRESSION = 0.3
ALPHA = 0.3


def loss_fn(est_spec: torch.Tensor, clean_spec: torch.Tensor, clean_rms: torch.Tensor) -> torch.Tensor:
    """Compressed complex + magnitude MSE (Braun & Tashev 2021), per-example level-normalised."""
    scale = (1.0 / clean_rms).reshape(-1, 1, 1)
    S, E = clean_spec * scale, est_spec * scale
    mag_s = (S.abs() + 1e-8) ** COMPRESSION
    mag_e = (E.abs() + 1e-8) ** COMPRESSION
    complex_s = mag_s * S / (S.abs() + 1e-8)
    complex_e = mag_e * E / (E.abs() + 1e-8)
    mag_term = (mag_e - mag_s).square().mean(dim=(1, 2))
    complex_term = (complex_e - complex_s).abs().square().mean(dim=(1, 2))
    return ((1 - ALPHA) * mag_term + ALPHA * complex_term).mean()


def si_snr_db(est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-example SI-SNR in dB (zero-mean), (B, n) → (B,)."""
    est = est - est.mean(-1, keepdim=True)
    ref = ref - ref.mean(-1, keepdim=True)
    proj = (est * ref).sum(-1, keepdim=True) / (ref.square().sum(-1, keepdim=True) + 1e-12) * ref
    return 10 * torch.log10(proj.square().sum(-1) / ((est - proj).square().sum(-1) + 1e-12) + 1e-12)


def _step_loss(model, noisy, clean, P):
    dev = next(model.parameters()).device
    noisy, clean = noisy.to(dev), clean.to(dev)
    X = stft(noisy)
    S = stft(clean)
    mask = model(log_power(X), update_percent=P)
    rms = clean.square().mean(-1).sqrt() + 1e-5
    return loss_fn(X * mask, S, rms)


@torch.no_grad()
def validate(model, val, percents, batch=16):
    """Mean loss and SI-SNR (dB) of the model on the fixed validation set at each P."""
    model.eval()
    noisy, clean, _ = val
    out = {}
    for P in percents:
        losses, snrs = [], []
        for i in range(0, len(noisy), batch):
            dev = next(model.parameters()).device
            x, s = torch.from_numpy(noisy[i : i + batch]).to(dev), torch.from_numpy(clean[i : i + batch]).to(dev)
            losses.append(float(_step_loss(model, x, s, P)) * len(x))
            snrs.append(si_snr_db(model.enhance(x, P), s).sum().item())
        out[P] = (sum(losses) / len(noisy), sum(snrs) / len(noisy))
    model.train()
    return out


def _draw_percent(args, rng) -> float:
    if args.any_p:
        lo, hi = args.any_p
        return float(rng.uniform(lo, hi))
    return args.update_percent


def build_parser(p=None):
    p = p or argparse.ArgumentParser(prog="npdgru train", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="run folder (resumed when it holds last.pt)")
    p.add_argument("--init", default=None, help="npdgru weights to start from (default: the shipped NSNet2; with --arch: from scratch)")
    p.add_argument("--arch", default=None, help="train this architecture from scratch (dprnn, mpt, nsnet2; npdgru.architectures)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--data", default="../shared/data", help="corpus root (speech/, noise/)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--update-percent", type=float, default=100.0, help="P of the select gate during training")
    g.add_argument("--any-p", type=float, nargs=2, metavar=("LO", "HI"), help="draw P per batch uniformly from [LO, HI]")
    p.add_argument("--continue", dest="continue_run", action="store_true",
                   help="with --init a shipped fine-tune and no last.pt in --out: continue its step count (metadata training_steps)")
    p.add_argument("--steps", type=int, default=1000, help="stop after this many optimiser steps in total")
    p.add_argument("--minutes", type=float, default=None, help="stop (checkpointed) after this many minutes of this run")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seconds", type=float, default=4.0, help="crop length of training examples")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--clip", type=float, default=5.0, help="gradient-norm clipping")
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--val-count", type=int, default=64, help="fixed validation mixtures from speech/val")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p


def train(args) -> pathlib.Path:
    torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    last = out / "last.pt"
    resumed = last.exists()
    if not resumed:
        (out / "config.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    init = args.init
    if init is None and args.arch is None:
        from ..weights import default_weights_path

        init = default_weights_path()
    if init is not None:
        init_weights = load_weights(init)
        if init_weights.architecture.get("name") == "nsnet2" and args.arch in (None, "nsnet2"):
            model = MaskNet.from_weights(init_weights)  # the PyTorch NSNet2 layout (fine-tunes)
        else:
            model = GraphNet.from_weights(init_weights)
    else:
        from ..architectures import architecture

        torch.manual_seed(args.seed)
        init_weights = None
        model = GraphNet(architecture(args.arch))  # from scratch, PyTorch's default initialisation
    model.to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sampler = MixtureSampler(args.data, split="train", seconds=args.seconds, seed=args.seed)
    step = 0
    note = ""
    if resumed:
        ckpt = torch.load(last, weights_only=True, map_location=args.device)
        model.load_state_dict(ckpt["model"])
        step = int(ckpt["step"])
        sampler.rng = np.random.default_rng(int(ckpt["seed"]) + step)  # a fresh, reproducible stream
        if (out / "optim.pt").exists():
            opt.load_state_dict(torch.load(out / "optim.pt", weights_only=True, map_location=args.device))
        else:
            note = "resumed without optim.pt: Adam moments restarted"
    elif args.continue_run and init_weights is not None:  # a shipped model carries its step count: continue its run
        step = int(init_weights.metadata.get("training_steps", "0"))
        sampler.rng = np.random.default_rng(args.seed + step)
        note = f"continuing from {init} at step {step}: Adam moments restarted"
    percent_rng = np.random.default_rng(args.seed + 7919 * (step + 1))
    val_sampler = MixtureSampler(args.data, split="val", seconds=args.seconds, seed=0)
    val = val_sampler.fixed_set(args.val_count)
    val_percents = [25.0, 50.0, 100.0] if args.any_p else [args.update_percent]

    log_path = out / "log.csv"
    new_log = not log_path.exists()
    log = open(log_path, "a", newline="")
    writer = csv.writer(log)
    if new_log:
        writer.writerow(["step", "seconds", "train_loss", "lr"] + [f"{k}_P{int(P)}" for P in val_percents for k in ("val_loss", "val_sisnr")])
    if note:
        print(note, file=sys.stderr)

    def checkpoint():
        cpu_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}  # converts without a GPU
        torch.save({"model": cpu_state, "step": step, "seed": args.seed}, last.with_suffix(".tmp"))
        os.replace(last.with_suffix(".tmp"), last)
        torch.save(opt.state_dict(), out / "optim.tmp")
        os.replace(out / "optim.tmp", out / "optim.pt")

    def validation_row(train_loss):
        v = validate(model, val, val_percents)
        cells = [f"{v[P][k]:.5f}" for P in val_percents for k in (0, 1)]
        writer.writerow([step, f"{time.time() - t0 + elapsed:.1f}", f"{train_loss:.5f}", args.lr] + cells)
        log.flush()
        print(f"step {step}: train {train_loss:.4f} " + " ".join(f"P{P:g}: loss {v[P][0]:.4f} si-snr {v[P][1]:.2f} dB" for P in val_percents), flush=True)

    elapsed = 0.0
    if resumed and log_path.exists():
        rows = list(csv.reader(open(log_path)))
        if len(rows) > 1:
            elapsed = float(rows[-1][1])
    t0 = time.time()
    if step == 0 or (args.continue_run and not resumed):
        validation_row(float("nan"))
    running = []
    model.train()
    while step < args.steps:
        if args.minutes is not None and time.time() - t0 > 60 * args.minutes:
            break
        noisy, clean = sampler.batch(args.batch)
        P = _draw_percent(args, percent_rng)
        loss = _step_loss(model, torch.from_numpy(noisy), torch.from_numpy(clean), P)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        step += 1
        running.append(loss.item())
        if not math.isfinite(running[-1]):
            raise RuntimeError(f"loss became {running[-1]} at step {step}")
        if step % args.val_every == 0:
            validation_row(float(np.mean(running)))
            running = []
            checkpoint()
        elif step % args.log_every == 0:
            writer.writerow([step, f"{time.time() - t0 + elapsed:.1f}", f"{np.mean(running):.5f}", args.lr])
            log.flush()
    if running:
        validation_row(float(np.mean(running)))
    checkpoint()
    log.close()
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
