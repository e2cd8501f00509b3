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

Distillation (``--teacher weights/nsnet2.safetensors --distill-weight W``): a dense teacher (run
at P = 100, frozen) enhances the same noisy batch, and the loss becomes

    W · L(student, teacher's enhanced spectrum) + (1 − W) · L(student, clean speech)

with the same compressed spectral loss L and the same clean-speech level normalisation. W = 0 is
plain supervised training, W = 1 pure distillation. The teacher, trained on hundreds of hours of
DNS data, carries what a few hours of speech and noise cannot teach: its term keeps the student
close to a model that generalises, while the supervised term lets it gain on our data.

Residual noise (``--noise-weight λ``, ``--noise-below-db θ``; see :func:`noise_floor_loss`): a
one-sided term on the noise-dominated bins, where the clean speech lies more than θ dB below the
noise, that pulls the student's output magnitude down to the reference's (the teacher's enhanced
spectrum with a teacher, the clean speech without) and never up:

    L_total = W · L(E, T) + (1 − W) · L(E, S) + λ · mean_{b,t,f} m_tf · max(0, |Ê_tf|^c − |R̂_tf|^c)²
    m_tf = [ |S_tf|² · 10^(θ/10) < |N_tf|² ],  N = X − S,  R = T (or S),  ^ = divided by the clean RMS

Where the student already suppresses more than the reference the term is zero (it cannot push
towards over-suppression); where speech is present it is zero (the spectral loss alone decides).

Speech pauses (``--pause-weight μ``, ``--pause-below-db φ``, ``--pause-margin-db δ``; see
:func:`pause_floor_loss`): the same one-sided pull on every bin of the frames where the speech
pauses, i.e. whose clean power lies more than φ dB under the example's mean clean frame power,
towards the reference lowered by δ dB:

    + μ · mean_{b,t,f} p_t · max(0, |Ê_tf|^c − (10^(−δ/20) |R̂_tf|)^c)²,   p_t = [ P_t · 10^(φ/10) < mean_t P_t ],
    P_t = mean_f |S_tf|²

Residual noise in pauses is what a listener (and DNSMOS BAK) hears most; pulling there costs no
speech, whereas the bin term above also acts on the weak bins of speech frames.

Model selection: at each validation step the mean validation loss over the validation P (against
clean speech, on held-out speakers and held-out noise clips) is compared with the best so far;
the best model is kept as ``best.pt`` (``npdgru convert best.pt`` ships it).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import pathlib
import sys
import time

import numpy as np
import torch

from ..errors import NpdgruError, ParameterError
from ..kinds import gate_fields, with_gate
from ..weights import Weights, load_weights
from .data import AUGMENTS, MixtureSampler
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


def noise_floor_loss(est_spec, ref_spec, clean_spec, noisy_spec, clean_rms, below_db: float = 10.0) -> torch.Tensor:
    """The residual-noise term of the module docstring (without its weight λ):

        mean_{b,t,f} m_tf · max(0, |Ê_tf|^c − |R̂_tf|^c)²,   m_tf = [ |S_tf|² · 10^(θ/10) < |N_tf|² ]

    with N = X − S the noise, R the reference (teacher or clean), c = COMPRESSION, θ = ``below_db``
    and every spectrum divided by the example's clean RMS (as in :func:`loss_fn`). The mean runs over
    all bins, so the term grows with the share of noise-dominated bins. One-sided: an output below the
    reference costs nothing, so the term only ever pulls the output magnitude down.
    """
    scale = (1.0 / clean_rms).reshape(-1, 1, 1)
    noise_power = (noisy_spec - clean_spec).abs().square()
    mask = (clean_spec.abs().square() * 10.0 ** (below_db / 10.0) < noise_power).to(est_spec.real.dtype)
    return (mask * _excess(est_spec * scale, ref_spec * scale)).mean()


def _excess(est, ref) -> torch.Tensor:
    """max(0, |E|^c − |R|^c)² per bin: the one-sided gap of the two floor terms (spectra already level-normalised)."""
    return torch.relu((est.abs() + 1e-8) ** COMPRESSION - (ref.abs() + 1e-8) ** COMPRESSION).square()


def pause_floor_loss(est_spec, ref_spec, clean_spec, clean_rms, below_db: float = 25.0, margin_db: float = 0.0) -> torch.Tensor:
    """The speech-pause term of the module docstring (without its weight μ):

        mean_{b,t,f} p_t · max(0, |Ê_tf|^c − (10^(−δ/20) |R̂_tf|)^c)²,   p_t = [ P_t · 10^(φ/10) < mean_t P_t ]

    with P_t = mean_f |S_tf|² the clean power of frame t, φ = ``below_db``, δ = ``margin_db`` and the
    spectra divided by the example's clean RMS as in :func:`loss_fn`. One-sided, like
    :func:`noise_floor_loss`: an output already below the (lowered) reference costs nothing.
    """
    scale = (1.0 / clean_rms).reshape(-1, 1, 1)
    frame_power = clean_spec.abs().square().mean(dim=2)  # (B, T)
    pause = (frame_power * 10.0 ** (below_db / 10.0) < frame_power.mean(dim=1, keepdim=True)).to(est_spec.real.dtype)
    return (pause.unsqueeze(-1) * _excess(est_spec * scale, ref_spec * (scale * 10.0 ** (-margin_db / 20.0)))).mean()


def si_snr_db(est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-example SI-SNR in dB (zero-mean), (B, n) → (B,)."""
    est = est - est.mean(-1, keepdim=True)
    ref = ref - ref.mean(-1, keepdim=True)
    proj = (est * ref).sum(-1, keepdim=True) / (ref.square().sum(-1, keepdim=True) + 1e-12) * ref
    return 10 * torch.log10(proj.square().sum(-1) / ((est - proj).square().sum(-1) + 1e-12) + 1e-12)


def _step_loss(model, noisy, clean, P, teacher=None, distill_weight=0.0, noise_weight=0.0, noise_below_db=10.0,
               pause_weight=0.0, pause_below_db=25.0, pause_margin_db=0.0):
    """The training loss of one batch; with a teacher, the mix of the module docstring; with
    ``noise_weight`` λ > 0, plus λ times :func:`noise_floor_loss`, with ``pause_weight`` μ > 0, plus μ
    times :func:`pause_floor_loss` (reference: the teacher if given, else the clean speech)."""
    dev = next(model.parameters()).device
    noisy, clean = noisy.to(dev), clean.to(dev)
    X = stft(noisy)
    S = stft(clean)
    feats = log_power(X)
    E = X * model(feats, update_percent=P)
    rms = clean.square().mean(-1).sqrt() + 1e-5
    T = None
    if teacher is not None and (distill_weight > 0.0 or noise_weight > 0.0 or pause_weight > 0.0):
        with torch.no_grad():
            T = X * teacher(feats, update_percent=100.0)
    if T is None or distill_weight == 0.0:
        loss = loss_fn(E, S, rms)
    elif distill_weight == 1.0:
        loss = loss_fn(E, T, rms)
    else:
        loss = distill_weight * loss_fn(E, T, rms) + (1.0 - distill_weight) * loss_fn(E, S, rms)
    if noise_weight > 0.0:
        loss = loss + noise_weight * noise_floor_loss(E, S if T is None else T, S, X, rms, noise_below_db)
    if pause_weight > 0.0:
        loss = loss + pause_weight * pause_floor_loss(E, S if T is None else T, S, rms, pause_below_db, pause_margin_db)
    return loss


def _model_from_weights(weights, arch=None):
    """The PyTorch twin of npdgru weights: MaskNet for NSNet2-shaped files (a plain chain of linear
    and D-GRU layers, whose checkpoints use the PyTorch NSNet2 names), GraphNet otherwise."""
    if arch in (None, weights.architecture.get("name")) and MaskNet.holds(weights):
        return MaskNet.from_weights(weights)  # the PyTorch NSNet2 layout (fine-tunes)
    return GraphNet.from_weights(weights)


def load_teacher(path, device):
    """A frozen dense teacher from an npdgru weight file."""
    teacher = _model_from_weights(load_weights(path))
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


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


DNSMOS_P = 50.0  # the P at which --val-dnsmos scores the validation mixtures
DNSMOS_KEYS = ("sig", "bak", "ovrl")


def dnsmos_window(scorer, audio: np.ndarray) -> dict[str, float]:
    """DNSMOS of ``audio`` tiled to exactly one model input (9.01 s) and scored once.

    The full procedure would repeat a 4 s crop to 16 s and average 7 overlapping windows of the
    same repeated audio: 7 times the cost for nearly the same number (a selection signal on the
    validation split, not a reported score)."""
    from ..evaluate.metrics import INPUT_LENGTH, SAMPLE_RATE as DNSMOS_RATE

    return scorer(np.resize(np.clip(audio, -1.0, 1.0), int(INPUT_LENGTH * DNSMOS_RATE)))


@torch.no_grad()
def validate_dnsmos(model, noisy, scorer, P=DNSMOS_P) -> dict[str, float]:
    """Mean DNSMOS P.835 SIG / BAK / OVRL (:func:`dnsmos_window`) of the model's output at P over
    the mixtures ``noisy`` (N, n) float32; ``scorer`` is a :class:`npdgru.evaluate.metrics.Dnsmos`."""
    model.eval()
    dev = next(model.parameters()).device
    scores = {k: [] for k in DNSMOS_KEYS}
    for x in noisy:
        y = model.enhance(torch.from_numpy(x[None]).to(dev), P)[0].cpu().numpy().astype(np.float32)
        s = dnsmos_window(scorer, y)
        for k in DNSMOS_KEYS:
            scores[k].append(s[k])
    model.train()
    return {k: float(np.mean(v)) for k, v in scores.items()}


def _producer(queue, data, seconds, recipe, seed, batch, augment="none", extra_speech=(), extra_share=0.3):  # a worker of BatchSource
    sampler = MixtureSampler(data, split="train", seconds=seconds, seed=0, recipe=recipe, augment=augment,
                             extra_speech=extra_speech, extra_share=extra_share)
    sampler.rng = np.random.default_rng(seed)
    while True:
        queue.put(sampler.batch(batch))


class BatchSource:
    """Training batches from ``workers`` processes (0: in this process, the original order).

    With workers, batch k comes from worker k mod N, each with its own generator seeded from
    (run seed, step, worker), so a run stays reproducible for a given worker count. The
    processes are started with "spawn" (no copy of CUDA state) and are daemons.
    """

    def __init__(self, sampler, args, step):
        self.sampler, self.k = sampler, 0
        self.queues = []
        if args.workers > 0:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            for w in range(args.workers):
                q = ctx.Queue(maxsize=3)
                seed = [args.seed, step, w]
                ctx.Process(target=_producer, args=(q, args.data, args.seconds, args.recipe, seed, args.batch, getattr(args, "augment", "none"),
                                                         getattr(args, "extra_speech", None) or (), getattr(args, "extra_speech_share", 0.3)), daemon=True).start()
                self.queues.append(q)

    def next(self, batch):
        if not self.queues:
            return self.sampler.batch(batch)
        q = self.queues[self.k % len(self.queues)]
        self.k += 1
        return q.get(timeout=600)


def ema_update(ema, model, updates: int, decay: float) -> None:
    """One step of the exponential moving average of the weights: every parameter of ``ema``
    becomes d * ema + (1 - d) * model with d = min(decay, (1 + n) / (10 + n)), n = ``updates``
    before this one (a short average while few steps exist); buffers are copied."""
    d = min(decay, (1.0 + updates) / (10.0 + updates))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.mul_(d).add_(pm.detach(), alpha=1.0 - d)
        for be, bm in zip(ema.buffers(), model.buffers()):
            be.copy_(bm)


def _gate_fields(args) -> dict:
    """--gate/--theta/--theta-x as the fields of a GRU layer ({} for top-a): ``kinds.gate_fields``."""
    return gate_fields(getattr(args, "gate", "top-a"), getattr(args, "theta", None), getattr(args, "theta_x", None))


def _npdgru_state(model) -> dict:
    """The model's tensors under their npdgru names (MaskNet keeps the PyTorch NSNet2 names)."""
    from ..convert import NSNET2_TORCH_NAMES

    state = model.state_dict()
    if isinstance(model, MaskNet):
        return {NSNET2_TORCH_NAMES[k]: v for k, v in state.items()}
    return dict(state)


def _draw_percent(args, rng) -> float:
    if args.any_p:
        lo, hi = args.any_p
        return float(lo + (hi - lo) * rng.uniform(0.0, 1.0) ** getattr(args, "p_skew", 1.0))
    return args.update_percent


def build_parser(p=None):
    p = p or argparse.ArgumentParser(prog="npdgru train", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="run folder (resumed when it holds last.pt)")
    p.add_argument("--init", default=None, help="npdgru weights to start from (default: the shipped NSNet2; with --arch: from scratch)")
    p.add_argument("--arch", default=None, help="train this architecture from scratch: dprnn, mpt, nsnet2 (npdgru.architectures) "
                   "or a JSON file holding an architecture (e.g. json.dumps(npdgru.architectures.mpt(sub_hidden=240)))")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--data", default="../shared/data", help="corpus root (speech/, noise/)")
    p.add_argument("--recipe", default="v2", choices=["v1", "v2"], help="mixture recipe (npdgru.train.data; v2: all training noise, RIRs)")
    p.add_argument("--teacher", default=None, help="npdgru weights of a dense teacher to distil (e.g. weights/nsnet2.safetensors)")
    p.add_argument("--distill-weight", type=float, default=0.5, help="with --teacher: weight W of the teacher term (0 = supervised only, 1 = teacher only)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--update-percent", type=float, default=100.0, help="P of the select gate during training")
    g.add_argument("--any-p", type=float, nargs=2, metavar=("LO", "HI"), help="draw P per batch uniformly from [LO, HI]")
    p.add_argument("--p-skew", type=float, default=1.0,
                   help="with --any-p: draw P = LO + (HI - LO) u^K, u uniform in [0, 1]; K > 1 draws low P more often (K = 2: "
                        "71%% of batches in the lower half of the range), K = 1 is uniform")
    p.add_argument("--gate", default="top-a", choices=["top-a", "threshold", "delta"],
                   help="the gate of every D-GRU layer (docs/design.md): top-a (P, the default), threshold (u > --theta) or delta "
                        "(changes > --theta propagate); the run folder's architecture.json records it for npdgru convert --arch")
    p.add_argument("--theta", type=float, default=None, help="with --gate threshold: θ in [0, 1); with --gate delta: Θ >= 0 of the state")
    p.add_argument("--theta-x", type=float, default=None, help="with --gate delta: Θ_x >= 0 of the input (default --theta)")
    p.add_argument("--noise-weight", type=float, default=0.0,
                   help="weight λ of the residual-noise term (module docstring): pulls the output down to the teacher's "
                        "(or the clean speech's) magnitude on bins where the speech is --noise-below-db under the noise; 0: off")
    p.add_argument("--noise-below-db", type=float, default=10.0,
                   help="with --noise-weight: a bin counts as noise-dominated when the clean speech is this many dB below the noise")
    p.add_argument("--pause-weight", type=float, default=0.0,
                   help="weight μ of the speech-pause term (module docstring): pulls every bin of the frames where the speech "
                        "pauses down to the teacher's (or the clean speech's) magnitude; 0: off")
    p.add_argument("--pause-below-db", type=float, default=25.0,
                   help="with --pause-weight: a frame is a pause when its clean power is this many dB under the example's mean")
    p.add_argument("--pause-margin-db", type=float, default=0.0,
                   help="with --pause-weight: pull the pauses this many dB below the reference (0: down to it)")
    p.add_argument("--extra-speech", action="append", default=None, metavar="FOLDER",
                   help="a folder of further clean training speech, 16 kHz .flac or .ogg (repeatable; e.g. the LibriSpeech "
                        "subset of tools/librispeech_voices.py); validation stays speech/val")
    p.add_argument("--extra-speech-share", type=float, default=0.3,
                   help="with --extra-speech: probability that an example's utterance comes from those folders")
    p.add_argument("--augment", default="none", choices=list(AUGMENTS),
                   help="training-mixture augmentation (npdgru.train.data): voice = speed, EQ, level ramp of the speech; "
                        "band limits and a resampling chain on speech and noise (validation is never augmented)")
    p.add_argument("--val-dnsmos", type=int, default=0, metavar="N",
                   help="at each validation also log DNSMOS SIG / BAK / OVRL of the validated model at P = 50 on the first N "
                        "validation mixtures (needs the eval extra: speechmos, onnxruntime); 0: off")
    p.add_argument("--continue", dest="continue_run", action="store_true",
                   help="with --init a shipped fine-tune and no last.pt in --out: continue its step count (metadata training_steps)")
    p.add_argument("--steps", type=int, default=1000, help="stop after this many optimiser steps in total")
    p.add_argument("--minutes", type=float, default=None, help="stop (checkpointed) after this many minutes of this run")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seconds", type=float, default=4.0, help="crop length of training examples")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warm-up from 0 (Adam's first steps move every weight by about lr)")
    p.add_argument("--clip", type=float, default=5.0, help="gradient-norm clipping")
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--val-count", type=int, default=64, help="fixed validation mixtures from speech/val")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--snapshot-every", type=int, default=0, help="also keep step<N>.pt every N steps (comparisons at equal steps)")
    p.add_argument("--ema", type=float, default=0.0,
                   help="keep an exponential moving average of the weights with this decay (e.g. 0.99; 0: off); "
                        "validation, best.pt and the shipped file use the average")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=0, help="processes making training mixtures (0: in the training process)")
    p.add_argument("--seed", type=int, default=0)
    return p


