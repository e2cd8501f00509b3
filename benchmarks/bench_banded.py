#!/usr/bin/env python
"""Where a banded small-H D-GRU step spends its time: DPRNN's inter-frame D-GRU (41 bands of H = 64
sharing one set of weights), one thread.

    python benchmarks/bench_banded.py [--frames 1000] [--repeats 7]

Prints two markdown tables, every row measured interleaved with the others (each repeat runs every
row once, in turn; medians reported), so that ratios hold on a busy machine:

1. The pieces of one step, in us per band row: the dense recurrent product of all 64 columns
   (what P = 100 runs, per row, ``_dense_columns``), the same product for all 41 rows in one
   matrix-matrix call (``_affine_columns``, same bits), the column accumulate of A changed
   columns (``_accumulate``, what P < 100 runs instead), the selection of the A largest u per row
   (``_top_a``), a selection of all rows in one pass (rows as vector lanes, a bisection on the
   float bits: a candidate kept in this script, checked against NumPy before it is timed), and the
   gate arithmetic of a row (u of 64 neurons, r and n of 64).
2. The layer (``GRULayer`` with the weights of ``inter1`` in ``weights/dprnn-anyp.safetensors``)
   over --frames steps of 41 rows at P = 100 / 75 / 50 / 25: us per frame and x own P = 100; the
   same layer with the one-pass selection in place of ``_top_a`` row by row (its output checked
   equal to the layer's, bit for bit, before timing); and the same steps with the selection
   replaced by a fixed set of A neurons (not a D-GRU: what the step costs without selecting,
   measured in place). Every column includes the input product.

A step at P < 100 pays the accumulate of A columns plus the selection where P = 100 pays the dense
product; the last column of table 1 says what the selection may cost at most for P < 100 to win.
The layer's input is random (normal, unit variance: the layer reads a LayerNorm'd residual sum);
u for the selection rows is 1 − sigmoid of normal values.
"""

from __future__ import annotations

import os

for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one thread everywhere; must precede the numpy/numba imports

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402

from npdgru import reference as ref  # noqa: E402
from npdgru.evaluate.runner import cpu_model  # noqa: E402
from npdgru.kernels import cpu  # noqa: E402
from npdgru.kernels.cpu import kernels as cpu_kernels  # noqa: E402
from npdgru.kernels._config import JIT  # noqa: E402
from npdgru.weights import load_weights  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROWS, H = 41, 64
PERCENTS = (100, 75, 50, 25)
LANES = 16  # rows padded to a multiple of this for the one-pass selection


# --------------------------------------------------------------------- the one-pass candidate


@njit(**JIT)
def _keys_of(u, keys):
    """keys[i, r] = an int32 whose signed order is the order of u[r, i] (float32, not NaN)."""
    R, n = u.shape
    bits = u.view(np.int32)
    for r in range(R):
        for i in range(n):
            b = bits[r, i]
            keys[i, r] = b ^ (np.int32(0x7FFFFFFF) & (b >> np.int32(31)))


@njit(**JIT)
def _kth_largest_lanes(keys, A, cnt, cand, thr):
    """thr[r] = the key of the A-th largest value of row r; keys (n, R), rows as vector lanes.
    Bisection on the key bits from the top: 32 passes of n compare-and-count steps, no branch."""
    n, R = keys.shape
    for r in range(R):
        thr[r] = -2147483648
    for bit in range(31, -1, -1):
        add = np.int32(1 << bit) if bit < 31 else np.int32(0)
        for r in range(R):
            cand[r] = (thr[r] | add) if bit < 31 else np.int32(0)
            cnt[r] = 0
        j = 0
        while j + 4 <= n:
            k0 = keys[j]
            k1 = keys[j + 1]
            k2 = keys[j + 2]
            k3 = keys[j + 3]
            for r in range(R):
                c = cand[r]
                cnt[r] += np.int32(k0[r] >= c) + np.int32(k1[r] >= c) + np.int32(k2[r] >= c) + np.int32(k3[r] >= c)
            j += 4
        while j < n:
            for r in range(R):
                cnt[r] += np.int32(keys[j, r] >= cand[r])
            j += 1
        for r in range(R):
            thr[r] = cand[r] if cnt[r] >= A else thr[r]


@njit(**JIT)
def _lanes_select(N, u, A, keys, cnt, cand, thr):
    for _ in range(N):
        _keys_of(u, keys)
        _kth_largest_lanes(keys, A, cnt, cand, thr)


