#!/usr/bin/env python
"""GPU benchmark: many concurrent streams of the NSNet2 mask model on the cuda backend vs torch.

    python benchmarks/bench_cuda.py [--batch 1 64 1024 8192 32768] [--percent 100 50 25]
                                    [--frames-per-call 1] [--calls 50] [--weights FILE] [--no-torch]
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/bench_cuda.py --smoke     # code paths only, no timing value

Prints one markdown table: for each batch size B (independent streams) and update percentage P,
the npdgru cuda model (``MaskModel(backend="cuda")``, features and state on the GPU) and the same
model as a torch stack (``nn.Linear`` + ``nn.GRU`` per layer, cuDNN, float32 with TF32 off, built
from the same weight file) on the same batch of features:

* frames/s: B · frames per call · calls / seconds, the median of ``--repeats`` timed runs of
  ``--calls`` calls each, after warm-up calls (compilation), between ``cuda.synchronize()``;
* real-time streams: frames/s / 100 (a 16 kHz stream needs 100 frames of 10 ms per second);
* GPU MiB/stream: device memory taken by the model state and per-call workspaces of a batch,
  divided by B (for torch: its peak allocation during the calls over its state, divided by B);
* npdgru / torch: ratio of frames/s (> 1: npdgru is faster). torch runs dense (it has no D-GRU),
  so at P < 100 the ratio is the D-GRU's gain against the dense cuDNN GRU.

``--frames-per-call 1`` (default) is streaming: one 10 ms frame of every stream per call, the
state carried on the device. A larger value runs T frames per call (offline blocks).

As in llm.c, nothing is timed before the cuda model agrees with the float64 reference backend on
4 streams x 20 frames of real features (max |mask diff| <= 1e-5 at P = 100, 1e-4 below, the
tolerances of tests/test_model.py) and, at P = 100, with torch; on a mismatch the script prints
the first differing entry and exits 1.

Under numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) the timings mean nothing: the script
refuses to run, except with ``--smoke``, which runs a tiny random model (H = 8) at B in {1, 2},
P in {100, 50}, two calls, to check the code paths (tests/test_cuda_model.py runs it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from npdgru import architectures, stft  # noqa: E402
from npdgru.errors import NpdgruError  # noqa: E402
from npdgru.kinds import KINDS  # noqa: E402
from npdgru.model import MaskModel  # noqa: E402
from npdgru.weights import Weights, default_weights_path, load_weights  # noqa: E402

BATCHES = (1, 64, 1024, 8192, 32768)
PERCENTS = (100, 50, 25)
ATOL_DENSE, ATOL_SPARSE = 1e-5, 1e-4
DISTINCT_FRAMES = 16  # feature frames cycled through during timing (kept on the device)


def simulator() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def tiny_weights(seed=0, H=8) -> Weights:
    """A random NSNet2-shaped model small enough for the simulator (npdgru.architectures.tiny_weights)."""
    return architectures.tiny_weights(seed, hidden=H)


def real_features(n_frames: int) -> np.ndarray:
    """(n_frames, 161) log-power features of the shipped example recording (looped if short)."""
    import soundfile as sf

    x, sr = sf.read(str(REPO / "examples" / "noisy_dishes_5db.flac"), dtype="float32", always_2d=True)
    F = stft.log_power(stft.stft(x[:, 0]))
    reps = -(-n_frames // len(F))
    return np.ascontiguousarray(np.concatenate([F] * reps)[:n_frames])


def batch_features(F: np.ndarray, T: int, B: int) -> np.ndarray:
    """(T, B, 161): stream b starts at frame 7·b of F (streams differ, no two alike)."""
    idx = (np.arange(T)[:, None] + 7 * np.arange(B)[None, :]) % len(F)
    return np.ascontiguousarray(F[idx])


# --------------------------------------------------------------------------------- torch


def torch_model(weights: Weights, device):
    """The same layer stack in torch: nn.Linear + activation, nn.GRU (one layer each), float32."""
    import torch
    from torch import nn

    acts = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "none": nn.Identity}

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.kinds, mods = [], []
            for spec in weights.architecture["layers"]:
                n, t = spec["name"], weights.tensors
                if KINDS[spec["kind"]].carries_state:  # a chain of linear and D-GRU layers (format 1)
                    g = nn.GRU(spec["in"], spec["hidden"])
                    for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                        getattr(g, f"{k}_l0").data.copy_(torch.from_numpy(t[f"{n}.{k}"]))
                    mods.append(g)
                else:
                    lin = nn.Linear(spec["in"], spec["out"])
                    lin.weight.data.copy_(torch.from_numpy(t[f"{n}.weight"]))
                    lin.bias.data.copy_(torch.from_numpy(t[f"{n}.bias"]))
                    mods.append(nn.Sequential(lin, acts[spec.get("activation", "none")]()))
                self.kinds.append(KINDS[spec["kind"]].carries_state)
            self.mods = nn.ModuleList(mods)

        def forward(self, x, hs):
            """x (T, B, F), hs: list of (1, B, H) states, replaced in place."""
            k = 0
            for recurrent, m in zip(self.kinds, self.mods):
                if recurrent:
                    x, hs[k] = m(x, hs[k])
                    k += 1
                else:
                    x = m(x)
            return x

    return Stack().to(device).eval()


# --------------------------------------------------------------------------------- checks


def first_mismatch(name, got, want, atol) -> bool:
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    if np.all(err <= atol):
        return False
    i = tuple(int(v) for v in np.unravel_index(np.argmax(err), err.shape))
    print(f"MISMATCH {name}: max |diff| {err.max():.3g} > {atol:g} at {i}: got {float(got[i])!r} want {float(want[i])!r}", file=sys.stderr)
    return True


def check_parity(weights, percents, F, tmodel, torch_device, B=4, T=20) -> bool:
    """cuda vs the float64 reference (and torch at P = 100) on B streams x T frames."""
    X = batch_features(F, T, B)
    bad = False
    for P in percents:
        mc = MaskModel(weights, update_percent=P, backend="cuda")
        mr = MaskModel(weights, update_percent=P, backend="reference")
        got = mc.forward(X, mc.init_state(B))
        want = mr.forward(X, mr.init_state(B))
        bad |= first_mismatch(f"cuda P={P} vs reference", got, want, ATOL_DENSE if P == 100 else ATOL_SPARSE)
        if P == 100 and tmodel is not None:
            import torch

            with torch.no_grad():
                hs = [torch.zeros(1, B, g.hidden_size, device=torch_device) for g in mc.gru_layers]
                tw = tmodel(torch.from_numpy(X).to(torch_device), hs).cpu().numpy()
            bad |= first_mismatch("cuda P=100 vs torch", got, tw, ATOL_DENSE)
    return not bad


# --------------------------------------------------------------------------------- timing


def _free_bytes(ctx) -> float:
    """Free device memory after the pending deallocations (nan on the simulator)."""
    dealloc = getattr(ctx, "deallocations", None)
    if dealloc is None:
        return float("nan")
    dealloc.clear()
    return float(ctx.get_memory_info()[0])


def time_npdgru(weights, P, B, T, calls, repeats, warmup, F):
    from numba import cuda

    from npdgru.kernels import cuda as K

    m = MaskModel(weights, update_percent=P, backend="cuda")
    feats = [K.to_device(batch_features(F[k * T :], T, B)) for k in range(DISTINCT_FRAMES)]
    ctx = cuda.current_context()
    free0 = _free_bytes(ctx)
    state = m.init_state(B)
    for k in range(warmup):  # compiles the kernels, grows the workspaces
        m.forward(feats[k % len(feats)], state)
    K.synchronize()
    mem = (free0 - _free_bytes(ctx)) / B
    runs = []
    for _ in range(repeats):
        with cuda.defer_cleanup():  # no cuMemFree (a device synchronisation) inside the timed loop
            K.synchronize()
            t0 = time.perf_counter()
            for k in range(calls):
                m.forward(feats[k % len(feats)], state)
            K.synchronize()
            runs.append(time.perf_counter() - t0)
        _free_bytes(ctx)
    return B * T * calls / statistics.median(runs), mem


def time_torch(tmodel, device, weights, B, T, calls, repeats, warmup, F):
    import torch

    feats = [torch.from_numpy(batch_features(F[k * T :], T, B)).to(device) for k in range(DISTINCT_FRAMES)]
    Hs = [s["hidden"] for s in weights.architecture["layers"] if KINDS[s["kind"]].carries_state]
    cuda_dev = device.type == "cuda"

    def sync():
        if cuda_dev:
            torch.cuda.synchronize()

    with torch.no_grad():
        sync()
        base = torch.cuda.memory_allocated() if cuda_dev else 0
        if cuda_dev:
            torch.cuda.reset_peak_memory_stats()
        hs = [torch.zeros(1, B, H, device=device) for H in Hs]
        for k in range(warmup):
            tmodel(feats[k % len(feats)], hs)
        sync()
        mem = ((torch.cuda.max_memory_allocated() - base) / B) if cuda_dev else float("nan")
        runs = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            for k in range(calls):
                tmodel(feats[k % len(feats)], hs)
            sync()
            runs.append(time.perf_counter() - t0)
    return B * T * calls / statistics.median(runs), mem


# --------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=list(BATCHES), help=f"numbers of streams B (default {' '.join(map(str, BATCHES))})")
    ap.add_argument("--percent", type=float, nargs="+", default=list(PERCENTS), help="update percentages P (default 100 50 25)")
    ap.add_argument("--frames-per-call", type=int, default=1, help="frames of every stream per call (default 1: streaming)")
    ap.add_argument("--calls", type=int, default=50, help="calls per timed run (default 50)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs, the median is reported (default 5)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls first (compilation; default 3)")
    ap.add_argument("--weights", default=None, help="npdgru weight file (default: the shipped NSNet2)")
    ap.add_argument("--no-torch", action="store_true", help="leave out the torch columns")
    ap.add_argument("--smoke", action="store_true", help="tiny model, tiny batches: check the code paths (runs under the simulator)")
    args = ap.parse_args(argv)

    if simulator() and not args.smoke:
        print("bench_cuda: NUMBA_ENABLE_CUDASIM=1 is set: the CUDA simulator runs kernels in Python threads, "
              "so its timings mean nothing. Run on a CUDA GPU, or add --smoke to check the code paths.", file=sys.stderr)
        return 2
    if args.smoke:
        args.batch, args.percent, args.calls, args.repeats, args.warmup = [1, 2], [100.0, 50.0], 2, 1, 1
        args.frames_per_call = min(args.frames_per_call, 2)
        from npdgru.kernels import cuda as K

        K.config.THREADS_PER_BLOCK, K.config.GEMM_TILE, K.config.GEMM_REG = 8, 4, 2  # fewer simulator threads
        sys.setswitchinterval(1e-4)
    if min(args.batch) < 1 or args.frames_per_call < 1 or args.calls < 1 or args.repeats < 1 or args.warmup < 1:
        ap.error("--batch, --frames-per-call, --calls, --repeats and --warmup must be >= 1")

    try:
        from npdgru.model import get_backend

        K = get_backend("cuda")
        weights = tiny_weights() if args.smoke else load_weights(args.weights or default_weights_path())
    except NpdgruError as e:
        print(f"bench_cuda: {e}", file=sys.stderr)
        return 2

    torch = tmodel = tdev = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("bench_cuda: torch is not installed: torch columns left out", file=sys.stderr)
            torch = None
    if torch is not None:
        if torch.cuda.is_available():
            tdev = torch.device("cuda")
            torch.backends.cuda.matmul.allow_tf32 = False  # float32, as npdgru
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cudnn.benchmark = False
        elif args.smoke:
            tdev = torch.device("cpu")  # the smoke run only checks the code path
        else:
            print("bench_cuda: torch has no CUDA device: torch columns left out", file=sys.stderr)
        if tdev is not None:
            tmodel = torch_model(weights, tdev)

    T = args.frames_per_call
    F = real_features(DISTINCT_FRAMES * T + 7 * max(args.batch) + 20)
    if not check_parity(weights, args.percent, F, tmodel, tdev, *((2, 4) if args.smoke else (4, 20))):
        print("bench_cuda: the cuda model disagrees with the reference: nothing timed", file=sys.stderr)
        return 1

    from numba import cuda

    dev = "CUDA simulator" if simulator() else cuda.get_current_device().name
    dev = dev.decode() if isinstance(dev, bytes) else dev
    arch = weights.architecture
    desc = " -> ".join(f"{s['kind']} {s.get('hidden', s.get('out'))}" for s in arch["layers"])
    print(f"### {arch.get('name', '?')} ({desc}), {T} frame(s) per stream per call, device: {dev}")
    print(f"numba launch config: THREADS_PER_BLOCK={K.config.THREADS_PER_BLOCK}, GEMM tile {K.config.GEMM_TILE}x{K.config.GEMM_TILE} threads x {K.config.GEMM_REG}x{K.config.GEMM_REG} outputs"
          + (f"; torch {torch.__version__} on {tdev} (TF32 off)" if tmodel is not None else ""))
    if args.smoke:
        print("SMOKE RUN: tiny random model" + (" on the simulator" if simulator() else "") + ": the numbers below are not measurements")
    print()
    print("| B | P | npdgru frames/s | real-time streams | GPU MiB/stream | torch frames/s | torch streams | torch MiB/stream | npdgru / torch |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for B in args.batch:
        t_fps = t_mem = None
        if tmodel is not None:
            t_fps, t_mem = time_torch(tmodel, tdev, weights, B, T, args.calls, args.repeats, args.warmup, F)
        for P in args.percent:
            fps, mem = time_npdgru(weights, P, B, T, args.calls, args.repeats, args.warmup, F)
            tcols = ("n/a",) * 4
            if t_fps is not None:
                tcols = (f"{t_fps:,.0f}", f"{t_fps / 100:,.0f}", f"{t_mem / 2**20:.3f}" if t_mem == t_mem else "n/a", f"{fps / t_fps:.2f}")
            mcol = f"{mem / 2**20:.3f}" if mem == mem else "n/a"
            print(f"| {B} | {P:g} | {fps:,.0f} | {fps / 100:,.0f} | {mcol} | " + " | ".join(tcols) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
