#!/usr/bin/env python
"""GRU / D-GRU kernel benchmark: us per step, one thread, batch 1, against torch.nn.GRU.

    python benchmarks/bench_gru.py --hidden 256 400 --steps 1000 --repeats 7

Prints one markdown table per hidden size H (and one of the dense products on NSNet2's shapes
against OpenBLAS sgemm) (input size --input, default 400): the NumPy
reference, the cpu dense GRU, the cpu D-GRU at P = 100/75/50/25/10 (P=100 here is the D-GRU
kernel at A = H, not the dense kernel that GRULayer picks at P=100), torch.nn.GRU, and the
streaming cost of one-frame calls. Offline rows run one call of --steps frames and report
total / steps; each time is the median of --repeats runs after a warm-up run. MACs are per step
from ``npdgru.reference.count_macs``: dense 3H(I+H), the paper's (H+2A)(I+H), ours with the
sparse recurrent accumulator 3H·I + 3H·A (dense input).

As in llm.c, every kernel is first checked against the float64 reference on a shorter sequence
(tolerance ATOL + RTOL·|ref|, the first mismatch printed with its index and both values); if any
disagrees nothing is timed and the script exits with status 1.
"""

from __future__ import annotations

import os

for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one thread everywhere; must precede the numpy/numba/torch imports

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from npdgru import reference as ref  # noqa: E402
from npdgru.kernels import cpu  # noqa: E402
from npdgru.kernels.cpu import kernels as cpu_kernels  # noqa: E402

try:
    import torch  # noqa: E402

    torch.set_num_threads(1)
except ImportError:  # torch rows are left out
    torch = None

ATOL = 2e-5  # float32 kernels vs the float64 reference, as in tests/test_kernels_cpu.py
RTOL = 1e-4
MARGIN = 1e-5  # reference u closer than this at the selection boundary is a tie


# ----------------------------------------------------------------------------------- checks


def check_close(name, got, want):
    """llm.c style: True if |got − want| <= ATOL + RTOL·|want| everywhere, else print the first miss."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    bad = ~(np.abs(got - want) <= ATOL + RTOL * np.abs(want))
    if bad.any():
        i = tuple(int(v) for v in np.argwhere(bad)[0])
        print(f"MISMATCH {name}: {int(bad.sum())} of {bad.size} entries; first at {i}: kernel {float(got[i])!r} reference {float(want[i])!r}", file=sys.stderr)
        return False
    return True


def check_dgru(name, layer, weights, x):
    """Teacher-forced check of a D-GRU layer: each reference step starts from the kernel's state."""
    T, B, _ = x.shape
    H = layer.hidden_size
    A = layer.A
    sel = np.zeros((T, B, H), bool)
    out = layer.forward(x, layer.init_state(B), selected=sel)
    W = tuple(w.astype(np.float64) for w in weights)
    x64 = x.reshape(T * B, -1).astype(np.float64)
    prev = np.concatenate([np.zeros((1, B, H)), out[:-1].astype(np.float64)]).reshape(T * B, H)
    out2, sel2 = out.reshape(T * B, H), sel.reshape(T * B, H)
    ok = True
    if not (sel2.sum(-1) == A).all():
        print(f"MISMATCH {name}: not exactly A={A} neurons selected per step", file=sys.stderr)
        ok = False
    keep = ~sel2
    if not np.array_equal(out2[keep], prev.astype(np.float32)[keep]):
        print(f"MISMATCH {name}: an unselected neuron changed", file=sys.stderr)
        ok = False
    h_all, _ = ref.dgru_step(x64, prev, *W, H)  # h + u (n − h) for every neuron
    ok &= check_close(f"{name} selected values", np.where(sel2, out2, 0.0), np.where(sel2, h_all, 0.0))
    if A < H:
        _, S_ref = ref.dgru_step(x64, prev, *W, A)
        a_z = x64 @ W[0][H : 2 * H].T + W[2][H : 2 * H] + prev @ W[1][H : 2 * H].T + W[3][H : 2 * H]
        s = -np.sort(-(1.0 - ref.sigmoid(a_z)), axis=-1)
        clear = (s[:, A - 1] - s[:, A]) >= MARGIN
        differ = clear & (sel2 != S_ref).any(-1)
        if differ.any():
            t = int(np.argmax(differ))
            print(f"MISMATCH {name}: selection at step {t}: kernel {np.flatnonzero(sel2[t])} reference {np.flatnonzero(S_ref[t])}", file=sys.stderr)
            ok = False
    return ok