# --------------------------------------------------------------------- the existing pieces


@njit(**JIT)
def _dense_rows(N, m, whh, b, h):
    for _ in range(N):
        for r in range(h.shape[0]):
            cpu_kernels._dense_columns(m[r], whh, b, h[r])


@njit(**JIT)
def _dense_block(N, m, whh, b, h):
    for _ in range(N):
        cpu_kernels._affine_columns(h, whh, b, m)


@njit(**JIT)
def _accumulate_rows(N, m, whh, idx, dh, A):
    for _ in range(N):
        for r in range(m.shape[0]):
            cpu_kernels._accumulate(m[r], whh, idx[r], dh, A)


@njit(**JIT)
def _select_rows(N, u, A, buf, idx):
    for _ in range(N):
        for r in range(u.shape[0]):
            cpu_kernels._top_a(u[r], A, buf, idx[r])


@njit(**JIT)
def _gates_rows(N, g, m, u, q):
    n = u.shape[1]
    for _ in range(N):
        for r in range(u.shape[0]):
            gr = g[r]
            mr = m[r]
            ur = u[r]
            for i in range(n):
                ur[i] = np.float32(1.0) - cpu_kernels._sigmoid(gr[n + i] + mr[n + i])
            for i in range(n):
                rr = cpu_kernels._sigmoid(gr[i] + mr[i])
                q[i] = cpu_kernels._tanh(gr[2 * n + i] + rr * mr[2 * n + i])


@njit(**JIT)
def _dgru_fixed_set(gi, whh_t, b_hh, A, h, m, ubuf, qbuf, idx, dh):
    """cpu_kernels._dgru_cell over T steps of B rows (no refresh) with the selection replaced by a fixed
    set of A evenly spaced neurons: NOT a D-GRU, only the cost of everything but the selection,
    in place (same accumulate, same gate arithmetic)."""
    T, B, H3 = gi.shape
    n = H3 // 3
    for k in range(A):
        idx[k] = (k * n) // A
    for t in range(T):
        for b in range(B):
            g = gi[t, b]
            hb = h[b]
            mb = m[b]
            for i in range(n):
                ubuf[i] = np.float32(1.0) - cpu_kernels._sigmoid(g[n + i] + mb[n + i])
            for i in range(n):
                r = cpu_kernels._sigmoid(g[i] + mb[i])
                qbuf[i] = cpu_kernels._tanh(g[2 * n + i] + r * mb[2 * n + i])
            for k in range(A):
                i = idx[k]
                hi = hb[i]
                hn = hi + ubuf[i] * (qbuf[i] - hi)
                dh[k] = hn - hi
                hb[i] = hn
            cpu_kernels._accumulate(mb, whh_t, idx, dh, A)


