#!/usr/bin/env python
"""The variable gates' memory update: changed columns (_accumulate) against the whole product
(_dense_columns), us per call, one thread, at a fraction c/H of changed columns.

    python benchmarks/bench_gates.py --hidden 64 128 400 --repeats 7

A threshold or delta step changes a count c of columns that varies per frame; the memory
M (3H) is kept as M += W[:, S] Δ_S (3H·c MACs, gathered columns) or recomputed as W v + b
(3H·H MACs, contiguous). Prints one markdown table per H with both times and their ratio at
each fraction; the fraction where the ratio crosses 1 is ``_DENSE_COLUMNS_FRACTION`` in
``npdgru/kernels/cpu/kernels.py``. Each time is the best of --repeats runs of --calls calls
(the machine is shared: ratios within one run, best of several, are what to read).

With ``--model`` (a weight file, e.g. weights/nsnet2-kd-anyp.safetensors) a second table: the
whole model (MaskModel.forward, offline, cpu) in us per frame at a few P (top-A) and with every
D-GRU layer given a threshold or delta gate at a few thresholds (the same weights, untrained for
those gates: a speed and work measure, not a quality one), with the measured state (and input)
columns per frame of each layer. Input: --seconds of the first speech files of
<--data>/speech/val mixed with training noise at 5 dB.
"""

from __future__ import annotations

import os

for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from npdgru.kernels.cpu import kernels as K  # noqa: E402

FRACTIONS = (0.25, 0.5, 0.75, 0.85, 0.9, 0.95, 1.0)


def best(fn, calls, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return min(times) * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[64, 128, 400])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--model", default=None, help="a weight file for the whole-model table")
    ap.add_argument("--data", default="../shared/data", help="corpus root (speech/val, noise/train) for --model")
    a = ap.parse_args(argv)
    if a.model:
        model_table(a)
        return
    rng = np.random.default_rng(0)
    for H in a.hidden:
        wt = rng.standard_normal((H, 3 * H)).astype(np.float32)
        b = rng.standard_normal(3 * H).astype(np.float32)
        v = rng.standard_normal(H).astype(np.float32)
        acc = np.zeros(3 * H, np.float32)
        d = rng.standard_normal(H).astype(np.float32)
        print(f"\nH = {H}: memory update, us per call (best of {a.repeats} x {a.calls} calls)\n")
        print("| changed c/H | columns (_accumulate) | whole (_dense_columns) | columns / whole |")
        print("|---|---|---|---|")
        for f in FRACTIONS:
            t_dense = best(lambda: K._dense_columns(acc, wt, b, v), a.calls, a.repeats)  # beside each row: the load changes
            c = max(1, int(round(f * H)))
            idx = np.sort(rng.choice(H, c, replace=False)).astype(np.int64)
            t_cols = best(lambda: K._accumulate(acc, wt, idx, d, np.int64(c)), a.calls, a.repeats)
            print(f"| {f:.2f} | {t_cols:.2f} | {t_dense:.2f} | {t_cols / t_dense:.2f} |")


def model_table(a):
    import glob

    import soundfile as sf

    from npdgru import stft
    from npdgru.model import MaskModel
    from npdgru.train.loop import with_gate
    from npdgru.weights import Weights, load_weights

    w = load_weights(a.model)
    speech = sorted(glob.glob(f"{a.data}/speech/val/*.flac"))[:3]
    noise = sorted(glob.glob(f"{a.data}/noise/train/**/*.flac", recursive=True))[:3]
    feats = []
    for s_path, n_path in zip(speech, noise):
        x, _ = sf.read(s_path, dtype="float32")
        n, _ = sf.read(n_path, dtype="float32", always_2d=True)
        L = min(len(x), len(n), 4 * 16000)
        x, n = x[:L], n[:L, 0]
        feats.append(stft.log_power(stft.stft(x + n * (np.std(x) / (np.std(n) + 1e-9)) * 10 ** (-5 / 20))))
    F = np.concatenate(feats)[:, None, :]
    T = F.shape[0]
    rows = [(f"top-a P={P}", MaskModel(w, update_percent=P)) for P in (100, 50, 40, 25)]
    for gate, th in (("threshold", 0.35), ("threshold", 0.65), ("delta", 0.03), ("delta", 0.1)):
        gated = Weights(architecture=with_gate(w.architecture, {"gate": gate, "theta": th}), tensors=w.tensors)
        rows.append((f"{gate} {th}", MaskModel(gated)))
    print(f"\n{a.model}: {T} frames, us per frame (best of {a.repeats})\n")
    print("| gate | us/frame | state columns per frame (each layer) | input columns per frame (delta) |")
    print("|---|---|---|---|")
    for name, m in rows:
        m.forward(F[:10], m.init_state(1))
        times = []
        for _ in range(a.repeats):
            st = m.init_state(1)
            t0 = time.perf_counter()
            m.forward(F, st)
            times.append(time.perf_counter() - t0)
        work = ["", ""]
        if not name.startswith("top-a"):
            mw = [g.mean_work(s) for g, s in zip(m.executor.gru_layers, st.layers)]
            work = [", ".join(f"{v[0]:.0f}" for v in mw), ", ".join(f"{v[1]:.0f}" for v in mw) if name.startswith("delta") else ""]
        print(f"| {name} | {min(times) / T * 1e6:.1f} | {work[0]} | {work[1]} |")


if __name__ == "__main__":
    main()
