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
    a = ap.parse_args(argv)
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


if __name__ == "__main__":
    main()