def train(args) -> pathlib.Path:
    if not 0.0 <= args.distill_weight <= 1.0:
        raise ParameterError(f"--distill-weight must be in [0, 1], got {args.distill_weight}")
    noise_weight = getattr(args, "noise_weight", 0.0)
    if not 0.0 <= noise_weight < float("inf"):
        raise ParameterError(f"--noise-weight must be a finite number >= 0 (0: off), got {noise_weight}")
    if not -float("inf") < getattr(args, "noise_below_db", 10.0) < float("inf"):
        raise ParameterError(f"--noise-below-db must be a finite number of dB, got {args.noise_below_db}")
    pause_weight = getattr(args, "pause_weight", 0.0)
    if not 0.0 <= pause_weight < float("inf"):
        raise ParameterError(f"--pause-weight must be a finite number >= 0 (0: off), got {pause_weight}")
    for name in ("pause_below_db", "pause_margin_db"):
        if not -float("inf") < getattr(args, name, 0.0) < float("inf"):
            raise ParameterError(f"--{name.replace('_', '-')} must be a finite number of dB, got {getattr(args, name)}")
    if not 0.0 <= getattr(args, "extra_speech_share", 0.3) <= 1.0:
        raise ParameterError(f"--extra-speech-share must be in [0, 1], got {args.extra_speech_share}")
    for folder in getattr(args, "extra_speech", None) or ():
        if not pathlib.Path(folder).is_dir():
            raise ParameterError(f"--extra-speech {folder}: no such folder")
    if getattr(args, "augment", "none") not in AUGMENTS:
        raise ParameterError(f"--augment must be one of {AUGMENTS}, got {args.augment!r}")
    val_dnsmos = getattr(args, "val_dnsmos", 0)
    if not 0 <= val_dnsmos <= args.val_count:
        raise ParameterError(f"--val-dnsmos must be in [0, --val-count = {args.val_count}], got {val_dnsmos}")
    scorer = None
    if val_dnsmos:
        from ..evaluate.metrics import Dnsmos

        scorer = Dnsmos()  # refuses (ParameterError) before the run folder is made when speechmos is missing
    if not 0.0 < getattr(args, "p_skew", 1.0) < float("inf"):
        raise ParameterError(f"--p-skew must be a positive number, got {args.p_skew}")
    if not 0.0 <= getattr(args, "ema", 0.0) < 1.0:
        raise ParameterError(f"--ema must be in [0, 1) (0: off), got {args.ema}")
    gate = _gate_fields(args)  # refused before the run folder is made
    scratch = None
    if args.init is None and args.arch is not None:  # a name or a JSON file (e.g. a wider MPT), also refused before
        from ..convert import architecture_argument

        scratch = architecture_argument(args.arch)
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
        model = _model_from_weights(init_weights, args.arch)
    else:
        torch.manual_seed(args.seed)
        init_weights = None
        model = GraphNet(scratch)  # from scratch, PyTorch's default initialisation
    if gate:  # the same tensors on the architecture with the chosen gate (format 2: the graph twin)
        model = GraphNet.from_weights(Weights(architecture=with_gate(model.architecture, gate), tensors={k: v.detach().cpu().numpy() for k, v in _npdgru_state(model).items()}))
    (out / "architecture.json").write_text(json.dumps(model.architecture, indent=1) + "\n")  # for npdgru convert --arch
    model.to(args.device)
    teacher = load_teacher(args.teacher, args.device) if args.teacher else None
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sampler = MixtureSampler(args.data, split="train", seconds=args.seconds, seed=args.seed, recipe=args.recipe,
                             augment=getattr(args, "augment", "none"), extra_speech=getattr(args, "extra_speech", None) or (),
                             extra_share=getattr(args, "extra_speech_share", 0.3))
    step = 0
    note = ""
    ema = copy.deepcopy(model) if getattr(args, "ema", 0.0) > 0 else None
    ema_updates = 0
    if resumed:
        ckpt = torch.load(last, weights_only=True, map_location=args.device)
        # With --ema, "model" holds the average (the weights `npdgru convert` takes) and "raw" the
        # trained weights; last.pt files written before that layout hold them as "model" and "ema".
        model.load_state_dict(ckpt["raw"] if "raw" in ckpt else ckpt["model"])
        step = int(ckpt["step"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"] if "ema" in ckpt else ckpt["model"])
            ema_updates = int(ckpt.get("ema_updates", 0))
        _record_resume(out / "config.json", args, step)
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
    val_sampler = MixtureSampler(args.data, split="val", seconds=args.seconds, seed=0, recipe=args.recipe)
    val = val_sampler.fixed_set(args.val_count)
    val_percents = [25.0, 50.0, 100.0] if args.any_p else [args.update_percent]

    log_path = out / "log.csv"
    if resumed and log_path.exists():  # rows after the checkpoint (a run stopped between two) are redone: drop them
        rows = log_path.read_text().splitlines(keepends=True)
        kept = rows[:1] + [r for r in rows[1:] if int(r.split(",", 1)[0]) <= step]
        if len(kept) < len(rows):
            log_path.write_text("".join(kept))
    header = ["step", "seconds", "train_loss", "lr"] + [f"{k}_P{int(P)}" for P in val_percents for k in ("val_loss", "val_sisnr")]
    if val_dnsmos:
        header += [f"dnsmos_{k}_P{int(DNSMOS_P)}" for k in DNSMOS_KEYS]
    new_log = not log_path.exists()
    if not new_log:  # a resume that turns --val-dnsmos on extends the header; older rows keep their cells
        rows = log_path.read_text().splitlines(keepends=True)
        old = rows[0].rstrip("\r\n").split(",") if rows else []
        if old != header and header[: len(old)] == old:
            log_path.write_text(",".join(header) + "\n" + "".join(rows[1:]))
    log = open(log_path, "a", newline="")
    writer = csv.writer(log)
    if new_log:
        writer.writerow(header)
    if note:
        print(note, file=sys.stderr)

    def checkpoint():
        cpu_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}  # converts without a GPU
        ckpt = {"model": cpu_state, "step": step, "seed": args.seed}
        if ema is not None:  # "model" is what ships (the average, as in best.pt and step<N>.pt)
            ckpt["model"] = {k: v.detach().cpu() for k, v in ema.state_dict().items()}
            ckpt["raw"] = cpu_state
            ckpt["ema_updates"] = ema_updates
        torch.save(ckpt, last.with_suffix(".tmp"))
        os.replace(last.with_suffix(".tmp"), last)
        torch.save(opt.state_dict(), out / "optim.tmp")
        os.replace(out / "optim.tmp", out / "optim.pt")

    best_path = out / "best.pt"
    best = {"loss": float("inf")}
    if best_path.exists():
        best["loss"] = float(torch.load(best_path, weights_only=True)["val_loss"])

    def validation_row(train_loss):
        judged = ema if ema is not None else model  # with --ema the averaged weights are validated and kept
        v = validate(judged, val, val_percents)
        mean_loss = float(np.mean([v[P][0] for P in val_percents]))
        if mean_loss < best["loss"]:
            best["loss"] = mean_loss
            cpu_state = {k: val_.detach().cpu() for k, val_ in judged.state_dict().items()}
            torch.save({"model": cpu_state, "step": step, "seed": args.seed, "val_loss": mean_loss}, best_path.with_suffix(".tmp"))
            os.replace(best_path.with_suffix(".tmp"), best_path)
        cells = [f"{v[P][k]:.5f}" for P in val_percents for k in (0, 1)]
        extra = ""
        if scorer is not None:
            d = validate_dnsmos(judged, val[0][:val_dnsmos], scorer)
            cells += [f"{d[k]:.4f}" for k in DNSMOS_KEYS]
            extra = f" DNSMOS P{DNSMOS_P:g} SIG/BAK/OVRL {d['sig']:.3f}/{d['bak']:.3f}/{d['ovrl']:.3f}"
        writer.writerow([step, f"{time.time() - t0 + elapsed:.1f}", f"{train_loss:.5f}", f"{opt.param_groups[0]['lr']:.3g}"] + cells)
        log.flush()
        print(f"step {step}: train {train_loss:.4f} " + " ".join(f"P{P:g}: loss {v[P][0]:.4f} si-snr {v[P][1]:.2f} dB" for P in val_percents) + extra, flush=True)

    elapsed = 0.0
    if resumed and log_path.exists():
        rows = list(csv.reader(open(log_path)))
        if len(rows) > 1:
            elapsed = float(rows[-1][1])
    t0 = time.time()
    if step == 0 or (args.continue_run and not resumed):
        validation_row(float("nan"))
    running = []
    source = BatchSource(sampler, args, step)
    model.train()
    while step < args.steps:
        if args.minutes is not None and time.time() - t0 > 60 * args.minutes:
            break
        noisy, clean = source.next(args.batch)
        P = _draw_percent(args, percent_rng)
        lr = args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup > 0 else args.lr
        for group in opt.param_groups:
            group["lr"] = lr
        loss = _step_loss(model, torch.from_numpy(noisy), torch.from_numpy(clean), P, teacher, args.distill_weight,
                          noise_weight, getattr(args, "noise_below_db", 10.0), pause_weight,
                          getattr(args, "pause_below_db", 25.0), getattr(args, "pause_margin_db", 0.0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        if ema is not None:
            ema_update(ema, model, ema_updates, args.ema)
            ema_updates += 1
        step += 1
        running.append(loss.item())
        if not math.isfinite(running[-1]):
            raise NpdgruError(f"{out}: loss became {running[-1]} at step {step} (last.pt holds the last finite state)")
        if args.snapshot_every and step % args.snapshot_every == 0:  # with --ema the average, the weights that would ship
            kept = ema if ema is not None else model
            torch.save({"model": {k: v.detach().cpu() for k, v in kept.state_dict().items()}, "step": step, "seed": args.seed}, out / f"step{step}.pt")
        if step % args.val_every == 0:
            validation_row(float(np.mean(running)))
            running = []
            checkpoint()
        elif step % args.log_every == 0:
            writer.writerow([step, f"{time.time() - t0 + elapsed:.1f}", f"{np.mean(running):.5f}", f"{opt.param_groups[0]['lr']:.3g}"])
            log.flush()
    if running:
        validation_row(float(np.mean(running)))
    checkpoint()
    log.close()
    return out


def _record_resume(config_path: pathlib.Path, args, step: int) -> None:
    """A resumed run whose options differ from its config.json: append what changed, and at
    which step, to the config's "resumes" list."""
    if not config_path.exists():
        return
    config = json.loads(config_path.read_text())
    now = json.loads(json.dumps(vars(args)))
    changed = {k: v for k, v in now.items() if config.get(k) != v and k != "resumes"}
    if changed:
        config.setdefault("resumes", []).append({"step": step, "changed": changed})
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def main(argv=None) -> int:
    """Train with the arguments of ``npdgru train``; an NpdgruError propagates to the caller
    (``npdgru.cli`` prints it as one line)."""
    args = build_parser().parse_args(argv)
    train(args)
    return 0
