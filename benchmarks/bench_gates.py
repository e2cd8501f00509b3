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

With ``--model`` (a weight file, e.g. weights/nsnet2-kd-anyp.safetensors) the whole-model table
instead, one thread, on 12 s of validation speech mixed with training noise at 5 dB (never a
test set): per row the offline time per frame (MaskModel.forward), the streaming hop (median
Stream.process of 160 samples), the measured work (share of the D-GRU state updated per frame,
mean and 99th percentile; a delta layer's share of input entries propagated) and the GRU MACs
per frame at that work. Rows: top-A at --percents, the same weights with every D-GRU layer
given a gate at --gates GATE:THETA (untrained for it: a speed and work measure), and --extra
weight files of models trained with their gate::

    python benchmarks/bench_gates.py --model weights/nsnet2-kd-anyp.safetensors --repeats 5 \
        --gates delta:0.03 delta:0.1 --extra training/runs/nsnet2-threshold/threshold-0.2-step600.safetensors
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
    ap.add_argument("--percents", type=float, nargs="+", default=[100, 50, 25], help="top-A rows of --model")
    ap.add_argument("--gates", nargs="*", default=["threshold:0.35", "threshold:0.65", "delta:0.03", "delta:0.1"],
                    help="GATE:THETA rows: --model's weights with that gate on every D-GRU layer (untrained for it)")
    ap.add_argument("--extra", nargs="*", default=[], help="weight files of gated models (trained with their gate): one row each")
    ap.add_argument("--hops", type=int, default=400, help="streaming hops per round")
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
    from pathlib import Path

    import soundfile as sf

    from npdgru import stft
    from npdgru.enhance import Enhancer
    from npdgru.kinds import with_gate
    from npdgru.model import MaskModel
    from npdgru.weights import Weights, load_weights

    w = load_weights(a.model)
    speech = sorted(glob.glob(f"{a.data}/speech/val/*.flac"))[:3]
    noise = sorted(glob.glob(f"{a.data}/noise/train/**/*.flac", recursive=True))[:3]
    signals = []
    for s_path, n_path in zip(speech, noise):
        x, _ = sf.read(s_path, dtype="float32")
        n, _ = sf.read(n_path, dtype="float32", always_2d=True)
        L = min(len(x), len(n), 4 * 16000)
        x, n = x[:L], n[:L, 0]
        signals.append((x + n * (np.std(x) / (np.std(n) + 1e-9)) * 10 ** (-5 / 20)).astype(np.float32))
    audio = np.concatenate(signals)
    F = stft.log_power(stft.stft(audio))[:, None, :].astype(np.float32)
    T = F.shape[0]
    rows = [(f"top-a P={P:g}", w, P) for P in a.percents]
    for spec in a.gates:
        gate, th = spec.split(":")
        rows.append((f"{gate} {float(th):g} (post hoc)", Weights(architecture=with_gate(w.architecture, {"gate": gate, "theta": float(th)}), tensors=w.tensors), 100))
    for path in a.extra:
        e = load_weights(path)
        rows.append((Path(path).stem, e, 100))
    hops = min(a.hops, len(audio) // 160)
    print(f"\n{a.model}: {T} frames ({len(signals)} validation speech files + training noise at 5 dB), one thread; offline: "
          f"MaskModel.forward over all frames, best of {a.repeats}; hop: Stream.process of 160 samples, median of {hops} hops "
          f"x {a.repeats} rounds; the rows interleaved round by round\n")
    print("| row | offline us/frame | hop us (median) | state updated per frame: mean, p99 (share of H, all layers) | input propagated per frame (delta) | GRU MMACs/frame (ours, measured) |")
    print("|---|---:|---:|---:|---:|---:|")
    # offline and hop timings in interleaved rounds (each round times every row in turn), so that
    # a burst of load from other processes hits every row alike
    built = []
    for name, weights, P in rows:
        m = MaskModel(weights, update_percent=P)
        m.forward(F[:10], m.init_state(1))
        stream = Enhancer(weights, update_percent=P).stream()
        stream.process(audio[:1600])
        built.append((name, m, stream, [], []))
    for _ in range(a.repeats):
        for name, m, stream, times, hop_times in built:
            st = m.init_state(1)
            t0 = time.perf_counter()
            m.forward(F, st)
            times.append(time.perf_counter() - t0)
            for i in range(hops):
                chunk = audio[i * 160 : (i + 1) * 160]
                t0 = time.perf_counter()
                stream.process(chunk)
                hop_times.append(time.perf_counter() - t0)
    for name, m, stream, times, hop_times in built:
        work = m.work_per_frame(F)
        if work:
            share = m.updated_share(work)
            state = f"{share.mean():.3f}, {np.percentile(share, 99):.3f}"
            inp = [v for v in work.values() if v.input_columns is not None]
            inputs = f"{sum(v.input_columns.mean() * v.bands for v in inp) / sum(v.size_in * v.bands for v in inp):.3f}" if inp else "-"
        else:
            state, inputs = f"{m.fraction_updated():.3f} (exact)", "-"
        macs = m.macs_per_frame(work or None)["gru_ours"] / 1e6
        print(f"| {name} | {min(times) / T * 1e6:.1f} | {1e6 * float(np.median(hop_times)):.0f} | {state} | {inputs} | {macs:.2f} |")


if __name__ == "__main__":
    main()