# ---------------------------------------------------------------------------------- timing


def median_time(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def dgru_layer(weights, A):
    """A cpu D-GRU layer with exactly A selected neurons (also A = H, which P=100 would make dense)."""
    layer = cpu.GRULayer(*weights, A=A)
    assert layer.A == A and not layer.dense, (layer.A, A, layer.dense)
    return layer


def torch_gru(weights):
    H, I = weights[1].shape[1], weights[0].shape[1]
    gru = torch.nn.GRU(I, H)
    with torch.no_grad():
        for name, value in zip(["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"], weights):
            getattr(gru, name).copy_(torch.from_numpy(value))
    return gru.eval()


def bench_hidden(H, args, rng):
    I, T = args.input, args.steps
    k = 1.0 / np.sqrt(H)  # torch.nn.GRU's initialisation
    weights = tuple(rng.uniform(-k, k, s).astype(np.float32) for s in [(3 * H, I), (3 * H, H), (3 * H,), (3 * H,)])
    x = rng.standard_normal((T, 1, I)).astype(np.float32)
    xc = x[: args.check_steps]
    W64 = tuple(w.astype(np.float64) for w in weights)

    dense = cpu.GRULayer(*weights, update_percent=100.0)
    dgru = {P: dgru_layer(weights, ref.num_selected(P, H)) for P in args.percents}
    gru_t = torch_gru(weights) if torch is not None else None

    # ---- check every kernel against the reference before timing anything
    ok = True
    want = ref.gru_sequence(xc.astype(np.float64), None, *W64)
    ok &= check_close(f"cpu dense H={H}", dense.forward(xc, dense.init_state(1)), want)
    ok &= check_close(f"reference float32 H={H}", ref.gru_sequence(xc, None, *weights), want)
    for P, layer in dgru.items():
        ok &= check_dgru(f"cpu D-GRU H={H} P={P} A={layer.A}", layer, weights, xc)
    # offline == streaming bit for bit is the property of exact=True (input products in column order;
    # the default BLAS product's bits may depend on the number of frames)
    for P in (100, 50):
        layer = cpu.GRULayer(*weights, update_percent=P, exact=True)
        s_off, s_str = layer.init_state(1), layer.init_state(1)
        off = layer.forward(xc, s_off)
        stream = np.concatenate([layer.forward(xc[t : t + 1], s_str) for t in range(len(xc))])
        if not np.array_equal(off, stream):
            print(f"MISMATCH streaming H={H} P={P}: 1-frame calls differ from one offline call", file=sys.stderr)
            ok = False
    if gru_t is not None:
        with torch.no_grad():
            ok &= check_close(f"torch.nn.GRU H={H}", gru_t(torch.from_numpy(xc))[0].numpy(), want)
    if not ok:
        return None

    # ---- time
    rows = []  # (kernel, P, A, MacCount, seconds per step)

    def offline(layer):
        def run():
            layer.forward(x, layer.init_state(1))
        return run

    t_ref = median_time(lambda: ref.gru_sequence(x[: args.ref_steps], None, *weights), max(1, args.repeats // 2)) / args.ref_steps
    rows.append(("reference (NumPy, float32)", 100, H, ref.count_macs(I, H, 100), t_ref))
    t_dense = median_time(offline(dense), args.repeats) / T
    rows.append(("cpu dense GRU", 100, H, ref.count_macs(I, H, 100), t_dense))
    for P, layer in dgru.items():
        rows.append((f"cpu D-GRU{' (A=H)' if layer.A == H else ''}", P, layer.A, ref.count_macs(I, H, P), median_time(offline(layer), args.repeats) / T))
    t_torch = None
    if gru_t is not None:
        xt = torch.from_numpy(x)

        def run_torch():
            with torch.no_grad():
                gru_t(xt)

        t_torch = median_time(run_torch, args.repeats) / T
        rows.append(("torch.nn.GRU", 100, H, ref.count_macs(I, H, 100), t_torch))

    # streaming: one frame per call, state carried
    def streaming(layer):
        def run():
            state = layer.init_state(1)
            for t in range(T):
                layer.forward(x[t : t + 1], state)
        return run

    rows.append(("cpu dense, 1-frame calls", 100, H, ref.count_macs(I, H, 100), median_time(streaming(dense), args.repeats) / T))
    stream50 = cpu.GRULayer(*weights, update_percent=50)
    rows.append(("cpu D-GRU, 1-frame calls", 50, stream50.A, ref.count_macs(I, H, 50), median_time(streaming(stream50), args.repeats) / T))
    if gru_t is not None:
        xs = [torch.from_numpy(x[t : t + 1]) for t in range(T)]

        def run_torch_stream():
            with torch.no_grad():
                h = None
                for xt1 in xs:
                    _, h = gru_t(xt1, h)

        rows.append(("torch.nn.GRU, 1-frame calls", 100, H, ref.count_macs(I, H, 100), median_time(run_torch_stream, args.repeats) / T))
    return rows, t_dense, t_torch


def print_table(H, I, rows, t_dense, t_torch, args):
    print(f"\n### H={H}, input {I}, batch 1, one thread, {args.steps} steps (reference: {args.ref_steps}), median of {args.repeats}\n")
    print("| kernel | P | A | MACs/step dense | paper | ours | us/step | x cpu dense | x torch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, P, A, m, t in rows:
        to_torch = f"{t / t_torch:.2f}" if t_torch else "-"
        print(f"| {name} | {P:g} | {A} | {m.dense:,} | {m.paper:,} | {m.sparse:,} | {t * 1e6:.1f} | {t / t_dense:.2f} | {to_torch} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 400], help="hidden sizes H")
    p.add_argument("--input", type=int, default=400, help="input size I")
    p.add_argument("--steps", type=int, default=1000, help="frames per offline call")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per row (median reported)")
    p.add_argument("--ref-steps", type=int, default=100, help="frames for the slow NumPy reference")
    p.add_argument("--check-steps", type=int, default=200, help="frames of the correctness check")
    p.add_argument("--percents", type=float, nargs="+", default=[100, 75, 50, 25, 10], help="D-GRU update percentages")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.steps, args.repeats, args.ref_steps, args.check_steps, args.input, *args.hidden) < 1:
        p.error("sizes, steps and repeats must be positive")

    import numba

    print(f"numpy {np.__version__}, numba {numba.__version__}, torch {torch.__version__ if torch else 'absent'}, "
          f"{platform.processor() or platform.machine()}, NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS}")
    rng = np.random.default_rng(args.seed)
    status = 0
    for H in args.hidden:
        res = bench_hidden(H, args, rng)
        if res is None:
            print(f"\nH={H}: a kernel disagrees with the reference; refusing to time (see stderr)", file=sys.stderr)
            status = 1
            continue
        print_table(H, args.input, *res, args)
    bench_products(args, rng)
    return status


# The dense products of NSNet2 offline (1000 frames): (frames, in, out) of fc1, a GRU input
# product, fc2, fc3, fc4.
PRODUCT_SHAPES = ((1000, 161, 400), (1000, 400, 1200), (1000, 400, 600), (1000, 600, 600), (1000, 600, 161))


def bench_products(args, rng):
    """The cpu dense product (cpu_kernels._affine_columns, whose sum order per output does not depend on
    the number of rows) against NumPy's float32 matmul (OpenBLAS sgemm, one thread)."""
    print(f"\n### Dense products on the model's shapes, one thread, median of {args.repeats}\n")
    print("| frames x in x out | cpu us | sgemm us | sgemm / cpu (1 = as fast) | GFLOP/s cpu |")
    print("|---|---:|---:|---:|---:|")
    for N, J, K in PRODUCT_SHAPES:
        x = rng.standard_normal((N, J)).astype(np.float32)
        wt = rng.standard_normal((J, K)).astype(np.float32)
        b = rng.standard_normal(K).astype(np.float32)
        out, ref_out = np.empty((N, K), np.float32), np.empty((N, K), np.float32)
        cpu_kernels._affine_columns(x, wt, b, out)
        want = x.astype(np.float64) @ wt.astype(np.float64) + b
        bound = J * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(wt).astype(np.float64) + np.abs(b))
        if not (np.abs(out - want) <= bound).all():  # float32 summation error bound against float64
            print(f"| {N} x {J} x {K} | disagrees with the float64 product: not timed | | | |")
            continue
        t_cpu = median_time(lambda: cpu_kernels._affine_columns(x, wt, b, out), args.repeats)
        t_blas = median_time(lambda: np.matmul(x, wt, out=ref_out), args.repeats)
        print(f"| {N} x {J} x {K} | {t_cpu * 1e6:.0f} | {t_blas * 1e6:.0f} | {t_blas / t_cpu:.2f} | {2 * N * J * K / t_cpu / 1e9:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