@njit(**JIT)
def _dgru_one_pass(gi, whh_t, b_hh, A, refresh_every, h, m, out, urows, keys, cnt, cand, thr, qbuf, idx, dh):
    """cpu_kernels._dgru_forward (B rows, dense input) with the selection of all rows in one pass: u of
    every row, their keys, _kth_largest_lanes, then per row the index pass of cpu_kernels._top_a and the
    same update and accumulate as cpu_kernels._dgru_cell. Selects exactly what _top_a selects, so the
    output equals the layer's bit for bit (checked before timing)."""
    T, B, H3 = gi.shape
    n = H3 // 3
    for t in range(T):
        g = gi[t]
        refresh = t % refresh_every == 0
        for b in range(B):
            if refresh:
                cpu_kernels._dense_columns(m[b], whh_t, b_hh, h[b])
            mb = m[b]
            gb = g[b]
            ub = urows[b]
            for i in range(n):
                ub[i] = np.float32(1.0) - cpu_kernels._sigmoid(gb[n + i] + mb[n + i])
        _keys_of(urows, keys)
        _kth_largest_lanes(keys, A, cnt, cand, thr)
        for b in range(B):
            k = thr[b]
            thr[b] = k ^ (np.int32(0x7FFFFFFF) & (k >> np.int32(31)))  # the key map is its own inverse
        tau = thr.view(np.float32)
        for b in range(B):
            ub = urows[b]
            hb = h[b]
            mb = m[b]
            gb = g[b]
            n_gt = 0
            for i in range(n):
                n_gt += ub[i] > tau[b]
            n_eq = A - n_gt
            c = 0
            for i in range(n):  # the index pass of cpu_kernels._top_a
                eq = (ub[i] == tau[b]) & (n_eq > 0)
                idx[c] = i
                c += (ub[i] > tau[b]) | eq
                n_eq -= eq
            for i in range(n):  # as cpu_kernels._dgru_cell for A·8 >= H
                r = cpu_kernels._sigmoid(gb[i] + mb[i])
                qbuf[i] = cpu_kernels._tanh(gb[2 * n + i] + r * mb[2 * n + i])
            for k in range(A):
                i = idx[k]
                hi = hb[i]
                hn = hi + ub[i] * (qbuf[i] - hi)
                dh[k] = hn - hi
                hb[i] = hn
            cpu_kernels._accumulate(mb, whh_t, idx, dh, A)
            out[t, b] = hb


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each function; every repeat runs all of them once, in turn."""
    for fn in fns.values():
        fn()  # warm-up: compilation, caches
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1000, help="steps per timed call (default 1000)")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved timed runs per row (default 7)")
    args = ap.parse_args(argv)
    import numba

    print(f"Machine: {cpu_model()} ({os.cpu_count()} logical CPUs), {platform.system()} {platform.release()}")
    print(f"Versions: Python {platform.python_version()}, NumPy {np.__version__}, Numba {numba.__version__}; one thread\n")
    rng = np.random.default_rng(0)
    t = load_weights(REPO / "weights" / "dprnn-anyp.safetensors").tensors
    w = [t[f"inter1.{k}"] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    whh = np.ascontiguousarray(w[1].T)  # (H, 3H), the layout of the cpu kernels
    bhh = w[3].astype(np.float32)
    h = rng.standard_normal((ROWS, H)).astype(np.float32)
    g = rng.standard_normal((ROWS, 3 * H)).astype(np.float32)
    m = np.zeros((ROWS, 3 * H), np.float32)
    u = (1.0 - 1.0 / (1.0 + np.exp(-rng.standard_normal((ROWS, H))))).astype(np.float32)
    dh = (0.1 * rng.standard_normal(H)).astype(np.float32)
    R = -(-ROWS // LANES) * LANES
    up = np.zeros((R, H), np.float32)
    up[:ROWS] = u
    keys, cnt, cand, thr = np.zeros((H, R), np.int32), np.zeros(R, np.int32), np.zeros(R, np.int32), np.zeros(R, np.int32)
    N = args.frames
    As = [ref.num_selected(P, H) for P in PERCENTS if P < 100]

    # checks before timings: the one-pass candidate and _top_a against NumPy on the same u
    for A in As:
        _lanes_select(1, up, A, keys, cnt, cand, thr)
        k = thr[:ROWS]
        tau = (k ^ (0x7FFFFFFF & (k >> 31))).astype(np.int32).view(np.float32)
        want = np.sort(u, axis=1)[:, -A]
        idx = np.zeros((ROWS, H), np.int64)
        _select_rows(1, u, A, np.zeros(H, np.float32), idx)
        sel = np.zeros((ROWS, H), bool)
        for r in range(ROWS):
            sel[r, idx[r, :A]] = True
        if not (tau == want).all() or not (sel == ref.top_a(u, A)).all():
            print(f"MISMATCH: a selection at A={A} differs from NumPy; nothing timed", file=sys.stderr)
            return 1
    m1, m2 = m.copy(), m.copy()
    _dense_rows(1, m1, whh, bhh, h)
    _dense_block(1, m2, whh, bhh, h)
    if not np.array_equal(m1, m2):
        print("MISMATCH: the block product differs from the per-row product; nothing timed", file=sys.stderr)
        return 1

    sel_idx = np.stack([np.sort(rng.choice(H, H, replace=False)) for _ in range(ROWS)])  # ascending, as _top_a leaves them
    fns = {("dense product, 64 columns, per row", None): lambda: _dense_rows(N, m, whh, bhh, h),
           ("dense product, 41 rows in one call", None): lambda: _dense_block(N, m, whh, bhh, h),
           ("gates: u, r, n of 64 neurons", None): lambda: _gates_rows(N, g, m, u.copy(), np.zeros(H, np.float32))}
    for A in As:
        cols = np.ascontiguousarray(np.stack([np.sort(rng.choice(H, A, replace=False)) for _ in range(ROWS)]))
        fns[("accumulate A columns", A)] = lambda A=A, c=cols: _accumulate_rows(N, m, whh, c, dh, A)
        fns[("select A of 64, per row (_top_a)", A)] = lambda A=A: _select_rows(N, u, A, np.zeros(H, np.float32), sel_idx.copy())
        fns[("select A of 64, all rows in one pass", A)] = lambda A=A: _lanes_select(N, up, A, keys, cnt, cand, thr)

    layers = {P: cpu.GRULayer(*w, update_percent=P, exact=True) for P in PERCENTS}
    x = rng.standard_normal((N, ROWS, w[0].shape[1])).astype(np.float32)
    for P, layer in layers.items():
        fns[("layer", P)] = lambda layer=layer: layer._run(x, layer.init_state(ROWS))
    gi = np.empty((N, ROWS, 3 * H), np.float32)
    cpu_kernels._affine_columns(x.reshape(N * ROWS, -1), layers[100].wih_t, layers[100].bias_ih, gi.reshape(N * ROWS, 3 * H))
    for P in PERCENTS[1:]:
        A = ref.num_selected(P, H)

        def fixed(A=A):
            mm = np.empty((ROWS, 3 * H), np.float32)
            mm[:] = bhh  # M = W_hh·0 + b_hh for h = 0
            z = np.zeros(H, np.float32)
            _dgru_fixed_set(gi, whh, bhh, A, np.zeros((ROWS, H), np.float32), mm, z, z.copy(), np.zeros(H, np.int64), z.copy())
            return mm

        fns[("fixed set", P)] = lambda f=fixed: (cpu_kernels._affine_columns(x.reshape(N * ROWS, -1), layers[100].wih_t, layers[100].bias_ih, gi.reshape(N * ROWS, 3 * H)), f())
    def one_pass(P):
        A = ref.num_selected(P, H)
        layer = layers[P]
        cpu_kernels._affine_columns(x.reshape(N * ROWS, -1), layer.wih_t, layer.bias_ih, gi.reshape(N * ROWS, 3 * H))
        out = np.empty((N, ROWS, H), np.float32)
        z = np.zeros(H, np.float32)
        _dgru_one_pass(gi, whh, bhh, A, layer.refresh_every, np.zeros((ROWS, H), np.float32), np.zeros((ROWS, 3 * H), np.float32), out,
                       np.zeros((R, H), np.float32), keys, cnt, cand, thr, z, np.zeros(H, np.int64), z.copy())
        return out

    for P in PERCENTS[1:]:
        if not np.array_equal(one_pass(P), layers[P]._run(x, layers[P].init_state(ROWS))):
            print(f"MISMATCH: the layer with the one-pass selection differs from GRULayer at P={P}; nothing timed", file=sys.stderr)
            return 1
        fns[("one pass", P)] = lambda P=P: one_pass(P)
    med = interleaved(fns, args.repeats)

    per_row = {k: 1e6 * v / (N * ROWS) for k, v in med.items() if k[0] not in ("layer", "fixed set", "one pass")}
    dense = per_row[("dense product, 64 columns, per row", None)]
    print(f"## One step of 41 band rows, H = 64 (DPRNN inter1 weights): us per row, median of {args.repeats} interleaved runs of {N} steps\n")
    print("| piece | A | us / row | selection must cost below (us / row) for P < 100 to win |")
    print("|---|---:|---:|---:|")
    for (name, A), v in per_row.items():
        limit = f"{dense - per_row[('accumulate A columns', A)]:.3f}" if name.startswith("select") else ""
        print(f"| {name} | {'' if A is None else A} | {v:.3f} | {limit} |")
    print()
    base = med[("layer", 100)]
    print(f"## The layer: {N} steps of 41 band rows (GRULayer, inter1 of dprnn-anyp), median of {args.repeats} interleaved runs\n")
    print("| P | A | us / frame (41 rows) | x own P=100 | selecting all rows in one pass: us / frame, x own P=100 | without the selection (a fixed set of A): us / frame, x own P=100 |")
    print("|---:|---:|---:|---:|---:|---:|")

    def cell(key):
        v = med.get(key)
        return f"{1e6 * v / N:.1f}, {v / base:.2f}" if v is not None else ""

    for P in PERCENTS:
        v = med[("layer", P)]
        print(f"| {P} | {ref.num_selected(P, H)} | {1e6 * v / N:.1f} | {v / base:.2f} | {cell(('one pass', P))} | {cell(('fixed set', P))} |")
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
